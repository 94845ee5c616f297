"""``scripts/train_reference_bundle.py``: the spleen_ct_segmentation bundle adapted to
Hippocampus, trained and evaluated by its own ``python -m monai.bundle run`` workflows for a
tiny budget (1 epoch over 4 training cases, channels 4–64), on real data and the repo split."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import HIPPO, REPO, SHARED, tree_digest

from medslim.errors import MedslimError
from medslim.bundle import config_edit, hippocampus as hb

SCRIPT = REPO / "scripts" / "train_reference_bundle.py"
SOURCE = SHARED / "monai_bundles" / "spleen_ct_segmentation"
SPLIT_FILE = REPO / "configs" / "hippocampus_split.json"
SPLIT = json.loads(SPLIT_FILE.read_text())
SEED = 7


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(bundle, script stdout) of the tiny run; the source bundle is left unchanged."""
    before = tree_digest(SOURCE)
    bundle = tmp_path_factory.mktemp("refbundle") / "bundle"
    proc = run_script(str(bundle), "--epochs", "1", "--val-interval", "1", "--seed", str(SEED), "--train-cases", "4",
                      "--val-cases", "2", "--test-cases", "2", "--channels", "4,8,16,32,64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert tree_digest(SOURCE) == before
    return bundle, proc.stdout


def parsed(bundle, *files: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser["bundle_root"] = str(bundle)
    return parser


def cases(items) -> list[str]:
    return [hb.case_name(d["image"]) for d in items]


def test_checkpoint_loads_strictly_into_network_def(trained):
    bundle, _ = trained
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    for config in ("train.json", "inference.json"):
        net = parsed(bundle, config).get_parsed_content("network_def")
        net.load_state_dict(state, strict=True)
        first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
        assert type(net).__name__ == "UNet" and first_conv.out_channels == 4  # --channels reached the config
    # trained, not the initial weights: BatchNorm saw data (running means start at 0)
    assert max(float(v.abs().max()) for k, v in state.items() if k.endswith("running_mean")) > 0


def test_logged_loss_and_dice_are_finite(trained):
    bundle, _ = trained
    record = json.loads((bundle / "eval" / "train_summary.json").read_text())
    assert math.isfinite(record["last_loss"]) and record["last_loss"] > 0
    assert 0 <= record["best_val_mean_dice"] <= 1 and record["best_val_epoch"] == 1
    assert math.isfinite(record["val_metrics"]["val_mean_dice"])
    assert (record["seed"], record["epochs"], record["iterations"]) == (SEED, 1, 2)  # 4 cases, batch 2
    assert record["train_cases"] == SPLIT["folds"][0]["train"][:4]
    assert record["val_cases"] == SPLIT["folds"][0]["val"][:2]
    assert "train_loss:" in (bundle / "eval" / "train_log.txt").read_text()


def test_case_lists_are_the_split_and_disjoint(trained):
    bundle, _ = trained
    lists = json.loads((bundle / "configs" / "datalist.json").read_text())
    named = {k: cases(v) for k, v in lists.items()}
    assert named == {"training": SPLIT["folds"][0]["train"], "validation": SPLIT["folds"][0]["val"],
                     "test": SPLIT["test"]}
    assert not (set(named["training"]) & set(named["validation"]) or set(named["training"]) & set(named["test"])
                or set(named["validation"]) & set(named["test"]))
    # the configs use them as intended (without the tiny run's overrides)
    train = parsed(bundle, "train.json")
    assert cases(train.get_parsed_content("train#dataset#data")) == named["training"]
    assert cases(train.get_parsed_content("validate#dataset#data")) == named["validation"]
    evaluate = parsed(bundle, "train.json", "evaluate.json")
    assert cases(evaluate.get_parsed_content("validate#dataset#data")) == named["test"]
    images = parsed(bundle, "inference.json").get_parsed_content("datalist")
    assert [hb.case_name(p) for p in images] == named["test"] and all(os.path.isfile(p) for p in images)


def test_evaluation_writes_label_maps_and_summary(trained):
    bundle, stdout = trained
    test_cases = SPLIT["test"][:2]
    assert sorted(p.name for p in (bundle / "eval" / "predictions").iterdir()) == [f"{c}.nii.gz" for c in test_cases]
    for case in test_cases:
        image = nib.load(HIPPO / "imagesTr" / f"{case}.nii.gz")
        pred = nib.load(bundle / "eval" / "predictions" / f"{case}.nii.gz")
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    summary = json.loads((bundle / "eval" / "summary.json").read_text())
    test = summary["test"]
    assert test["test_cases"] == test_cases and summary["training"]["seed"] == SEED
    assert set(test["dice"]["mean_per_label"]) == {"1", "2"} and 0 <= test["dice"]["mean"] <= 1
    for case in test_cases:  # MONAI's MeanDice and medslim's evaluator scored the same label maps
        for label in ("1", "2"):
            assert test["dice"]["per_case"][case][label] == pytest.approx(
                test["dice_monai"]["per_case"][case][label], abs=1e-5)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"]["mean_dice"] == test["dice"]["mean"]
    assert "Not evaluated yet" not in (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run training" in stdout and "python -m monai.bundle run evaluating" in stdout


def test_metadata_verifies_offline_and_keeps_the_licence(trained, tmp_path):
    bundle, _ = trained
    hb.verify_metadata(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    licence = (bundle / "LICENSE").read_text()
    assert licence.startswith((SOURCE / "LICENSE").read_text().rstrip()) and "spleen_ct_segmentation" in licence
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    (broken / "docs").mkdir()
    del meta["task"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    (broken / "docs" / hb.SCHEMA_NAME).write_text(hb.SCHEMA_JSON)
    with pytest.raises(ValueError, match="'task' is a required property"):  # offline: the schema is in docs/
        hb.verify_metadata(broken)


def test_build_refuses_an_overlapping_split_and_an_existing_output(tmp_path):
    split = json.loads(SPLIT_FILE.read_text())
    split["folds"][0]["train"].append(split["test"][0])
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(split))
    with pytest.raises(MedslimError, match="training and test share 1 cases"):
        hb.build_bundle(tmp_path / "b", SOURCE, HIPPO, bad, epochs=1, seed=0)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
    with pytest.raises(MedslimError, match="multiple of val_interval"):
        hb.build_bundle(tmp_path / "b", SOURCE, HIPPO, SPLIT_FILE, epochs=3, seed=0, val_interval=2)
    (tmp_path / "b").mkdir()
    proc = run_script(str(tmp_path / "b"), "--epochs", "1")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "already exists" in proc.stderr
    assert list((tmp_path / "b").iterdir()) == []


def test_edits_are_checked_against_the_source():
    transforms = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
                  {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 2.0]},
                  {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57}]
    edited = config_edit.edit_components(transforms, hb.PREPROCESSING_EDITS)
    assert [t["_target_"] for t in edited] == ["LoadImaged", "DivisiblePadd", "NormalizeIntensityd"]
    assert edited[1] == {"_target_": "DivisiblePadd", "keys": ["image", "label"], "k": 16}
    assert edited[2]["keys"] == "image" and "a_min" not in edited[2]
    with pytest.raises(MedslimError, match="no ScaleIntensityRanged, Spacingd in the source list"):
        config_edit.edit_components(transforms[:1], hb.PREPROCESSING_EDITS)
    config = {"train": {"dataset": {"cache_rate": 1.0}}, "validate#dataset#cache_rate": 0}
    out = config_edit.apply_overrides(config, {"train#dataset#cache_rate": (0.5, ""), "validate#dataset#data": ("$x", "")},
                                     overlay=True)
    assert out == {"train": {"dataset": {"cache_rate": 0.5}}, "validate#dataset#cache_rate": 0,
                   "validate#dataset#data": "$x"}
    with pytest.raises(MedslimError, match="'trian' is not in the source config"):
        config_edit.apply_overrides(config, {"trian#dataset#cache_rate": (0.5, "")})
