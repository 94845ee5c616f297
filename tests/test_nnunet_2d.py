"""2D nnU-Net configurations end to end, on nnU-Net's own ``2d`` plan of the real Hippocampus
data (in-plane patch, ``Conv2d`` U-Net, run slice by slice on the 3D images): ``medslim
compress`` → stock ``nnUNetv2_predict`` → ``medslim predict`` against nnU-Net's predictor →
compress-then-fine-tune with ``nnUNetv2_train`` and ``--c`` → MONAI bundle.

The 2D network has random weights (nnU-Net's He init; ``write_untrained_folder``): it predicts
all three labels in varied places, so label agreement is not trivial, and no training is
needed before the pipeline runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import held_out_cases, nnunet_images

from medslim.cli import app
from medslim.finetune.hippocampus import DATASET, PLANS, preprocess
from medslim.load import load_results_folder
from medslim.network import COMPRESSED_CLASS

# every test needs nnU-Net's planning of the real data (the session's ``hippocampus_nnunet``)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CONFIG = "2d"
CASES = held_out_cases(2)
BIN = Path(sys.executable).parent


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def agreement(ours: Path, theirs: Path) -> float:
    """Fraction of voxels with the same label in two label-map folders (every case of ``CASES``)."""
    same = [labels(ours / f"{c}.nii.gz") == labels(theirs / f"{c}.nii.gz") for c in CASES]
    return float(np.concatenate([s.ravel() for s in same]).mean())


@pytest.fixture(scope="module")
def plans_2d(hippocampus_nnunet) -> tuple[Path, dict[str, str], dict]:
    """The session's nnU-Net folders and their ``nnUNetPlansSmall`` plans, whose ``2d``
    configuration nnU-Net planned alongside ``3d_fullres``."""
    work, env = hippocampus_nnunet
    plans = json.loads((work / "nnUNet_preprocessed" / DATASET / f"{PLANS}.json").read_text())
    assert plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["conv_op"].endswith("Conv2d")
    return work, env, plans


@pytest.fixture(scope="module")
def preprocessed_2d(plans_2d) -> dict[str, str]:
    """The nnU-Net environment with the ``2d`` training data preprocessed too (for training)."""
    _, env, _ = plans_2d
    preprocess(env, [CONFIG], num_processes=1)
    return env


@pytest.fixture(scope="module")
def original(plans_2d, tmp_path_factory) -> Path:
    """A stock results folder of the ``2d`` configuration (random weights, mirroring axes (0, 1))."""
    from medslim.export.nnunet_folder import write_untrained_folder

    work, _, plans = plans_2d
    dataset = json.loads((work / "nnUNet_preprocessed" / DATASET / "dataset.json").read_text())
    return write_untrained_folder(plans, dataset, CONFIG, tmp_path_factory.mktemp("results_2d"), mirror_axes=(0, 1))


@pytest.fixture(scope="module")
def compressed(original, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed_2d") / "model"
    result = cli("compress", original, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return nnunet_images(tmp_path_factory.mktemp("images_2d"), CASES)


@pytest.fixture(scope="module")
def stock_predictions(plans_2d, compressed, images, tmp_path_factory) -> Path:
    """``nnUNetv2_predict -c 2d`` (no test-time mirroring) on the compressed folder placed
    under ``$nnUNet_results``."""
    _, env, plans = plans_2d
    root = tmp_path_factory.mktemp("stock_2d")
    shutil.copytree(compressed, root / "results" / DATASET / f"nnUNetTrainer__{PLANS}__{CONFIG}")
    out = root / "pred"
    run = subprocess.run(["nice", "-n", "10", BIN / "nnUNetv2_predict", "-i", images, "-o", out, "-d", "4",
                          "-c", CONFIG, "-p", PLANS, "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu",
                          "-npp", "1", "-nps", "1", "--disable_tta"],
                         env=dict(env, nnUNet_results=str(root / "results"), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_compress_writes_a_smaller_2d_network_that_rebuilds(original, compressed):
    report = json.loads((compressed / "compression_report.json").read_text())
    assert report["configuration"] == CONFIG and report["input_shape"] == [1, 1, 56, 40]
    arch = json.loads((compressed / "plans.json").read_text())["configurations"][CONFIG]["architecture"]
    assert arch["network_class_name"] == COMPRESSED_CLASS
    assert arch["arch_kwargs"]["compression"]["kept"], "nothing was pruned at rho 0.5"
    net = load_results_folder(compressed).build_network()  # strict load of the compressed weights
    before = load_results_folder(original).build_network()
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in before.parameters()) / 3
    assert {m.weight.dim() for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)} == {4}
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 56, 40)).shape == (1, 3, 56, 40)


def test_data_aware_compression_cuts_calibration_patches_from_slices(original, images, tmp_path):
    out = tmp_path / "model"
    result = cli("compress", original, "-o", out, "--criterion", "hvs_data", "--calibration", images,
                 "--calibration-patches", "2")
    assert result.exit_code == 0, result.output
    load_results_folder(out).build_network()


def test_stock_predict_loads_the_compressed_2d_folder(stock_predictions, images):
    for case in CASES:
        seg = nib.load(stock_predictions / f"{case}.nii.gz")
        image = nib.load(images / f"{case}_0000.nii.gz")
        assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) == {0, 1, 2}  # random weights: every label somewhere


def test_medslim_predict_agrees_with_nnunet(compressed, images, stock_predictions, tmp_path):
    result = cli("predict", compressed, "-i", images, "-o", tmp_path / "auto", "--backend", "auto", "--disable-tta")
    assert result.exit_code == 0, result.output
    assert agreement(tmp_path / "auto", stock_predictions) > 0.995
    # with test-time mirroring over both in-plane axes, against nnU-Net's predictor in this process
    for backend in ("torch", "nnunet"):
        result = cli("predict", compressed, "-i", images, "-o", tmp_path / backend, "--backend", backend)
        assert result.exit_code == 0, result.output
    assert agreement(tmp_path / "torch", tmp_path / "nnunet") > 0.995
    assert agreement(tmp_path / "torch", stock_predictions) < 1  # mirroring did change something


def test_trainer_finetunes_a_2d_configuration_and_continues(preprocessed_2d, original, tmp_path):
    env = preprocessed_2d
    config = tmp_path / "finetune.json"
    config.write_text(json.dumps({"epochs": 1, "iterations": 2, "val_iterations": 1, "final_validation": False,
                                  "dataset_name": DATASET, "plans_name": PLANS}))
    env = dict(env, MEDSLIM_CONFIG=str(config), nnUNet_results=str(tmp_path / "results"), nnUNet_n_proc_DA="1",
               nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    trainer = "nnUNetTrainerMedslim"

    def train(*extra: str, **environ: str) -> None:
        run = subprocess.run(["nice", "-n", "10", BIN / "nnUNetv2_train", "4", CONFIG, "0", "-p", PLANS,
                              "-tr", trainer, "-device", "cpu", *extra], env=dict(env, **environ),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]

    train("-pretrained_weights", str(original / "fold_0" / "checkpoint_final.pth"))
    folder = tmp_path / "results" / DATASET / f"{trainer}__{PLANS}__{CONFIG}"
    arch = json.loads((folder / "plans.json").read_text())["configurations"][CONFIG]["architecture"]
    assert arch["network_class_name"] == COMPRESSED_CLASS
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1 and tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1)
    heads = [v for k, v in ckpt["network_weights"].items() if ".seg_layers." in k and k.endswith("weight")]
    assert len(heads) == 3 and all(h.dim() == 4 and h.shape[0] == 3 for h in heads)  # deep supervision, 2D
    report = json.loads((folder / "medslim_config.json").read_text())["compression_report"]
    assert report["parameters_after"] < 0.5 * report["parameters_before"]

    train("--c", MEDSLIM_EPOCHS="2")  # the compressed network rebuilt from the saved plans
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2
    assert json.loads((folder / "medslim_config.json").read_text())["continued"] is True
    load_results_folder(folder).build_network()


def test_bundle_of_the_compressed_2d_folder_segments_slice_by_slice(compressed, images, stock_predictions,
                                                                    tmp_path):
    bundle = tmp_path / "bundle"
    result = cli("export-bundle", compressed, "-o", bundle)
    assert result.exit_code == 0, result.output
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["inferer"]["_target_"] == "SliceInferer" and config["inferer"]["roi_size"] == [56, 40]
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--dataset_dir", str(images), "--output_dir", str(tmp_path / "pred")], cwd=bundle,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in CASES:
        seg, image = nib.load(tmp_path / "pred" / f"{case}.nii.gz"), nib.load(images / f"{case}_0000.nii.gz")
        assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
    # MONAI's tile positions differ from nnU-Net's where a slice needs more than one tile
    assert agreement(tmp_path / "pred", stock_predictions) > 0.98
