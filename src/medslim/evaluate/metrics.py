"""Per-class Dice and NSD of label maps (SPEC §7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from medslim.evaluate.surface import crop_margin, surface_dice_crops


@dataclass(frozen=True)
class ClassScores:
    """Scores of one case, one entry per requested label (arrays ``[C]``).

    ``dice``/``nsd`` are NaN where the reference lacks the label, 0 where only the prediction
    lacks it. ``ref_voxels``/``pred_voxels`` count the label's voxels."""
    labels: np.ndarray
    dice: np.ndarray
    nsd: np.ndarray
    ref_voxels: np.ndarray
    pred_voxels: np.ndarray


def _padded_crop(volume: np.ndarray, box: tuple[slice, ...], label: int, pad: Sequence[int]) -> np.ndarray:
    crop = volume[box]
    out = np.zeros(tuple(n + 2 * m for n, m in zip(crop.shape, pad)), bool)
    np.equal(crop, label, out=out[tuple(slice(m, m + n) for n, m in zip(crop.shape, pad))])
    return out


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def score_label_maps(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                     tolerance: float = 3.0) -> ClassScores:
    """Dice and NSD of every label in ``labels`` from two label maps, one class at a time
    inside its bounding box (no one-hot volume; extra memory is a few bytes per voxel of the
    largest class's box).

    Args:
        ref, pred: non-negative integer label maps ``[X, Y, Z]`` of the same shape.
        spacing: voxel size in mm along X, Y, Z (from the image header).
        labels: label ids to score (positive ints).
        tolerance: NSD tolerance in mm.

    Returns:
        :class:`ClassScores` with arrays ``[len(labels)]``.
    """
    if ref.shape != pred.shape or ref.ndim != 3:
        raise ValueError(f"need two 3D label maps of one shape, got {ref.shape} and {pred.shape}")
    sp, tol = tuple(float(s) for s in spacing), float(tolerance)
    pad = crop_margin(sp, tol)
    boxes_ref, boxes_pred = ndimage.find_objects(ref), ndimage.find_objects(pred)
    n = len(labels)
    dice, nsd = np.full(n, np.nan), np.full(n, np.nan)
    nref, npred = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, label in enumerate(labels):
        box_r = boxes_ref[label - 1] if 0 < label <= len(boxes_ref) else None
        box_p = boxes_pred[label - 1] if 0 < label <= len(boxes_pred) else None
        if box_r is None and box_p is None:
            continue
        box = _union(box_r, box_p)
        r, p = _padded_crop(ref, box, label, pad), _padded_crop(pred, box, label, pad)
        nref[i], npred[i] = np.count_nonzero(r), np.count_nonzero(p)
        if nref[i] == 0:
            continue
        if npred[i] == 0:
            dice[i] = nsd[i] = 0.0
            continue
        dice[i] = 2.0 * np.count_nonzero(r & p) / (nref[i] + npred[i])
        nsd[i] = surface_dice_crops(r, p, sp, tol)
    return ClassScores(np.asarray(labels, np.int64), dice, nsd, nref, npred)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label; NaN when the reference lacks it, 0 when only the prediction lacks it.

    Args:
        pred, ref: integer label maps of the same shape.
    """
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        nr = int(r.sum())
        out[int(lab)] = float("nan") if nr == 0 else float(2 * np.logical_and(p, r).sum() / (p.sum() + nr))
    return out
