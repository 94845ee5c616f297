"""A sweep report as Markdown and as one self-contained HTML page, and ``write_report``.

The content is built once as a list of blocks (headings, paragraphs, tables of strings,
figures); :func:`to_markdown` and :func:`to_html` only lay them out, so both files say the same.
Markdown names each figure as ``report_figures/<name>.png``; the HTML embeds the same PNG bytes
as base64 data URIs. Every statement about the results is computed from the tables.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import pandas as pd

from medslim.atomic import atomic_file, atomic_folder
from medslim.errors import MedslimError
from medslim.report.figures import Figure, layers_figure, pareto_figure
from medslim.report.load import (DELTA_METRICS, METRICS, SPLITS, Sweep, group_summary, layer_tables, method_comparison,
                                 paired_deltas, pareto_mask, per_class_table, read_sweep, restore_cells)

FIGURE_DIR = "report_figures"
_METRIC_LABEL = {"dice": "Dice", "nsd1": "NSD@1 mm", "nsd3": "NSD@3 mm"}
_SPLIT_LABEL = {"test": "test", "val": "validation"}


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Table:
    """A table whose cells are already formatted strings (one row per item it counts)."""

    frame: pd.DataFrame


Block = Union[Heading, Paragraph, Code, Table, Figure]


# --- formatting: "—" for anything missing --------------------------------------------------------

def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(fn: Callable[[Any], str]) -> Callable[[Any], str]:
    return lambda x: "—" if _missing(x) else fn(x)


score = _fmt(lambda x: f"{x:.4f}")
pp = _fmt(lambda x: f"{100 * x:+.2f}")
count = _fmt(lambda x: f"{int(x):,}")
giga = _fmt(lambda x: f"{x / 1e9:.3g} G")
ratio = _fmt(lambda x: f"{x:.2f}")
minutes = _fmt(lambda x: f"{x / 60:.1f} min")
yes_no = _fmt(lambda x: "yes" if x else "no")
p_value = _fmt(lambda x: f"{x:.3f}")


def mean_std(mean: float, std: float, fn: Callable[[Any], str] = score) -> str:
    """``"0.8712 ± 0.0031"``; the mean alone when the std is undefined (one seed)."""
    return fn(mean) if _missing(std) or _missing(mean) else f"{fn(mean)} ± {fn(std).lstrip('+')}"


# --- content --------------------------------------------------------------------------------------

def build_blocks(sweep: Sweep, within_pp: float = 1.0, against: str | None = "hvs") -> list[Block]:
    """Every section of the report, in order (see the module docstring of :mod:`medslim.report`)."""
    counts = sweep.counts()
    blocks: list[Block] = [
        Heading(1, f"Sweep report: {sweep.name}"),
        Paragraph(f"{len(sweep.cells)} cells: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} "
                  f"pending. Seeds: {', '.join(map(str, sweep.seeds)) or '—'}. Folder: {sweep.folder}."),
    ]
    if sweep.restored:
        blocks.append(Paragraph(
            f"{len(sweep.restored)} of the ok cells were not in this folder and are restored from an earlier "
            f"report's cells.csv (sizes, times and scores only; the per-layer and per-class tables leave them "
            f"out): {', '.join(sweep.restored)}."))
    settings = {k: sweep.meta[k] for k in ("grid", "finetune") if k in sweep.meta}
    if settings:
        blocks.append(Paragraph(f"Settings of the last sweep file run in this folder ({sweep.name}):"))
        blocks.append(Code(json.dumps(settings, indent=1, sort_keys=True)))
    if sweep.cells.empty:
        return blocks + [Paragraph("The sweep has no cells yet.")]
    if counts["ok"] == 0:
        blocks.append(Paragraph("No cell has finished yet: there are no scores to report."))
    blocks.append(Paragraph(
        "Scores are fractions (Dice 0.87); Δ = cell − its control, in percentage points (pp), where the "
        "control is the control cell of the same seed with the same fine-tune settings (— while that one "
        "is not finished). Group statistics are mean ± sample std over the finished seeds; Δ are paired by seed."))
    deltas = paired_deltas(sweep.cells)
    groups = group_summary(deltas, within_pp)
    blocks += [Heading(2, "Cells"), Table(cells_table(deltas))]
    for split in SPLITS:
        blocks += [Heading(2, f"Summary per group ({_SPLIT_LABEL[split]})"),
                   Table(summary_table(groups, split, within_pp))]
    blocks.append(Paragraph(f"within {within_pp:g} pp of control: yes when the mean paired Δ of Dice and of "
                            f"NSD@1 mm are both ≥ −{within_pp:g} pp; — without a matched control."))
    blocks += _pareto_blocks(groups, within_pp) if counts["ok"] else []
    blocks += _against_blocks(sweep, against) if against else []
    blocks += _layer_blocks(sweep, groups)
    blocks += _per_class_blocks(sweep, groups)
    failed = sweep.cells[sweep.cells["status"] == "failed"]
    failed_table = Table(failed[["id", "kind", "group", "seed", "error"]].astype(str))
    blocks += [Heading(2, "Failed cells"), failed_table if len(failed) else Paragraph("None.")]
    return blocks


def cells_table(deltas: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (``deltas`` from :func:`~medslim.report.load.paired_deltas`)."""
    d = deltas
    return pd.DataFrame({
        "id": d["id"], "kind": d["kind"], "method": d["method"], "seed": d["seed"].astype(str),
        "status": d["status"], "params": d["params"].map(count), "FLOPs": d["flops"].map(giga),
        "ratio (params)": d["ratio_params"].map(ratio),
        **{f"test {_METRIC_LABEL[m]}": d[f"test_{m}"].map(score) for m in METRICS},
        "Δ Dice (pp)": d["d_test_dice"].map(pp), "Δ NSD@1 (pp)": d["d_test_nsd1"].map(pp),
        "control": d["control"].map(lambda c: "—" if c is None else str(c)),
        "updates": d["updates"].map(count),
        # a stopped cell that went on from its checkpoint: its earlier epochs count with nnU-Net's logged time
        "train time": [minutes(t) + ("" if pd.isna(e) else f" (resumed at epoch {int(e)})")
                       for t, e in zip(d["train_seconds"], d["resumed_at_epoch"])]})


def summary_table(groups: pd.DataFrame, split: str, within_pp: float) -> pd.DataFrame:
    """One row per group: seeds, ratio, mean ± std of the ``split`` scores and paired Δ."""
    g = groups
    return pd.DataFrame({
        "group": g["group"], "kind": g["kind"], "method": g["method"], "n seeds": g["n_seeds"].astype(str),
        "ratio (params)": g["ratio_params"].map(ratio),
        **{_METRIC_LABEL[m]: [mean_std(a, b) for a, b in zip(g[f"{split}_{m}_mean"], g[f"{split}_{m}_std"])]
           for m in METRICS},
        **{f"Δ {_METRIC_LABEL[m]} (pp)": [mean_std(a, b, pp) for a, b in
                                           zip(g[f"d_{split}_{m}_mean"], g[f"d_{split}_{m}_std"])]
           for m in ("dice", "nsd1")},
        f"within {within_pp:g} pp of control (Dice & NSD@1)": g[f"within_{split}"].map(yes_no)})


def _pareto_blocks(groups: pd.DataFrame, within_pp: float) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Pareto front")]
    for m in ("dice", "nsd1"):
        blocks.append(pareto_figure(groups, f"test_{m}", f"test {_METRIC_LABEL[m]}", f"pareto_{m}.png", within_pp))
    g = groups[groups["n_seeds"] > 0]
    front = g[pareto_mask(g["ratio_params"], g["test_dice_mean"])].sort_values("ratio_params")
    blocks += [Paragraph("Pareto-optimal groups: no other group has both a higher or equal mean parameter ratio "
                         "and a higher or equal mean test Dice, one of them higher."),
               Table(pd.DataFrame({
                   "group": front["group"], "method": front["method"],
                   "ratio (params)": front["ratio_params"].map(ratio),
                   **{f"test {_METRIC_LABEL[m]}": [mean_std(a, b) for a, b in
                                                   zip(front[f"test_{m}_mean"], front[f"test_{m}_std"])]
                      for m in ("dice", "nsd1")}}))]
    return blocks


def against_table(c: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per group of :func:`~medslim.report.load.method_comparison`'s table ``c``."""
    cols: dict[str, Any] = {
        "group": c["group"], "method": c["method"], "ratio (params)": c["ratio_params"].map(ratio),
        f"{method} group": c["baseline"],
        "pairs (seeds)": [f"{n} ({', '.join(map(str, s))})" for n, s in zip(c["n_pairs"], c["seeds"])]}
    for m in DELTA_METRICS:
        label = _METRIC_LABEL[m]
        cols[f"Δ {label} (pp)"] = [mean_std(a, b, pp) for a, b in zip(c[f"d_{m}_mean"], c[f"d_{m}_std"])]
        cols[f"p {label}"] = c[f"p_{m}"].map(p_value)
        cols[f"{label} vs {method}"] = c[f"verdict_{m}"]
    return pd.DataFrame(cols)


def _against_blocks(sweep: Sweep, method: str, alpha: float = 0.05) -> list[Block]:
    """Every other compressed method against ``method``, paired by seed and fine-tune; nothing when
    no cell has such a pair."""
    blocks: list[Block] = []
    for split in SPLITS:
        c = method_comparison(sweep.cells, method, split, alpha)
        if c.empty:
            return []
        blocks += [Heading(2, f"Methods against {method}, paired by seed ({_SPLIT_LABEL[split]})"),
                   Table(against_table(c, method))]
    return blocks + [Paragraph(
        f"Δ = the group's cell − the {method} cell of the same seed and fine-tune (of several, the one with the "
        f"closest parameter ratio), mean ± sample std over the pairs; p of a two-sided paired t-test. 'higher' or "
        f"'lower' only when p < {alpha:g}; 'not told apart' otherwise (also with one pair): the difference does "
        f"not exceed the seed spread.")]


def _layer_blocks(sweep: Sweep, groups: pd.DataFrame) -> list[Block]:
    tables = layer_tables(sweep, groups)
    blocks: list[Block] = [Heading(2, "Per-layer ranks and kept channels")]
    if not tables:
        return blocks + [Paragraph("No finished compressed cell lists its layers.")]
    for i, (group, t) in enumerate(tables.items()):
        blocks += [Heading(3, group),
                   Table(pd.DataFrame({"layer": t["name"], **{c: t[c].map(count) for c in t.columns[1:]}})),
                   layers_figure(t, group, f"layers_{i:02d}.png")]
    return blocks


def _per_class_blocks(sweep: Sweep, groups: pd.DataFrame) -> list[Block]:
    t = per_class_table(sweep, groups)
    blocks: list[Block] = [Heading(2, "Per-class results (test, mean over seeds)")]
    if t.empty or len(t.columns) == 1:
        return blocks + [Paragraph("No finished cell reports per-class scores.")]
    return blocks + [Table(pd.DataFrame({"group": t["group"], **{f"{c} {_METRIC_LABEL[m]}": t[(c, m)].map(score)
                                                                 for c, m in t.columns[1:]}}))]


# --- layout ---------------------------------------------------------------------------------------

def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of string cells (own code: ``DataFrame.to_markdown`` needs
    ``tabulate``, which medslim does not otherwise depend on)."""
    def cell(x: Any) -> str:
        return " ".join(str(x).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown; figures as ``![caption](report_figures/<name>)``."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Code):
            parts.append(f"```\n{b.text}\n```")
        elif isinstance(b, Table):
            parts.append(markdown_table(b.frame))
        else:
            parts.append(f"![{b.caption}]({FIGURE_DIR}/{b.name})")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}"
        "figcaption{font-size:13px;color:#444}pre{background:#f6f6f6;padding:0.5em}")


def to_html(blocks: list[Block]) -> str:
    """The report as one HTML page with its figures embedded as base64 PNG data URIs."""
    title = next((b.text for b in blocks if isinstance(b, Heading)), "medslim sweep report")
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Code):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Table):
            parts.append(b.frame.to_html(index=False, escape=True, border=0))
        else:
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                         f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def data_tables(sweep: Sweep, within_pp: float) -> tuple[str, str]:
    """The numbers behind the report as CSV text: one row per cell (with its control and
    paired Δ) and one per group (mean, std and paired Δ over seeds)."""
    if sweep.cells.empty:
        return "", ""
    deltas = paired_deltas(sweep.cells)
    groups = group_summary(deltas, within_pp)
    cells = deltas.drop(columns=["settings"]).assign(restored=deltas["id"].isin(sweep.restored))
    return cells.to_csv(index=False), groups.to_csv(index=False)


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, within_pp: float = 1.0,
                 against: str | None = "hvs", restore: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``report_figures/*.png`` for the sweep in
    ``sweep_dir`` into ``out_dir`` (default ``sweep_dir``), each atomically (a temporary sibling,
    then a rename; an earlier report is replaced), with ``cells.csv``/``groups.csv`` (the numbers).
    ``against`` names the method every other compressed method is compared with, paired by seed
    (a section only when such pairs exist; None: never). ``restore``: an earlier report's
    ``cells.csv`` that fills cells pending here (:func:`~medslim.report.load.restore_cells`).
    Returns the paths written: ``markdown``, ``html``, ``figures`` (the folder), ``cells``, ``groups``.

    Raises:
        MedslimError: a bad sweep folder (see :func:`~medslim.report.load.read_sweep`), a
            negative ``within_pp``, or an ``out_dir`` that cannot be a folder.
    """
    if not within_pp >= 0:
        raise MedslimError(f"within_pp must be ≥ 0 percentage points, got {within_pp}")
    sweep = read_sweep(sweep_dir)
    if restore is not None:
        sweep = restore_cells(sweep, restore)
    blocks = build_blocks(sweep, within_pp, against)  # everything is rendered before anything is written
    markdown, page = to_markdown(blocks), to_html(blocks)
    out = Path(out_dir).expanduser() if out_dir is not None else sweep.folder
    if out.exists() and not out.is_dir():
        raise MedslimError(f"output {out} exists and is not a folder")
    with atomic_folder(out / FIGURE_DIR, overwrite=True) as tmp:
        for fig in blocks:
            if isinstance(fig, Figure):
                (tmp / fig.name).write_bytes(fig.png)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "figures": out / FIGURE_DIR,
             "cells": out / "cells.csv", "groups": out / "groups.csv"}
    cells, groups = data_tables(sweep, within_pp)
    for key, text in (("markdown", markdown), ("html", page), ("cells", cells), ("groups", groups)):
        with atomic_file(paths[key], overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
