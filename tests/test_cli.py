"""``medslim compress`` on bad input: one line on stderr, exit code 2, no output folder, the
input untouched. And on good input: a results folder with a consistent report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_user_error, tree_digest

from medslim.cli import app


def run(*args: str):
    return CliRunner().invoke(app, list(args))






@pytest.fixture
def model_copy(reference_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(reference_dir, dst)
    return dst


def test_compress_writes_folder_and_keeps_input(reference_dir, tmp_path):
    before = tree_digest(reference_dir)
    out = tmp_path / "out"
    result = run("compress", str(reference_dir), "-o", str(out), "--df", "0.3", "--prune", "0.5")
    assert result.exit_code == 0, result.output
    assert tree_digest(reference_dir) == before
    report = json.loads((out / "compression_report.json").read_text())
    plans = json.loads((out / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "medslim.network.CompressedUNet"
    assert arch["arch_kwargs"]["compression"] == json.loads((out / "compression_spec.json").read_text())
    weights = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    unique = {t.data_ptr(): t.numel() for t in weights.values()}
    assert report["params"]["compressed"] == sum(unique.values())
    assert report["params"]["ratio"] > 3
    assert f"{report['params']['compressed']:,}" in result.stdout


@pytest.mark.parametrize("args, match", [
    (["--df", "0"], "--df must be in (0, 1]"),
    (["--df", "1.5"], "--df must be in (0, 1]"),
    (["--prune", "1"], "--prune must be in [0, 1)"),
    (["--prune", "-0.1"], "--prune must be in [0, 1)"),
    (["--criterion", "hsv"], "did you mean 'hvs'"),
    (["--prune-site", "inner"], "prune site"),
    (["--selection", "globl"], "unknown --selection 'globl'; did you mean 'global'"),
])
def test_bad_options(reference_dir, tmp_path, args, match):
    out = tmp_path / "out"
    assert_user_error(run("compress", str(reference_dir), "-o", str(out), *args), out, match)


def test_missing_folder(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("compress", str(tmp_path / "nope"), "-o", str(out)), out, "does not exist")


def test_missing_checkpoint(model_copy, tmp_path):
    (model_copy / "fold_0" / "checkpoint_final.pth").unlink()
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "no checkpoint fold_0/checkpoint_final.pth")


def test_plans_without_architecture(model_copy, tmp_path):
    plans = json.loads((model_copy / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]
    (model_copy / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "no 'architecture'")


def test_unsupported_layer_type(model_copy, tmp_path, reference):
    from unsupported_arch import MixedDimUNet

    plans = json.loads((model_copy / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "unsupported_arch.MixedDimUNet"
    (model_copy / "plans.json").write_text(json.dumps(plans))
    from medslim.network import build_base_network
    net = build_base_network(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3)
    assert isinstance(net, MixedDimUNet)
    ckpt = dict(reference.checkpoint, network_weights=net.state_dict())
    torch.save(ckpt, model_copy / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "Conv2d in a 3D network")


def test_existing_output_needs_overwrite(reference_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run("compress", str(reference_dir), "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    result = run("compress", str(reference_dir), "-o", str(out), "--overwrite", "--df", "0.5", "--prune", "0.3")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "plans.json").is_file()


def test_already_compressed_model_is_refused(reference_dir, tmp_path):
    first = tmp_path / "first"
    assert run("compress", str(reference_dir), "-o", str(first)).exit_code == 0
    out = tmp_path / "second"
    assert_user_error(run("compress", str(first), "-o", str(out)), out, "already compressed")


def test_totalseg_task_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    out = tmp_path / "out"
    assert_user_error(run("compress", "total_fast", "-o", str(out)), out, "totalseg_download_weights -t total_fast")


def test_totalseg_task_resolves_weights_dir(totalseg_dir, tmp_path, monkeypatch):
    """A TotalSegmentator weights folder laid out as the package writes it is found by task name."""
    home = tmp_path / "tshome"
    results = home / "nnunet" / "results"
    shutil.copytree(totalseg_dir.parent, results / totalseg_dir.parent.name)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    from medslim.load import load_model

    model = load_model("total_fast")
    assert model.num_classes == 118 and model.patch_size == [112, 112, 128]
