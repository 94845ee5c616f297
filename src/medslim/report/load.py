"""Read a sweep folder (written by ``medslim sweep``) into tables: one row per cell, paired Δ
vs the control of the same seed, one row per group (mean ± sample std over seeds), the Pareto
set, per-class and per-layer tables. Pure functions of the files: nothing here draws or writes.

Layout read::

    SWEEP_DIR/sweep.json                  {"name", "grid", "finetune", "seeds", ...} (optional)
    SWEEP_DIR/cells/<id>/cell.json        {"id", "kind", "group", "method", "seed", "settings"}
    SWEEP_DIR/cells/<id>/result.json      finished: params, flops, ratios, metrics, layers, ...
    SWEEP_DIR/cells/<id>/error.json       failed: {"error": one line, "traceback": ...}

A cell with neither ``result.json`` nor ``error.json`` is pending. Metrics are fractions
(Dice 0.87); Δ columns are fractions too (the renderer shows percentage points).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from medslim.errors import MedslimError

KINDS = ("original", "control", "compressed", "scratch", "scratch_full")  # display order
SPLITS = ("test", "val")
METRICS = ("dice", "nsd1", "nsd3")
DELTA_METRICS = ("dice", "nsd1")
# the fine-tune settings a cell shares with its control (the rest describe the compression)
FINETUNE_KEYS = ("optimizer", "lr", "epochs", "iterations", "kd_weight", "kd_temperature", "lr_schedule",
                 "weight_decay")
_CELL_KEYS = ("id", "kind", "group", "method", "seed")
# a finished cell's numbers besides its scores (read from result.json, or restored from a cells.csv)
_RESULT_KEYS = ("params", "flops", "ratio_params", "ratio_flops", "updates", "train_seconds", "cpu_seconds",
                "resumed_at_epoch")
_SCORE_COLUMNS = tuple(f"{s}_{m}" for s in SPLITS for m in METRICS)


@dataclass(frozen=True)
class Sweep:
    """A sweep folder as read: ``cells`` has one row per cell (columns: ``id kind group method seed
    status error settings params flops ratio_params ratio_flops updates train_seconds cpu_seconds``
    and ``<split>_<metric>`` for split in ``SPLITS``, metric in ``METRICS``); ``results`` maps the id
    of each finished cell to its ``result.json``."""

    folder: Path
    name: str
    meta: dict[str, Any]
    cells: pd.DataFrame
    results: dict[str, dict[str, Any]]
    restored: tuple[str, ...] = ()  # ids of cells whose numbers came from an earlier cells.csv

    @property
    def seeds(self) -> list[int]:
        """The seeds of the cells (not ``sweep.json``'s: several sweep files may run in one folder)."""
        if self.cells.empty:
            return []
        return sorted({int(s) for s, k in zip(self.cells["seed"], self.cells["kind"]) if k != "original"})

    def counts(self) -> dict[str, int]:
        """Cells per status: ``{"ok": n, "failed": n, "pending": n}``."""
        return {s: int((self.cells["status"] == s).sum()) for s in ("ok", "failed", "pending")}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        MedslimError: unreadable file, invalid JSON, or not an object (the message names ``path``).
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise MedslimError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MedslimError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise MedslimError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_sweep(folder: str | Path) -> Sweep:
    """Read every cell of the sweep in ``folder`` (cells sorted by kind, group, seed).

    Raises:
        MedslimError: ``folder`` or ``folder/cells`` missing, a malformed JSON file, a cell without
            a definition or missing a key, two cells with the same id (messages name the file).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MedslimError(f"sweep folder {folder} does not exist or is not a folder")
    cells_dir = folder / "cells"
    if not cells_dir.is_dir():
        raise MedslimError(f"{folder} has no cells/ folder; expected a folder written by medslim sweep")
    meta = read_json(folder / "sweep.json") if (folder / "sweep.json").is_file() else {}
    rows, results, seen = [], {}, set()
    for cell_dir in sorted(p for p in cells_dir.iterdir() if p.is_dir()):
        result = read_json(cell_dir / "result.json") if (cell_dir / "result.json").is_file() else None
        error = read_json(cell_dir / "error.json") if (cell_dir / "error.json").is_file() else None
        cell, source = _definition(cell_dir, result, error)
        row = cell_row(cell, result, error, source)
        if row["id"] in seen:
            raise MedslimError(f"{source}: cell id '{row['id']}' is used by another cell too")
        seen.add(row["id"])
        rows.append(row)
        if result is not None:
            results[row["id"]] = result
    cells = pd.DataFrame(rows, columns=list(_row_columns()))
    if len(cells):
        order = {k: i for i, k in enumerate(KINDS)}
        cells = (cells.assign(_k=cells["kind"].map(lambda k: order.get(k, len(KINDS))))
                 .sort_values(["_k", "group", "seed", "id"], kind="stable").drop(columns="_k")
                 .reset_index(drop=True))
    return Sweep(folder, str(meta.get("name") or folder.name), meta, cells, results)


_RESTORED_COLUMNS = (*_RESULT_KEYS, *_SCORE_COLUMNS)


def restore_cells(sweep: Sweep, csv: str | Path) -> Sweep:
    """``sweep`` with its pending cells filled from ``csv``, the ``cells.csv`` of an earlier report
    (e.g. of a sweep folder that was lost): a cell pending here and ``ok`` there takes that row's
    sizes, times and scores. Per-class scores and per-layer ranks are not in a CSV, so those
    tables leave restored cells out. Finished and failed cells here are never replaced.

    Raises:
        MedslimError: ``csv`` unreadable or without the columns of ``cells.csv``, or a row whose
            kind, group, method or seed differs from the cell of the same id here.
    """
    try:
        old = pd.read_csv(Path(csv).expanduser(), dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise MedslimError(f"{csv}: cannot be read as a cells.csv ({' '.join(str(e).split())})") from None
    missing = [c for c in (*_CELL_KEYS, "status", *_RESTORED_COLUMNS) if c not in old.columns]
    if missing:
        raise MedslimError(f"{csv}: not a cells.csv of medslim report (missing column(s) {', '.join(missing)})")
    old = old[old["status"] == "ok"].set_index("id")
    cells, results, restored = sweep.cells.copy(), dict(sweep.results), []
    for i, row in cells.iterrows():
        if row["status"] != "pending" or row["id"] not in old.index:
            continue
        prior = old.loc[row["id"]]
        for key in _CELL_KEYS[1:]:
            if str(prior[key]) != str(row[key]):
                raise MedslimError(f"{csv}: cell {row['id']} has {key} {prior[key]} there but {row[key]} "
                                   f"in {sweep.folder}; not the same sweep")
        for col in _RESTORED_COLUMNS:
            cells.at[i, col] = _num(prior[col])
        cells.at[i, "status"] = "ok"
        results[row["id"]] = {"restored_from": str(csv)}
        restored.append(str(row["id"]))
    return replace(sweep, cells=cells, results=results, restored=sweep.restored + tuple(restored))


def _definition(cell_dir: Path, result: dict | None, error: dict | None) -> tuple[dict[str, Any], Path]:
    """The cell's definition: ``cell.json``, else the copy inside ``result.json``/``error.json``."""
    if (cell_dir / "cell.json").is_file():
        return read_json(cell_dir / "cell.json"), cell_dir / "cell.json"
    for name, data in (("result.json", result), ("error.json", error)):
        if data is not None and isinstance(data.get("cell"), dict):
            return data["cell"], cell_dir / name
    raise MedslimError(f"{cell_dir / 'cell.json'} is missing (a cell folder needs its definition)")


def _row_columns() -> tuple[str, ...]:
    return (*_CELL_KEYS, "status", "error", "settings", *_RESULT_KEYS, *_SCORE_COLUMNS)


def cell_row(cell: Mapping[str, Any], result: Mapping[str, Any] | None, error: Mapping[str, Any] | None,
             source: Path | str = "cell.json") -> dict[str, Any]:
    """One row of :attr:`Sweep.cells` from a cell's definition and its result or error (a result
    wins over an error). Missing or null numbers are NaN.

    Raises:
        MedslimError: the definition lacks a key of ``id kind group method seed`` or has a
            non-integer seed (the message names ``source``).
    """
    missing = [k for k in _CELL_KEYS if cell.get(k) is None]
    if missing:
        raise MedslimError(f"{source}: missing key(s) {', '.join(map(repr, missing))}; "
                           f"a cell needs {', '.join(_CELL_KEYS)}")
    try:
        seed = int(cell["seed"])
    except (TypeError, ValueError):
        raise MedslimError(f"{source}: seed must be an integer, got {cell['seed']!r}") from None
    settings = cell.get("settings") or {}
    row: dict[str, Any] = {"id": str(cell["id"]), "kind": str(cell["kind"]), "group": str(cell["group"]),
                           "method": str(cell["method"]), "seed": seed,
                           "status": "ok" if result is not None else "failed" if error is not None else "pending",
                           "error": None, "settings": dict(settings) if isinstance(settings, dict) else {}}
    if result is None and error is not None:
        row["error"] = " ".join(str(error.get("error") or "failed (no message)").split())
    res = result or {}
    for key in _RESULT_KEYS:
        row[key] = _num(res.get(key))
    metrics = res.get("metrics") or {}
    for split in SPLITS:
        scores = metrics.get(split) or {}
        for m in METRICS:
            row[f"{split}_{m}"] = _num(scores.get(m))
    return row


def _num(x: Any) -> float:
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def finetune_key(settings: Mapping[str, Any]) -> tuple:
    """The fine-tune settings (``FINETUNE_KEYS``) of a cell, comparable between cells."""
    return tuple(settings.get(k) for k in FINETUNE_KEYS)


def same_seed_and_finetune(candidates: pd.DataFrame, seed: int, settings: Mapping[str, Any]) -> pd.DataFrame:
    """The rows of ``candidates`` (cells) with this seed and the fine-tune settings of ``settings``:
    the cells a cell is paired with."""
    same_seed = candidates[candidates["seed"] == seed]
    key = finetune_key(settings)
    return same_seed[np.array([finetune_key(s) == key for s in same_seed["settings"]], dtype=bool)]


def match_controls(cells: pd.DataFrame) -> pd.Series:
    """For each cell, the id of its control (or None): the finished ``control`` cell with the same
    seed and the same fine-tune settings. A control of another fine-tune is no control (the Δ
    would mix the method with the budget), so a cell whose own control is not finished has none.
    A control is its own control (Δ = 0)."""
    controls = cells[(cells["kind"] == "control") & (cells["status"] == "ok")]

    def pick(seed: int, settings: Mapping[str, Any]) -> str | None:
        exact = same_seed_and_finetune(controls, seed, settings)
        return str(exact["id"].iloc[0]) if len(exact) else None

    return pd.Series([pick(s, st) for s, st in zip(cells["seed"], cells["settings"])], index=cells.index,
                     dtype=object)


def paired_deltas(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` plus ``control`` (the matched control's id, see :func:`match_controls`) and
    ``d_<split>_<metric>`` = cell − its control, for metric in ``DELTA_METRICS`` (NaN without a
    control or a score)."""
    out = cells.copy()
    out["control"] = match_controls(cells)
    by_id = cells.set_index("id")
    for split in SPLITS:
        for m in DELTA_METRICS:
            col = f"{split}_{m}"
            ref = out["control"].map(lambda c: by_id.at[c, col] if c is not None else np.nan).astype(float)
            out[f"d_{col}"] = out[col].astype(float) - ref
    return out


def group_summary(deltas: pd.DataFrame, within_pp: float = 1.0) -> pd.DataFrame:
    """One row per group (in the cells' order), over its finished cells (seeds): ``n_seeds``,
    ``seeds``, ``n_failed``, ``n_pending``, mean ``params``/``flops``/``ratio_params``/``ratio_flops``,
    ``<col>_mean`` and ``<col>_std`` (sample std, NaN for one seed) of every score and Δ column of
    ``deltas`` (from :func:`paired_deltas`), and ``within_<split>``: True when the mean paired Δ of
    Dice and of NSD@1 are both ≥ −``within_pp`` percentage points, None without a Δ."""
    score_cols = [f"{s}_{m}" for s in SPLITS for m in METRICS] + [f"d_{s}_{m}" for s in SPLITS for m in DELTA_METRICS]
    rows = []
    for group, g in deltas.groupby("group", sort=False):
        done = g[g["status"] == "ok"]
        row: dict[str, Any] = {"group": group, "kind": g["kind"].iloc[0], "method": g["method"].iloc[0],
                               "n_seeds": len(done), "seeds": sorted(int(s) for s in done["seed"]),
                               "n_failed": int((g["status"] == "failed").sum()),
                               "n_pending": int((g["status"] == "pending").sum())}
        for col in ("params", "flops", "ratio_params", "ratio_flops"):
            row[col] = done[col].mean()
        for col in score_cols:
            row[f"{col}_mean"], row[f"{col}_std"] = done[col].mean(), done[col].std(ddof=1)
        for split in SPLITS:
            means = [row[f"d_{split}_{m}_mean"] for m in DELTA_METRICS]
            row[f"within_{split}"] = None if any(np.isnan(means)) else bool(min(means) >= -within_pp / 100)
        rows.append(row)
    return pd.DataFrame(rows)


def match_baselines(cells: pd.DataFrame, method: str) -> pd.Series:
    """For each compressed cell of another method, the id of the finished compressed cell of
    ``method`` with the same seed and fine-tune settings (of several, the one whose parameter ratio
    is closest); None for the rest. Pairs by seed, like :func:`match_controls`."""
    base = cells[(cells["kind"] == "compressed") & (cells["method"] == method) & (cells["status"] == "ok")]

    def pick(row: pd.Series) -> str | None:
        if row["kind"] != "compressed" or row["method"] == method:
            return None
        same = same_seed_and_finetune(base, row["seed"], row["settings"])
        if same.empty:
            return None
        gap = (same["ratio_params"] - row["ratio_params"]).abs().fillna(np.inf)
        return str(same["id"].iloc[int(np.argmin(gap.to_numpy()))])

    return pd.Series([pick(r) for _, r in cells.iterrows()], index=cells.index, dtype=object)


def method_comparison(cells: pd.DataFrame, method: str, split: str = "test", alpha: float = 0.05) -> pd.DataFrame:
    """Each compressed group of another method against ``method``'s cells of the same seeds and
    fine-tune (:func:`match_baselines`): one row per group with a finished pair, in the cells'
    order, with ``group method ratio_params baseline n_pairs seeds``, and for metric in
    ``DELTA_METRICS`` ``d_<metric>_mean``/``_std`` (paired Δ = group − baseline, fractions; sample
    std), ``p_<metric>`` (two-sided paired t-test, ``scipy.stats.ttest_rel``; NaN under 2 pairs or
    when every Δ is equal) and ``verdict_<metric>``: ``"higher"``/``"lower"`` when p < ``alpha``,
    else ``"not told apart"`` (the difference does not exceed the seed spread)."""
    from scipy.stats import ttest_rel

    if cells.empty:
        return pd.DataFrame()
    paired = cells.assign(baseline=match_baselines(cells, method))
    paired = paired[paired["baseline"].notna() & (paired["status"] == "ok")]
    by_id = cells.set_index("id")
    rows = []
    for group, g in paired.groupby("group", sort=False):
        row: dict[str, Any] = {"group": group, "method": g["method"].iloc[0], "ratio_params": g["ratio_params"].mean(),
                               "baseline": ", ".join(sorted(set(by_id.loc[g["baseline"], "group"]))),
                               "n_pairs": len(g), "seeds": sorted(int(s) for s in g["seed"])}
        for m in DELTA_METRICS:
            a = g[f"{split}_{m}"].to_numpy(float)
            b = by_id.loc[g["baseline"], f"{split}_{m}"].to_numpy(float)
            d = a - b
            several = len(d) > 1
            row[f"d_{m}_mean"] = float(np.mean(d))
            row[f"d_{m}_std"] = float(np.std(d, ddof=1)) if several else float("nan")
            p = float(ttest_rel(a, b).pvalue) if several and np.ptp(d) > 0 else float("nan")
            row[f"p_{m}"] = p
            row[f"verdict_{m}"] = "not told apart" if not p < alpha else "higher" if np.mean(d) > 0 else "lower"
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_mask(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series) -> np.ndarray:
    """Boolean mask of the points not dominated when both ``x`` and ``y`` are maximised: no other
    point is ≥ in both and > in one (equal points are all kept). NaN points are never optimal."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xo, yo = x[None, :], y[None, :]  # dominated[i, j]: point j dominates point i (NaN compares False)
    dominated = (xo >= x[:, None]) & (yo >= y[:, None]) & ((xo > x[:, None]) | (yo > y[:, None]))
    return ~(np.isnan(x) | np.isnan(y)) & ~dominated.any(axis=1)


def per_class_table(sweep: Sweep, groups: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean per-class scores over the finished seeds of each group: one row per group with at
    least one finished cell, columns ``group`` and ``(<class>, <metric>)`` tuples (classes in the
    order they first appear; NaN where no seed scored the class)."""
    cells = sweep.cells[sweep.cells["status"] == "ok"]
    classes: list[str] = []
    rows = []
    for group in groups.loc[groups["n_seeds"] > 0, "group"]:
        per_seed = [((sweep.results[c].get("metrics") or {}).get(split) or {}).get("per_class") or {}
                    for c in cells.loc[cells["group"] == group, "id"]]
        classes += [str(k) for pc in per_seed for k in pc if str(k) not in classes]
        row: dict[Any, Any] = {"group": group}
        for cls in classes:
            for m in METRICS:
                vals = [_num((pc.get(cls) or {}).get(m)) for pc in per_seed if cls in pc]
                row[(cls, m)] = float(np.nanmean(vals)) if vals and not np.all(np.isnan(vals)) else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["group", *((c, m) for c in classes for m in METRICS)])


def layer_tables(sweep: Sweep, groups: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per compressed group with a finished cell that lists layers: the first seed's ``layers``
    (columns ``name rank_in rank_out channels_in channels_out kept``; NaN where not given, e.g.
    a layer kept dense or not pruned), keyed by group."""
    cells = sweep.cells[(sweep.cells["status"] == "ok") & (sweep.cells["kind"] == "compressed")]
    out = {}
    for group in groups["group"]:
        g = cells[cells["group"] == group].sort_values("seed")
        layers = next((sweep.results[c].get("layers") for c in g["id"] if sweep.results[c].get("layers")), None)
        if layers:
            cols = ("name", "rank_in", "rank_out", "channels_in", "channels_out", "kept")
            out[group] = pd.DataFrame([{c: (str(l.get(c)) if c == "name" else _num(l.get(c))) for c in cols}
                                       for l in layers], columns=list(cols))
    return out
