"""Score one case or a whole folder: per-case, per-class Dice and NSD.

Scoring returns NumPy columns (a :data:`~medslim.evaluate.outputs.Table`); pandas frames are
built only for the Python API (``evaluate_case``, ``evaluate_folder``), so ``medslim evaluate``
and its worker processes start without importing pandas.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from rich.console import Console

from medslim.errors import MedslimError
from medslim.evaluate.layouts import (Case, Dataset, LabelMap, check_same_grid, find_cases, labels_present,
                                      read_label_map, select_classes)
from medslim.evaluate.metrics import ClassScores, score_label_maps
from medslim.evaluate.outputs import Table, summarize, to_frame

if TYPE_CHECKING:
    import pandas as pd

# What starting the spawned workers costs, in seconds: each is a fresh interpreter importing
# numpy, scipy.ndimage, nibabel and medslim, side by side. `medslim evaluate --workers 2` took
# 0.8-1.2 s longer than `--workers 1` on two 5 ms cases (shared 2-core machine).
POOL_START_SECONDS = 1.0


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


def score_case(pred: str | Path | np.ndarray | LabelMap, ref: str | Path | np.ndarray | LabelMap, *,
               class_map: dict[int, str] | None = None, labels: Sequence[int] | None = None,
               tolerance: float = 3.0, spacing: Sequence[float] | None = None, case: str = "case") -> ClassScores:
    """:func:`evaluate_case` without pandas: the case's scores as arrays."""
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
    return score_label_maps(r.array, p.array, r.spacing, ids, tolerance)


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
    s = score_case(pred, ref, class_map=class_map, labels=labels, tolerance=tolerance, spacing=spacing, case=case)
    return to_frame(_rows(case, s, class_map))


def _score(case: Case, classes: dict[int, str] | None, labels: list[int] | None, tolerance: float) -> ClassScores:
    return score_case(case.pred, case.ref, class_map=classes, labels=labels, tolerance=tolerance, case=case.name)


def _rows(case: str, s: ClassScores, class_map: dict[int, str] | None) -> Table:
    names = [class_map.get(i, str(i)) if class_map else str(i) for i in s.labels.tolist()]
    return {"case": np.full(len(names), case, object), "class_id": s.labels, "class": np.array(names, object),
            "dice": s.dice, "nsd": s.nsd, "ref_voxels": s.ref_voxels, "pred_voxels": s.pred_voxels}


def _complete(scores: list[ClassScores]) -> list[ClassScores]:
    """Without a class map, give every case a row for every class seen anywhere (NaN: absent)."""
    ids = np.unique(np.concatenate([s.labels for s in scores]))
    out = []
    for s in scores:
        at = np.searchsorted(ids, s.labels)
        dice, nsd = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        nref, npred = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
        dice[at], nsd[at], nref[at], npred[at] = s.dice, s.nsd, s.ref_voxels, s.pred_voxels
        out.append(ClassScores(ids, dice, nsd, nref, npred))
    return out


def _table(data: Dataset, scores: dict[str, ClassScores]) -> Table:
    ordered = [scores[c.name] for c in data.cases]
    if data.classes is None:
        ordered = _complete(ordered)
    parts = [_rows(c.name, s, data.classes) for c, s in zip(data.cases, ordered)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _pool_pays(elapsed: float, done: int, remaining: int, workers: int) -> bool:
    """Would ``workers`` spawned processes finish the ``remaining`` cases sooner than this one,
    judging by the ``done`` cases that took ``elapsed`` seconds here?"""
    if done < 1 or remaining < 2 or workers < 2:
        return False
    serial = elapsed / done * remaining
    return serial - serial / min(workers, remaining) > POOL_START_SECONDS


def _score_in_pool(cases: Sequence[Case], args: tuple, workers: int,
                   on_done: Callable[[str, ClassScores], None]) -> None:
    """Score ``cases`` in ``workers`` spawned processes; the first exception stops the rest."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    # spawn: the parent may hold torch threads (--model), which fork can deadlock on.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_score, c, *args): c.name for c in cases}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                on_done(futures[f], f.result())


def score_dataset(data: Dataset, *, labels: list[int] | None = None, tolerance: float = 3.0,
                  workers: int | None = None, console: Console | None = None) -> Table:
    """Score every case of ``data`` with a progress bar; columns as :func:`evaluate_case`
    (as a :data:`~medslim.evaluate.outputs.Table`), cases in ``data`` order. The first bad
    case stops the run.

    ``workers`` > 1 scores in that many processes. ``None``: cases are scored here until their
    pace shows that :func:`default_workers` processes would finish the rest sooner despite
    their start-up (``POOL_START_SECONDS``); then the rest go to the processes.
    """
    auto = workers is None
    workers = default_workers() if auto else workers
    if workers < 1:
        raise MedslimError(f"--workers must be >= 1, got {workers}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    scores: dict[str, ClassScores] = {}
    args = (data.classes, labels, tolerance)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[case]}"),
                  TimeElapsedColumn(), console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scoring", total=len(data.cases), case="")

        def done(name: str, s: ClassScores) -> None:
            scores[name] = s
            bar.update(task, advance=1, case=name)

        todo, start = list(data.cases), time.perf_counter()

        def stay_here() -> bool:
            if workers == 1 or len(data.cases) == 1:
                return True
            return auto and not _pool_pays(time.perf_counter() - start, len(scores), len(todo), workers)

        while todo and stay_here():
            case = todo.pop(0)
            bar.update(task, case=case.name)
            done(case.name, _score(case, *args))
        if todo:
            _score_in_pool(todo, args, min(workers, len(todo)), done)
    return _table(data, scores)


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
        workers: processes; default: up to ``min(2, cpu_count)``, started only when the
            cases scored so far show they pay off (see :func:`score_dataset`).

    Returns:
        Rows as :func:`evaluate_case`, one per case and class.

    Raises:
        MedslimError: see :func:`find_cases` and :func:`evaluate_case`.
    """
    if not tolerance >= 0:
        raise MedslimError(f"--tolerance must be >= 0 mm, got {tolerance}")
    data = find_cases(pred, ref, split, dataset_json)
    return to_frame(score_dataset(data, labels=select_classes(data.classes, classes), tolerance=tolerance,
                                  workers=workers, console=console))


def score_cases(pred: str | Path, ref: str | Path, cases: Sequence[str], labels: Sequence[int],
                tolerance: float = 3.0) -> Table:
    """Dice and NSD of the named ``<case>.nii.gz`` label maps in two folders (in this process),
    rows as :func:`evaluate_case` (a :data:`~medslim.evaluate.outputs.Table`). Unlike
    :func:`evaluate_folder`, other reference cases in ``ref`` are not required to have a prediction.

    Raises:
        MedslimError: a missing or unreadable file, shape/affine mismatch (see :func:`evaluate_case`).
    """
    data = Dataset("nnunet", tuple(Case(c, Path(pred) / f"{c}.nii.gz", Path(ref) / f"{c}.nii.gz") for c in cases), None)
    return score_dataset(data, labels=list(labels), tolerance=tolerance, workers=1)


def mean_dice_folder(pred: str | Path, ref: str | Path, cases: Sequence[str], labels: Sequence[int]) -> dict:
    """Dice of ``<case>.nii.gz`` label maps in two folders, aggregated as ``medslim evaluate``
    does (SPEC §7, :func:`~medslim.evaluate.outputs.summarize`): per case the mean over the
    ``labels`` present in its reference, then the mean over cases.

    Returns:
        ``{"per_case": {case: {label: dice}}, "mean_per_label": {label: mean over the cases
        whose reference has it}, "mean": the SPEC §7 mean}``; a mean of no values is None.

    Raises:
        MedslimError: a missing or unreadable file, shape/affine mismatch (see :func:`evaluate_case`).
    """
    table = score_cases(pred, ref, cases, labels)
    summary = summarize(table, tolerance=3.0)
    per_case = {c: {} for c in cases}
    for case, label, dice in zip(table["case"].tolist(), table["class_id"].tolist(), table["dice"].tolist()):
        per_case[case][label] = dice
    return {"per_case": per_case, "mean": summary["overall"]["dice"]["mean"],
            "mean_per_label": {lab: summary["classes"][str(lab)]["dice"]["mean"] for lab in labels}}
