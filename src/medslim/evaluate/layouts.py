"""Find and read label maps: nnU-Net folders and the TotalSegmentator dataset layout (SPEC §7).

nnU-Net: ``REF/<case>.nii.gz`` multi-label maps, predictions ``PRED/<case>.nii.gz``.
TotalSegmentator: ``REF/<image_id>/segmentations/<structure>.nii.gz`` and ``REF/meta.csv``
(``;``-separated, columns ``image_id``, ``split``); a prediction is ``PRED/<image_id>.nii.gz``
(multi-label) or a per-structure folder ``PRED/<image_id>/[segmentations/]<structure>.nii.gz``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medslim.errors import MedslimError, did_you_mean

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelMap:
    """A label map as read from disk: ``array`` unsigned ints ``[X, Y, Z]``, ``affine``
    ``[4, 4]`` (voxel → mm), ``spacing`` in mm along X, Y, Z, and where it came from."""
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str


@dataclass(frozen=True)
class Case:
    """One case to score: ``pred``/``ref`` are a multi-label file or a per-structure folder."""
    name: str
    pred: Path
    ref: Path


@dataclass(frozen=True)
class Dataset:
    """Cases found in a prediction and a reference folder, and the class map that names the
    labels (``None``: score the label ids present)."""
    layout: str
    cases: tuple[Case, ...]
    classes: dict[int, str] | None


def case_name(path: Path) -> str:
    return next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s))


def total_class_map() -> dict[int, str]:
    """TotalSegmentator's ``total`` class map (117 structures), from the ``totalsegmentator``
    package when importable, otherwise the copy shipped with medslim."""
    try:
        from totalsegmentator.map_to_binary import class_map

        return {int(k): v for k, v in class_map["total"].items()}
    except ImportError:
        from medslim.evaluate.total_classes import TOTAL_CLASSES

        return {i + 1: name for i, name in enumerate(TOTAL_CLASSES)}


def dataset_json_class_map(path: str | Path) -> dict[int, str]:
    """Foreground labels of an nnU-Net v2 (``{"labels": {name: id}}``) or MSD
    (``{"labels": {"1": name}}``) ``dataset.json``: ``{id: name}`` without background."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MedslimError(f"cannot read the 'labels' of {path}: {e}") from None
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, list):
            raise MedslimError(f"{path}: label '{k}' is a region {v}; region-based labels are not supported")
        ident, name = (int(k), str(v)) if str(k).isdigit() else (int(v), str(k))
        if ident:
            out[ident] = name
    return dict(sorted(out.items()))


def _as_labels(data: np.ndarray, source: str) -> np.ndarray:
    """Integer copy-free view (or smallest unsigned cast) of a label volume."""
    if data.dtype.kind == "f":  # float files with integral values (0.0, 1.0, 2.0) are fine
        finite = np.isfinite(data)
        if not finite.all():
            raise MedslimError(f"{source} has NaN or infinite values ({int(data.size - finite.sum())} voxels); "
                               f"expected a label map of integers ≥ 0")
        fractional = data != np.rint(data)
        if fractional.any():
            raise MedslimError(f"{source} has non-integer values (e.g. {float(data[fractional][0]):g}); "
                               f"expected a label map of integers ≥ 0")
    elif data.dtype.kind not in "iub":
        raise MedslimError(f"{source} has data type {data.dtype}; expected an integer label map")
    if data.size and data.min() < 0:
        raise MedslimError(f"{source} has negative label {int(data.min())}")
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    return data if data.dtype == dtype else data.astype(dtype)


def read_nifti(path: str | Path) -> LabelMap:
    """Read one NIfTI label map. Raises ``MedslimError`` for non-NIfTI, truncated or
    non-label files and for volumes that are not 3D."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise MedslimError(f"{path} is not a NIfTI file (.nii.gz or .nii)")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise MedslimError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MedslimError(f"{path} has shape {data.shape}; expected a 3D label map")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return LabelMap(_as_labels(data, str(path)), np.asarray(img.affine, np.float64), spacing, str(path))


def read_structures(folder: str | Path, classes: dict[int, str]) -> LabelMap:
    """Combine ``folder/<structure>.nii.gz`` binary masks into one label map (ids from
    ``classes``; where masks overlap the higher id wins, as when TotalSegmentator combines
    them). Missing structures are empty; unknown structure names are an error."""
    folder = Path(folder)
    ids = {name: i for i, name in classes.items()}
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise MedslimError(f"no structure masks (*.nii.gz) in {folder}")
    unknown = [case_name(p) for p in files if case_name(p) not in ids]
    if unknown:
        raise MedslimError(f"{folder}: unknown structure '{unknown[0]}'{did_you_mean(unknown[0], ids)}; "
                           f"expected names of the {len(ids)}-class map")
    out, first = None, None
    for path in sorted(files, key=lambda p: ids[case_name(p)]):
        m = read_nifti(path)
        if first is None:
            first, out = m, np.zeros(m.array.shape, np.uint8 if max(ids.values()) < 256 else np.uint16)
        else:
            check_same_grid(first, m, folder.name)
        out[m.array > 0] = ids[case_name(path)]
    return LabelMap(out, first.affine, first.spacing, str(folder))


def read_label_map(path: str | Path, classes: dict[int, str] | None) -> LabelMap:
    """A multi-label NIfTI file, or a per-structure folder (needs ``classes``)."""
    path = Path(path)
    if path.is_dir():
        if classes is None:
            raise MedslimError(f"{path} is a folder of structure masks; give a class map (--dataset-json)")
        return read_structures(path, classes)
    if not path.exists():
        raise MedslimError(f"{path} does not exist")
    return read_nifti(path)


def check_same_grid(ref: LabelMap, pred: LabelMap, case: str) -> None:
    """Raise ``MedslimError`` naming ``case`` if shapes or affines (to 1e-3 mm) differ."""
    if ref.array.shape != pred.array.shape:
        raise MedslimError(f"case {case}: prediction shape {pred.array.shape} != reference shape {ref.array.shape}")
    if not np.allclose(ref.affine, pred.affine, rtol=1e-5, atol=1e-3):
        raise MedslimError(f"case {case}: prediction and reference affines differ (max difference "
                           f"{np.abs(ref.affine - pred.affine).max():.4g}); resample the prediction to the reference grid")


def labels_present(volume: np.ndarray) -> list[int]:
    """Positive label ids present in ``volume`` (one pass, no large temporaries)."""
    return [i + 1 for i, box in enumerate(ndimage.find_objects(volume)) if box is not None]


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)}


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MedslimError(f"{what} {path} is not a folder")
    if not any(path.iterdir()):
        raise MedslimError(f"{what} {path} is an empty folder")
    return path


def _missing(kind: str, names: list[str], where: Path) -> MedslimError:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return MedslimError(f"{len(names)} case(s) have no {kind} in {where}: {shown}")


def _read_meta(meta: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a ``;``-separated meta.csv (the csv module: pandas would add 0.3 s
    to every start-up)."""
    try:
        with meta.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";")
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeError, csv.Error) as e:
        raise MedslimError(f"cannot read {meta}: {e}") from None


def _totalseg_ids(ref: Path, split: str | None) -> list[str]:
    meta = ref / "meta.csv"
    if not meta.is_file():
        if split is not None:
            raise MedslimError(f"--split needs {meta} (columns image_id;split)")
        return sorted(p.name for p in ref.iterdir() if (p / "segmentations").is_dir())
    columns, rows = _read_meta(meta)
    if not {"image_id", "split"} <= set(columns):
        raise MedslimError(f"{meta} needs ';'-separated columns image_id and split, found {columns}")
    rows = [r for r in rows if r["image_id"]]
    if split is not None:
        splits = sorted({r["split"] for r in rows if r["split"]})
        if split not in splits:
            raise MedslimError(f"unknown split '{split}'{did_you_mean(split, splits)}; {meta} has {', '.join(splits)}")
        rows = [r for r in rows if r["split"] == split]
    return sorted(r["image_id"] for r in rows)


def _totalseg_prediction(pred: Path, image_id: str) -> Path | None:
    for cand in (pred / f"{image_id}.nii.gz", pred / f"{image_id}.nii", pred / image_id / "segmentations",
                 pred / image_id):
        if cand.exists():
            return cand
    return None


def is_totalseg(ref: Path) -> bool:
    return (ref / "meta.csv").is_file() or any((p / "segmentations").is_dir() for p in ref.iterdir())


def reference_cases(ref: str | Path, split: str | None = None) -> tuple[str, dict[str, Path]]:
    """Layout (``"nnunet"`` or ``"totalsegmentator"``) and ``{case: reference path}`` of a
    reference folder, for ``split`` (TotalSegmentator layout only). Raises ``MedslimError``
    for a missing or empty folder, an unknown split, an unreadable meta.csv, no cases."""
    ref = _folder(ref, "reference")
    if is_totalseg(ref):
        ids = _totalseg_ids(ref, split)
        if not ids:
            raise MedslimError(f"no cases in {ref}" + (f" for split '{split}'" if split else ""))
        no_ref = [i for i in ids if not (ref / i / "segmentations").is_dir()]
        if no_ref:
            raise _missing("reference segmentations/ folder", no_ref, ref)
        return "totalsegmentator", {i: ref / i / "segmentations" for i in ids}
    if split is not None:
        raise MedslimError(f"--split needs the TotalSegmentator layout (REF/meta.csv); {ref} is an nnU-Net folder")
    refs = _nifti_files(ref)
    if not refs:
        raise MedslimError(f"no reference label maps (*.nii.gz) in {ref}")
    return "nnunet", refs


def find_cases(pred: str | Path, ref: str | Path, split: str | None = None,
               dataset_json: str | Path | None = None) -> Dataset:
    """Pair every reference case with its prediction.

    The reference drives: every reference case (of ``split``) needs a prediction; extra
    predictions are ignored. Class names come from ``dataset_json``, else TotalSegmentator's
    ``total`` map for that layout, else the ids present. Raises ``MedslimError`` as
    :func:`reference_cases`, and for a missing/empty prediction folder or a missing case."""
    classes = dataset_json_class_map(dataset_json) if dataset_json is not None else None
    layout, refs = reference_cases(ref, split)
    pred = _folder(pred, "prediction")
    if layout == "totalsegmentator":
        preds = {i: _totalseg_prediction(pred, i) for i in refs}
        classes = classes or total_class_map()
    else:
        files = _nifti_files(pred)
        preds = {c: files.get(c) for c in refs}
    no_pred = [c for c, p in preds.items() if p is None]
    if no_pred:
        raise _missing("prediction", no_pred, pred)
    return Dataset(layout, tuple(Case(c, preds[c], refs[c]) for c in refs), classes)


def select_classes(classes: dict[int, str] | None, requested: Sequence[str] | None) -> list[int] | None:
    """Label ids for ``--classes`` (names or ids); ``None`` keeps all. Unknown names are an
    error with a suggestion."""
    if not requested:
        return None
    names = {v: k for k, v in (classes or {}).items()}
    out = []
    for item in requested:
        if item.isdigit() and (classes is None or int(item) in classes):
            out.append(int(item))
        elif item in names:
            out.append(names[item])
        else:
            hint = did_you_mean(item, list(names)) if names else " (no class map: give label ids or --dataset-json)"
            raise MedslimError(f"unknown class '{item}'{hint}")
    return sorted(set(out))
