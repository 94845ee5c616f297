"""Figures of a sweep report, drawn in memory as PNG bytes (matplotlib, Agg backend): the
Pareto fronts (score vs parameter ratio, one series per method) and the per-layer ranks and
kept channels of a compressed group. Nothing here writes files."""
from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import pandas as pd  # noqa: E402

from medslim.report.load import pareto_mask  # noqa: E402


@dataclass(frozen=True)
class Figure:
    """A rendered figure: file ``name`` (``*.png``), ``caption`` and the PNG bytes."""

    name: str
    caption: str
    png: bytes


def pareto_figure(groups: pd.DataFrame, column: str, label: str, name: str, within_pp: float = 1.0) -> Figure:
    """Mean ``<column>`` (e.g. ``test_dice``) vs mean parameter ratio (log x) of each group in
    ``groups`` (:func:`~medslim.report.load.group_summary`), one series per method, error bars =
    sample std over seeds; each control group's mean as a horizontal line with a ±``within_pp``
    pp band; the Pareto front in (ratio ↑, score ↑) dashed."""
    g = groups[(groups["n_seeds"] > 0) & groups["ratio_params"].notna() & groups[f"{column}_mean"].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, m in g.groupby("method", sort=False):
        ax.errorbar(m["ratio_params"], m[f"{column}_mean"], yerr=m[f"{column}_std"].fillna(0.0),
                    fmt="o", ms=5, capsize=3, label=str(method))
    for _, c in g[g["kind"] == "control"].iterrows():
        y = c[f"{column}_mean"]
        ax.axhline(y, color="k", lw=1, ls="-")
        ax.axhspan(y - within_pp / 100, y + within_pp / 100, color="grey", alpha=0.15,
                   label=f"{c['group']} ±{within_pp:g} pp")
    front = g[pareto_mask(g["ratio_params"], g[f"{column}_mean"])].sort_values("ratio_params")
    if len(front) > 1:
        ax.plot(front["ratio_params"], front[f"{column}_mean"], ls="--", color="tab:grey", lw=1,
                drawstyle="steps-pre", label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set(xlabel="parameter ratio (original / compressed, log)", ylabel=label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    caption = (f"{label} vs parameter ratio, mean ± std over seeds per group; line and band: control "
               f"mean ± {within_pp:g} pp; dashed: Pareto front")
    return Figure(name, caption, _png(fig))


def layers_figure(layers: pd.DataFrame, group: str, name: str) -> Figure:
    """Per layer (module order): kept / output channels and output rank / output channels as
    bars (``layers`` from :func:`~medslim.report.load.layer_tables`; a missing value draws no bar)."""
    n = len(layers)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n + 1.5), 3.8))
    out = layers["channels_out"].to_numpy(float)
    ax.bar(x - 0.2, layers["kept"].to_numpy(float) / out, width=0.4, label="kept / channels out")
    ax.bar(x + 0.2, layers["rank_out"].to_numpy(float) / out, width=0.4, label="rank out / channels out")
    ax.set_xticks(x, [str(s) for s in layers["name"]], rotation=90, fontsize=6)
    ax.set(ylabel="fraction of output channels", ylim=(0, 1.05), title=group)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    caption = f"{group}: kept channels and output ranks per layer, as fractions of the output channels (first seed)"
    return Figure(name, caption, _png(fig))


def _png(fig: plt.Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
