"""Overlap metrics of label maps (SPEC §7)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


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


def mean_dice_folder(pred_dir: str | Path, ref_dir: str | Path, cases: Sequence[str],
                     labels: Sequence[int]) -> dict:
    """Per-case Dice of ``<case>.nii.gz`` files, the mean per label over cases, and their mean."""
    per_case = {}
    for case in cases:
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(pred_dir) / f"{case}.nii.gz")))
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(ref_dir) / f"{case}.nii.gz")))
        per_case[case] = dice_per_class(p.astype(np.int64), np.rint(r).astype(np.int64), labels)
    per_label = {lab: float(np.nanmean([d[lab] for d in per_case.values()])) for lab in labels}
    return {"per_case": per_case, "mean_per_label": per_label, "mean": float(np.mean(list(per_label.values())))}
