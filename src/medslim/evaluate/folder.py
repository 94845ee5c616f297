"""Score one case or a whole folder: per-case, per-class Dice and NSD as pandas frames."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medslim.errors import MedslimError
from medslim.evaluate.layouts import (Case, Dataset, LabelMap, check_same_grid, find_cases, labels_present,
                                      read_label_map, select_classes)
from medslim.evaluate.metrics import score_label_maps

COLUMNS = ["case", "class_id", "class", "dice", "nsd", "ref_voxels", "pred_voxels"]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _as_label_map(x: str | Path | np.ndarray | LabelMap, spacing: Sequence[float] | None,
                  classes: dict[int, str] | None, what: str) -> LabelMap:
    if isinstance(x, LabelMap):
        return x
    if isinstance(x, np.ndarray):
        if spacing is None:
            raise MedslimError(f"{what} is an array: give its voxel spacing in mm")
        if x.ndim != 3 or x.dtype.kind not in "iub" or (x.size and x.min() < 0):
            raise MedslimError(f"{what} must be a 3D non-negative integer array, got {x.dtype} {x.shape}")
        x = x.view(np.uint8) if x.dtype == bool else x
        return LabelMap(x, np.diag([*map(float, spacing), 1.0]), tuple(float(s) for s in spacing), what)
    return read_label_map(x, classes)


def evaluate_case(pred: str | Path | np.ndarray | LabelMap, ref: str | Path | np.ndarray | LabelMap, *,
                  class_map: dict[int, str] | None = None, labels: Sequence[int] | None = None,
                  tolerance: float = 3.0, spacing: Sequence[float] | None = None,
                  case: str = "case") -> pd.DataFrame:
    """Dice and NSD of every class of one case (SPEC §7).

    Args:
        pred, ref: multi-label NIfTI files, per-structure folders (need ``class_map``), label
            maps, or integer arrays ``[X, Y, Z]`` (then ``spacing`` in mm is required; with
            files the spacing comes from the reference header).
        class_map: ``{id: name}``; label values outside it are an error. ``None``: the ids
            present in either map, named by their id.
        labels: subset of ids to score (default: all of ``class_map``).
        tolerance: NSD tolerance in mm.

    Returns:
        One row per class, columns ``case, class_id, class, dice, nsd, ref_voxels,
        pred_voxels``; ``dice``/``nsd`` NaN where the reference lacks the class, 0 where only
        the prediction lacks it.

    Raises:
        MedslimError: unreadable files, shape/affine mismatch, label values outside ``class_map``.
    """
    r = _as_label_map(ref, spacing, class_map, f"reference of case {case}")
    p = _as_label_map(pred, spacing, class_map, f"prediction of case {case}")
    check_same_grid(r, p, case)
    if class_map is not None:
        for lm, what in ((r, "reference"), (p, "prediction")):
            bad = sorted(set(labels_present(lm.array)) - set(class_map))
            if bad:
                raise MedslimError(f"case {case}: {what} {lm.source} has label(s) {bad[:5]} outside the "
                                   f"{len(class_map)}-class map (ids {min(class_map)}..{max(class_map)})")
        ids = list(class_map) if labels is None else list(labels)
    else:
        ids = sorted(set(labels_present(r.array)) | set(labels_present(p.array))) if labels is None else list(labels)
    s = score_label_maps(r.array, p.array, r.spacing, ids, tolerance)
    names = [class_map.get(i, str(i)) if class_map else str(i) for i in ids]
    return pd.DataFrame({"case": case, "class_id": s.labels, "class": names, "dice": s.dice, "nsd": s.nsd,
                         "ref_voxels": s.ref_voxels, "pred_voxels": s.pred_voxels}, columns=COLUMNS)


def _score(case: Case, classes: dict[int, str] | None, labels: list[int] | None, tolerance: float) -> pd.DataFrame:
    return evaluate_case(case.pred, case.ref, class_map=classes, labels=labels, tolerance=tolerance, case=case.name)


def _complete(frame: pd.DataFrame, cases: Sequence[str]) -> pd.DataFrame:
    """Without a class map, give every case a row for every class seen anywhere (NaN: absent)."""
    names = frame.drop_duplicates("class_id").set_index("class_id")["class"]
    grid = pd.MultiIndex.from_product([list(cases), sorted(names.index)], names=["case", "class_id"])
    out = frame.set_index(["case", "class_id"]).reindex(grid).reset_index()
    out["class"] = out["class_id"].map(names)
    out[["ref_voxels", "pred_voxels"]] = out[["ref_voxels", "pred_voxels"]].fillna(0).astype(np.int64)
    return out[COLUMNS]


def score_dataset(data: Dataset, *, labels: list[int] | None = None, tolerance: float = 3.0,
                  workers: int | None = None, console: Console | None = None) -> pd.DataFrame:
    """Score every case of ``data`` in ``workers`` processes with a progress bar; rows as
    :func:`evaluate_case`, cases in ``data`` order. The first bad case stops the run."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise MedslimError(f"--workers must be >= 1, got {workers}")
    results: dict[str, pd.DataFrame] = {}
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[case]}"),
                  TimeElapsedColumn(), console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scoring", total=len(data.cases), case="")
        if workers == 1 or len(data.cases) == 1:
            for c in data.cases:
                bar.update(task, case=c.name)
                results[c.name] = _score(c, data.classes, labels, tolerance)
                bar.advance(task)
        else:
            # spawn: the parent may hold torch threads (--model), which fork can deadlock on.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(data.cases)), mp_context=ctx) as pool:
                futures = {pool.submit(_score, c, data.classes, labels, tolerance): c.name for c in data.cases}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        if f.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise f.exception()
                        results[futures[f]] = f.result()
                        bar.update(task, advance=1, case=futures[f])
    frame = pd.concat([results[c.name] for c in data.cases], ignore_index=True)
    return frame if data.classes is not None else _complete(frame, [c.name for c in data.cases])


def evaluate_folder(pred: str | Path, ref: str | Path, *, tolerance: float = 3.0,
                    classes: Sequence[str] | None = None, split: str | None = None,
                    dataset_json: str | Path | None = None, workers: int | None = None,
                    console: Console | None = None) -> pd.DataFrame:
    """Dice and NSD of every case and class of a prediction folder against a reference
    folder (nnU-Net or TotalSegmentator layout, see :mod:`medslim.evaluate.layouts`).

    Args:
        classes: names or ids to score (default: the whole class map, or all ids present).
        split: TotalSegmentator layout only: score the cases of this ``meta.csv`` split.
        dataset_json: nnU-Net ``dataset.json`` naming the labels.
        workers: processes (default ``min(2, cpu_count)``).

    Returns:
        Rows as :func:`evaluate_case`, one per case and class.

    Raises:
        MedslimError: see :func:`find_cases` and :func:`evaluate_case`.
    """
    if not tolerance >= 0:
        raise MedslimError(f"--tolerance must be >= 0 mm, got {tolerance}")
    data = find_cases(pred, ref, split, dataset_json)
    return score_dataset(data, labels=select_classes(data.classes, classes), tolerance=tolerance,
                         workers=workers, console=console)
