"""Summaries of per-case scores and the output folder (per_case.csv, summary.json, summary.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medslim.atomic import atomic_folder, check_output_folder

METRICS = ("dice", "nsd")


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _stats(values: pd.Series) -> dict[str, float | None]:
    v = values.dropna()
    return {"mean": _num(float(v.mean())) if len(v) else None, "median": _num(float(v.median())) if len(v) else None}


def summarize(per_case: pd.DataFrame, tolerance: float) -> dict[str, Any]:
    """Mean and median per class and overall (SPEC §7: per case, the mean over the classes
    present in the reference, then over cases), and which cases had an empty reference.

    Args:
        per_case: rows as :func:`medslim.evaluate.evaluate_case`.

    Returns:
        ``{"tolerance_mm", "n_cases", "cases", "overall": {metric: {mean, median}},
        "classes": {name: {id, n_cases, dice, nsd, empty_reference: [cases]}},
        "empty_cases": [cases whose reference has none of the classes]}``; means of no values
        are null.
    """
    cases = list(dict.fromkeys(per_case["case"]))
    per_case_mean = per_case.groupby("case", sort=False)[list(METRICS)].mean()
    classes = {}
    for (cid, name), rows in per_case.groupby(["class_id", "class"], sort=True):
        present = rows["ref_voxels"] > 0
        classes[str(name)] = {"id": int(cid), "n_cases": int(present.sum()),
                              **{m: _stats(rows[m]) for m in METRICS},
                              "empty_reference": rows.loc[~present, "case"].tolist()}
    return {"tolerance_mm": float(tolerance), "n_cases": len(cases), "cases": cases,
            "overall": {m: _stats(per_case_mean[m]) for m in METRICS},
            "classes": classes,
            "empty_cases": [c for c in cases if per_case_mean.loc[c].isna().all()]}


def markdown_table(summary: dict[str, Any], max_rows: int | None = None) -> str:
    """Markdown table: one row per class with a reference in some case, then the overall row."""
    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.4f}"

    lines = [f"NSD tolerance {summary['tolerance_mm']:g} mm, {summary['n_cases']} case(s).", "",
             "| class | n | Dice mean | Dice median | NSD mean | NSD median |", "|---|---:|---:|---:|---:|---:|"]
    rows = [(k, v) for k, v in summary["classes"].items() if v["n_cases"]]
    shown = rows if max_rows is None else rows[:max_rows]
    for name, v in shown:
        lines.append(f"| {name} | {v['n_cases']} | {f(v['dice']['mean'])} | {f(v['dice']['median'])} | "
                     f"{f(v['nsd']['mean'])} | {f(v['nsd']['median'])} |")
    if len(shown) < len(rows):
        lines.append(f"| … {len(rows) - len(shown)} more | | | | | |")
    o = summary["overall"]
    lines.append(f"| **all (mean over cases)** | {summary['n_cases']} | {f(o['dice']['mean'])} | "
                 f"{f(o['dice']['median'])} | {f(o['nsd']['mean'])} | {f(o['nsd']['median'])} |")
    return "\n".join(lines) + "\n"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite`` (checked before any work)."""
    out = Path(out).expanduser()
    check_output_folder(out, overwrite)
    return out


def write_outputs(out: str | Path, per_case: pd.DataFrame, summary: dict[str, Any], extra: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """Write ``per_case.csv``, ``summary.json`` and ``summary.md`` to ``out`` (atomically)."""
    with atomic_folder(out, overwrite) as tmp:
        per_case.to_csv(tmp / "per_case.csv", index=False, float_format="%.10g")
        body = {**extra, **summary}
        (tmp / "summary.json").write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
        (tmp / "summary.md").write_text(markdown_table(summary))
    return Path(out).expanduser().resolve()


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return _num(float(x))
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")
