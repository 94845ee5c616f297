"""Build the nnU-Net raw/preprocessed folders of the reference Hippocampus task (as
``scripts/train_reference_model.py`` does): convert MSD Task04, hold out the fixed test
cases, plan and preprocess ``3d_fullres`` (or other configurations, e.g. ``2d``), add
``nnUNetPlansSmall`` and fold 0 of the repo split."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from medslim.errors import MedslimError

DATASET = "Dataset004_Hippocampus"
PLANS = "nnUNetPlansSmall"


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def nnunet_env(workdir: Path, **extra: str) -> dict[str, str]:
    """``os.environ`` with nnU-Net's folders under ``workdir`` and medslim's trainers found."""
    import nnunet_plugin

    env = dict(os.environ)
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"),
               nnUNet_extTrainer=str(Path(nnunet_plugin.__file__).resolve().parent),
               nnUNet_compile="f")
    env.update(extra)
    return env


def hold_out_test_cases(raw: Path, test: list[str]) -> None:
    """Move the test cases out of imagesTr/labelsTr into imagesTsLabeled/labelsTsLabeled."""
    (raw / "imagesTsLabeled").mkdir(exist_ok=True)
    (raw / "labelsTsLabeled").mkdir(exist_ok=True)
    for case in test:
        shutil.move(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTsLabeled" / f"{case}_0000.nii.gz")
        shutil.move(raw / "labelsTr" / f"{case}.nii.gz", raw / "labelsTsLabeled" / f"{case}.nii.gz")
    ds = json.loads((raw / "dataset.json").read_text())
    ds["numTraining"] = len(list((raw / "labelsTr").glob("*.nii.gz")))
    (raw / "dataset.json").write_text(json.dumps(ds, indent=1))


def make_small_plans(pre: Path) -> None:
    """``nnUNetPlansSmall``: the default plans with halved ``features_per_stage`` and batch 4
    in every configuration (``2d`` and ``3d_fullres`` for this task)."""
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    for cfg in plans["configurations"].values():
        if "architecture" in cfg:  # not the ones that only inherit (3d_cascade_fullres)
            arch = cfg["architecture"]["arch_kwargs"]
            arch["features_per_stage"] = [f // 2 for f in arch["features_per_stage"]]
            cfg["batch_size"] = 4
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))


def preprocess(env: Mapping[str, str], configurations: Sequence[str], num_processes: int = 2,
               quiet: bool = True) -> None:
    """Preprocess more configurations (e.g. ``2d``) of a folder ``prepare_hippocampus`` built:
    nnU-Net planned them all, and ``nnUNetPlansSmall`` already has them."""
    subprocess.run([_exe("nnUNetv2_preprocess"), "-d", "4", "-plans_name", PLANS, "-c", *configurations,
                    "-np", str(num_processes)], env=dict(env), check=True, stdout=subprocess.DEVNULL if quiet else None)


def prepare_hippocampus(msd_task: Path, split_file: Path, workdir: Path, num_processes: int = 2,
                        quiet: bool = True, configurations: Sequence[str] = ("3d_fullres",)) -> dict[str, str]:
    """Convert + hold out + plan/preprocess ``configurations`` into ``workdir``; returns the
    nnU-Net environment.

    Raises:
        MedslimError: ``msd_task`` is not an MSD task folder.
    """
    if not (Path(msd_task) / "dataset.json").is_file():
        raise MedslimError(f"{msd_task} is not an MSD task folder (no dataset.json)")
    workdir = Path(workdir).resolve()
    env = nnunet_env(workdir)
    split = json.loads(Path(split_file).read_text())
    raw = workdir / "nnUNet_raw" / DATASET
    pre = workdir / "nnUNet_preprocessed" / DATASET
    for folder in (raw, pre):
        if folder.exists():
            shutil.rmtree(folder)
    out = subprocess.DEVNULL if quiet else None
    np_ = str(num_processes)
    subprocess.run([_exe("nnUNetv2_convert_MSD_dataset"), "-i", str(msd_task), "-overwrite_id", "4", "-np", np_],
                   env=env, check=True, stdout=out)
    hold_out_test_cases(raw, split["test"])
    subprocess.run([_exe("nnUNetv2_plan_and_preprocess"), "-d", "4", "-c", *configurations, "-np", np_],
                   env=env, check=True, stdout=out)
    make_small_plans(pre)
    (pre / "splits_final.json").write_text(json.dumps(split["folds"], indent=1))
    return env
