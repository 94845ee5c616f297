"""Compressed results folders run in stock nnU-Net: the ``nnUNetv2_predict`` command with the
folder placed under ``$nnUNet_results``, on real held-out Hippocampus cases."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import HIPPO, REPO
from medslim.api import compress_model
from medslim.compress import CompressConfig
from medslim.evaluate import dice_per_class
from medslim.predict import predict_folder

N_CASES = 3


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> tuple[Path, list[str]]:
    cases = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"][:N_CASES]
    folder = tmp_path_factory.mktemp("imagesTs")
    for case in cases:
        shutil.copy(HIPPO / "imagesTr" / f"{case}.nii.gz", folder / f"{case}_0000.nii.gz")
    return folder, cases


@pytest.fixture(scope="module")
def original_predictions(reference_dir, test_images, tmp_path_factory) -> Path:
    return predict_folder(reference_dir, test_images[0], tmp_path_factory.mktemp("pred_original"), device=None)


def stock_predict(model_dir: Path, images: Path, out: Path, root: Path) -> None:
    """Run the ``nnUNetv2_predict`` console script on ``model_dir`` placed as nnU-Net expects."""
    plans = json.loads((model_dir / "plans.json").read_text())
    results = root / "nnUNet_results"
    target = results / plans["dataset_name"] / f"nnUNetTrainer__{plans['plans_name']}__3d_fullres"
    target.parent.mkdir(parents=True)
    shutil.copytree(model_dir, target)
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(root / "raw"),
               nnUNet_preprocessed=str(root / "pre"), nnUNet_compile="f")
    exe = Path(sys.executable).parent / "nnUNetv2_predict"
    subprocess.run([str(exe), "-i", str(images), "-o", str(out), "-d", plans["dataset_name"], "-c", "3d_fullres",
                    "-p", plans["plans_name"], "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu",
                    "-npp", "1", "-nps", "1"], env=env, check=True, capture_output=True, timeout=900)


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


@pytest.mark.parametrize("df, rho, min_agreement", [(0.9, 0.0, 0.95), (0.3, 0.5, None)])
def test_stock_nnunet_predict_runs_compressed_folder(reference, test_images, original_predictions, tmp_path,
                                                     df, rho, min_agreement):
    images, cases = test_images
    compressed = tmp_path / "compressed"
    report = compress_model(reference, CompressConfig(df=df, prune_ratio=rho), compressed)
    pred = tmp_path / "pred"
    stock_predict(compressed, images, pred, tmp_path)
    for case in cases:
        img, seg, orig = read(images / f"{case}_0000.nii.gz"), read(pred / f"{case}.nii.gz"), read(original_predictions / f"{case}.nii.gz")
        assert seg.GetSize() == img.GetSize() and np.allclose(seg.GetDirection(), img.GetDirection())
        assert np.allclose(seg.GetOrigin(), img.GetOrigin()) and np.allclose(seg.GetSpacing(), img.GetSpacing())
        labels = sitk.GetArrayFromImage(seg)
        assert set(np.unique(labels)) <= {0, 1, 2}
        if min_agreement is not None:  # near-lossless Tucker: the compressed model agrees with the original
            agree = dice_per_class(labels, sitk.GetArrayFromImage(orig), [1, 2])
            assert min(agree.values()) >= min_agreement, (case, agree)
    assert report["params"]["compressed"] < report["params"]["original"]


def test_cli_predict_folder_gives_nnunet_label_maps(reference_dir, test_images, original_predictions, tmp_path):
    from typer.testing import CliRunner

    from medslim.cli import app

    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(reference_dir), "-i", str(test_images[0]), "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in test_images[1])
    for case in test_images[1]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read(out / f"{case}.nii.gz")),
                                      sitk.GetArrayFromImage(read(original_predictions / f"{case}.nii.gz")))
    bad = CliRunner().invoke(app, ["predict", str(reference_dir), "-i", str(test_images[0]), "-o", str(tmp_path / "x"),
                                   "--ml"])
    assert bad.exit_code == 2 and "single image" in bad.stderr and not (tmp_path / "x").exists()
