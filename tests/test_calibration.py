"""Calibration data end to end: ``calibration_patches`` from nnU-Net images and
``medslim compress --calibration`` with the data-aware criteria and the ``budget`` rank policy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_user_error, held_out_cases, nnunet_images, tree_digest

from medslim import MedslimError
from medslim.cli import app
from medslim.compress import CompressConfig, compress_network
from medslim.score.calibration import calibration_patches


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three held-out Hippocampus cases as ``<case>_0000.nii.gz`` in a temp folder."""
    return nnunet_images(tmp_path_factory.mktemp("images"), held_out_cases(3))


def test_calibration_patches_are_seeded_patches_of_the_model_size(reference, images):
    x = calibration_patches(reference, images, n=4, seed=0)
    assert x.shape == (4, 1, *reference.patch_size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().sum() > 0
    # Hippocampus cases are smaller than the patch: padded, so patch 3 repeats patch 0's case
    assert torch.equal(x[0], x[3]) and not torch.equal(x[0], x[1])
    assert torch.equal(calibration_patches(reference, images, n=4, seed=0), x)
    assert abs(float(x[x != 0].mean())) < 0.5  # z-scored by nnU-Net's preprocessing


def test_compress_network_checks_calibration_before_any_work(reference):
    net = reference.build_network()
    config = CompressConfig(criterion="taylor", with_calibration=True)
    with pytest.raises(MedslimError, match="--criterion taylor needs calibration data"):
        compress_network(net, config, [1, 1, *reference.patch_size])
    with pytest.raises(MedslimError, match="--criterion hvs_data needs calibration data, given by --calibration"):
        CompressConfig(criterion="hvs_data")


def test_compress_with_hvs_data_and_calibration_images(reference_dir, images, tmp_path):
    before = tree_digest(images)
    out = tmp_path / "out"
    result = run("compress", reference_dir, "-o", out, "--criterion", "hvs_data", "--calibration", images,
                 "--calibration-patches", "3")
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "compression_spec.json").read_text())
    assert spec["kept"] and spec["provenance"]["config"]["criterion"] == "hvs_data"
    assert tree_digest(images) == before


def test_taylor_without_calibration_fails_in_one_line_and_writes_nothing(reference_dir, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, "--criterion", "taylor"), out,
                      "--criterion taylor needs calibration data, given by --calibration IMAGES")


def bad_folder(kind: str, images: Path, tmp: Path) -> Path:
    folder = tmp / kind
    if kind == "missing":
        return folder
    folder.mkdir()
    case = sorted(images.iterdir())[0]
    if kind == "no_0000":
        shutil.copy(case, folder / case.name.replace("_0000", ""))
    elif kind == "extra_channel":
        shutil.copy(case, folder / case.name)
        shutil.copy(case, folder / case.name.replace("_0000", "_0001"))
    elif kind == "truncated":
        (folder / case.name).write_bytes(case.read_bytes()[:500])
    return folder


@pytest.mark.parametrize("kind, match", [
    ("missing", "does not exist"), ("empty", "no nnU-Net images"), ("no_0000", "no nnU-Net images"),
    ("extra_channel", "is input channel 2, but the model takes 1 channel"), ("truncated", "truncated")])
def test_bad_calibration_folder_is_one_line_before_any_work(reference_dir, images, tmp_path, kind, match):
    out = tmp_path / "out"
    folder = bad_folder(kind, images, tmp_path)
    assert_user_error(run("compress", reference_dir, "-o", out, "--criterion", "taylor", "--calibration", folder),
                      out, match)


def test_compress_budget_policy_meets_its_budget(reference_dir, tmp_path):
    out = tmp_path / "out"
    result = run("compress", reference_dir, "-o", out, "--rank-policy", "budget", "--budget", "0.1", "--prune", "0")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compression_report.json").read_text())["layers"]
    before = sum(r["params"][0] for r in rows)
    after = sum(r["params"][1] for r in rows)
    assert any(r["decomposed"] for r in rows) and after <= 0.1 * before
    config = json.loads((out / "compression_spec.json").read_text())["provenance"]["config"]
    assert config["rank_policy"] == "budget" and config["budget"] == 0.1 and config["budget_target"] == "params"
    out2 = tmp_path / "out2"
    assert_user_error(run("compress", reference_dir, "-o", out2, "--rank-policy", "budget", "--budget-target", "time"),
                      out2, "unknown --budget-target 'time'")
