"""The nnU-Net folders and case lists a sweep's cells share, prepared once by the driver.

``data.prepare: hippocampus`` builds them from an MSD Task04 folder and the fixed split
(``medslim.finetune.hippocampus``) under ``SWEEP_DIR/nnunet``; otherwise ``data`` names an
existing ``nnUNet_raw``/``nnUNet_preprocessed`` and the labelled test images. Validation cases
are the fold's ``val`` keys of ``splits_final.json`` (choose settings on these); test cases only
report.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from medslim.errors import MedslimError
from medslim.sweep.grid import SweepSpec

NNUNET_KEYS = ("nnUNet_raw", "nnUNet_preprocessed")


@dataclass(frozen=True)
class SweepContext:
    """What every cell reads: the shared nnU-Net environment, the original model and the
    validation/test image and label folders (``<case>_0000.nii.gz`` / ``<case>.nii.gz``)."""

    sweep_dir: Path
    model: Path
    env: dict[str, str]
    dataset: str
    plans: str
    configuration: str
    fold: int
    cases: dict[str, tuple[Path, Path]]  # split → (images, labels)
    tolerances: tuple[float, ...] = (1.0, 3.0)

    @property
    def pretrained(self) -> Path:
        return self.model / f"fold_{self.fold}" / "checkpoint_final.pth"


def plugin_folder() -> Path:
    """The ``nnunet_plugin`` folder (where ``nnUNet_extTrainer`` must point)."""
    import nnunet_plugin

    return Path(nnunet_plugin.__file__).resolve().parent


def prepare(spec: SweepSpec, sweep_dir: Path) -> SweepContext:
    """Build or check the shared folders; returns the context (idempotent: a prepared
    ``nnunet`` folder is reused).

    Raises:
        MedslimError: missing model, data folders, or cases.
    """
    sweep_dir = Path(sweep_dir).resolve()
    if not (spec.model / f"fold_{spec.fold}" / "checkpoint_final.pth").is_file():
        raise MedslimError(f"model {spec.model} has no fold_{spec.fold}/checkpoint_final.pth")
    data = spec.data
    if data.get("prepare") == "hippocampus":
        from medslim.finetune.hippocampus import nnunet_env, prepare_hippocampus

        root = sweep_dir / "nnunet"
        done = root / ".prepared"
        env = nnunet_env(root) if done.is_file() else prepare_hippocampus(Path(data["msd_task"]), Path(data["split"]), root)
        done.touch()
        raw = Path(env["nnUNet_raw"]) / spec.dataset
        test = (raw / "imagesTsLabeled", raw / "labelsTsLabeled")
    elif data.get("prepare") is not None:
        raise MedslimError(f"unknown data.prepare '{data['prepare']}' (only 'hippocampus'; or give nnUNet_raw, "
                           "nnUNet_preprocessed, test_images, test_labels)")
    else:
        missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed", "test_images", "test_labels") if k not in data]
        if missing:
            raise MedslimError(f"sweep 'data' needs {', '.join(missing)} (or prepare: hippocampus)")
        env = {"nnUNet_raw": data["nnUNet_raw"], "nnUNet_preprocessed": data["nnUNet_preprocessed"]}
        raw = Path(data["nnUNet_raw"]) / spec.dataset
        test = (Path(data["test_images"]), Path(data["test_labels"]))
    env = {**{k: env[k] for k in NNUNET_KEYS}, "nnUNet_extTrainer": str(plugin_folder()), "nnUNet_compile": os.environ.get("nnUNet_compile", "f")}
    splits = Path(env["nnUNet_preprocessed"]) / spec.dataset / "splits_final.json"
    if not splits.is_file():
        raise MedslimError(f"{splits} does not exist: plan and preprocess the dataset first")
    folds = json.loads(splits.read_text())
    if spec.fold >= len(folds):
        raise MedslimError(f"{splits} has {len(folds)} fold(s); the sweep asks for fold {spec.fold}")
    limit = spec.evaluate.get("max_cases")
    val_cases = sorted(folds[spec.fold]["val"])[:limit]
    val = _linked(sweep_dir / "cases" / "val", raw / "imagesTr", raw / "labelsTr", val_cases)
    test_cases = sorted(p.name[: -len(".nii.gz")] for p in test[1].glob("*.nii.gz"))[:limit]
    if not test_cases:
        raise MedslimError(f"no test labels (*.nii.gz) in {test[1]}")
    test = _linked(sweep_dir / "cases" / "test", test[0], test[1], test_cases)
    tolerances = tuple(float(t) for t in spec.evaluate.get("tolerances", (1.0, 3.0)))
    return SweepContext(sweep_dir, spec.model, env, spec.dataset, spec.plans, spec.configuration, spec.fold,
                        {"val": val, "test": test}, tolerances)


def _linked(root: Path, images: Path, labels: Path, cases: list[str]) -> tuple[Path, Path]:
    """Folders of symlinks to exactly ``cases`` (inputs stay where they are, unmodified)."""
    out = (root / "images", root / "labels")
    for folder in out:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for case in cases:
        src_img, src_lab = images / f"{case}_0000.nii.gz", labels / f"{case}.nii.gz"
        for src in (src_img, src_lab):
            if not src.is_file():
                raise MedslimError(f"case {case}: {src} does not exist")
        (out[0] / src_img.name).symlink_to(src_img.resolve())
        (out[1] / src_lab.name).symlink_to(src_lab.resolve())
    return out
