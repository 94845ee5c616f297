"""Summaries of per-case scores and the output folder (per_case.csv, summary.json, summary.md).

Rows travel as a :data:`Table` (one NumPy array per column); pandas is imported only to turn
one into a frame for the Python API.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping, Sequence

import numpy as np

from medslim.atomic import atomic_folder, check_output_folder

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("dice", "nsd")
COLUMNS = ["case", "class_id", "class", "dice", "nsd", "ref_voxels", "pred_voxels"]
Table = dict[str, np.ndarray]  # {column of COLUMNS: [rows]}, one row per case and class


def as_table(per_case: pd.DataFrame | Mapping[str, Any]) -> Table:
    """The :data:`COLUMNS` of a per-case frame (or table) as NumPy arrays."""
    return {c: np.asarray(per_case[c]) for c in COLUMNS}


def to_frame(table: Mapping[str, Any]) -> pd.DataFrame:
    """A pandas frame with the :data:`COLUMNS` of ``table``."""
    import pandas as pd

    return pd.DataFrame({c: table[c] for c in COLUMNS}, columns=COLUMNS)


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[~np.isnan(values)]


def _nanmean(values: np.ndarray) -> float:
    v = _finite(values)
    return float(v.mean()) if len(v) else math.nan


def _stats(values: np.ndarray) -> dict[str, float | None]:
    v = _finite(values)
    return {"mean": float(v.mean()), "median": float(np.median(v))} if len(v) else {"mean": None, "median": None}


def _groups(keys: Sequence[Hashable]) -> tuple[list[Hashable], list[np.ndarray]]:
    """Distinct ``keys`` in first-seen order and the ascending row indices of each."""
    index: dict[Hashable, int] = {}
    if not keys:
        return [], []
    codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), np.int64, len(keys))
    order = np.argsort(codes, kind="stable")
    return list(index), np.split(order, np.cumsum(np.bincount(codes, minlength=len(index)))[:-1])


def summarize(per_case: pd.DataFrame | Mapping[str, Any], tolerance: float) -> dict[str, Any]:
    """Mean and median per class and overall (SPEC §7: per case, the mean over the classes
    present in the reference, then over cases), and which cases had an empty reference.

    Args:
        per_case: rows as :func:`medslim.evaluate.evaluate_case` (a frame or a :data:`Table`).

    Returns:
        ``{"tolerance_mm", "n_cases", "cases", "overall": {metric: {mean, median}},
        "classes": {name: {id, n_cases, dice, nsd, empty_reference: [cases]}},
        "empty_cases": [cases whose reference has none of the classes]}``; means of no values
        are null.
    """
    t = as_table(per_case)
    cases, case_rows = _groups(t["case"].tolist())
    case_mean = {m: np.array([_nanmean(t[m][rows]) for rows in case_rows]) for m in METRICS}
    keys, class_rows = _groups(list(zip(t["class_id"].tolist(), t["class"].tolist())))
    classes = {}
    for (cid, name), rows in sorted(zip(keys, class_rows), key=lambda kv: kv[0]):
        present = t["ref_voxels"][rows] > 0
        classes[str(name)] = {"id": int(cid), "n_cases": int(present.sum()),
                              **{m: _stats(t[m][rows]) for m in METRICS},
                              "empty_reference": t["case"][rows][~present].tolist()}
    return {"tolerance_mm": float(tolerance), "n_cases": len(cases), "cases": cases,
            "overall": {m: _stats(case_mean[m]) for m in METRICS},
            "classes": classes,
            "empty_cases": [c for i, c in enumerate(cases) if all(np.isnan(case_mean[m][i]) for m in METRICS)]}


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


def write_csv(path: Path, per_case: pd.DataFrame | Mapping[str, Any]) -> None:
    """``per_case.csv`` as pandas' ``to_csv(index=False, float_format="%.10g")`` writes it
    (NaN as an empty field)."""
    t = as_table(per_case)
    cols = [["" if v != v else "%.10g" % v for v in t[c].tolist()] if t[c].dtype.kind == "f" else t[c].tolist()
            for c in COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(zip(*cols))


def write_outputs(out: str | Path, per_case: pd.DataFrame | Mapping[str, Any], summary: dict[str, Any],
                  extra: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``per_case.csv``, ``summary.json`` and ``summary.md`` to ``out`` (atomically)."""
    with atomic_folder(out, overwrite) as tmp:
        write_csv(tmp / "per_case.csv", per_case)
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
