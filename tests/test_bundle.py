"""``medslim export-bundle``: bundles that ``python -m monai.bundle`` runs in a fresh process,
that agree with nnU-Net's own predictor on real Hippocampus test cases, that MONAI's bundle
checks accept offline, and one-line errors (exit 2, no bundle) on bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, assert_user_error, held_out_cases, monai_bundle, nnunet_images

from medslim.cli import app

CASES = held_out_cases(3)
EXAMPLE_CT = SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def hippo_images(tmp_path_factory) -> Path:
    """Three held-out test cases as ``<case>_0000.nii.gz`` in a temp folder."""
    return nnunet_images(tmp_path_factory.mktemp("hippo_images"), CASES)


@pytest.fixture(scope="module")
def compressed_dir(reference, tmp_path_factory) -> Path:
    from medslim.api import compress_model
    from medslim.compress import CompressConfig

    out = tmp_path_factory.mktemp("compressed") / "model"
    compress_model(reference, CompressConfig(df=0.3, prune_ratio=0.5), out)
    return out


@pytest.fixture(scope="module")
def bundles(reference_dir, compressed_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, model in (("original", reference_dir), ("compressed", compressed_dir)):
        result = cli("export-bundle", str(model), "-o", str(root / name))
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def test_layout_and_metadata(bundles, compressed_dir):
    for bundle in bundles.values():
        for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                    "docs/README.md", "LICENSE"):
            assert (bundle / rel).is_file(), rel
    meta = json.loads((bundles["compressed"] / "configs" / "metadata.json").read_text())
    config = json.loads((bundles["compressed"] / "configs" / "inference.json").read_text())
    spec = json.loads((compressed_dir / "compression_spec.json").read_text())
    assert config["network_def"]["_target_"] == "medslim.network.CompressedUNet"
    assert config["network_def"]["compression"] == spec == meta["medslim"]["compression"]
    assert meta["medslim"]["report_summary"]["params"]["ratio"] > 3
    assert "CC BY-SA 4.0" in (bundles["compressed"] / "LICENSE").read_text()
    original = json.loads((bundles["original"] / "configs" / "inference.json").read_text())
    assert original["network_def"]["_target_"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert json.loads((bundles["original"] / "configs" / "metadata.json").read_text())["medslim"]["compression"] is None


@pytest.mark.parametrize("which", ["original", "compressed"])
def test_bundle_agrees_with_nnunet_predictor(which, bundles, reference_dir, compressed_dir, hippo_images, tmp_path):
    from medslim.evaluate import dice_per_class
    from medslim.predict import predict_folder

    model = {"original": reference_dir, "compressed": compressed_dir}[which]
    monai_bundle(bundles[which], "run", "--config_file", "configs/inference.json",
                 "--dataset_dir", str(hippo_images), "--output_dir", str(tmp_path / "bundle"))
    predict_folder(model, hippo_images, tmp_path / "nnunet", device=torch.device("cpu"), mirroring=False)
    for case in CASES:
        image = nib.load(hippo_images / f"{case}_0000.nii.gz")
        ours = nib.load(tmp_path / "bundle" / f"{case}.nii.gz")
        theirs = np.asarray(nib.load(tmp_path / "nnunet" / f"{case}.nii.gz").dataobj)
        assert ours.shape == image.shape and np.allclose(ours.affine, image.affine)
        dice = dice_per_class(np.asarray(ours.dataobj), theirs, [1, 2])
        assert min(dice.values()) >= 0.97, (which, case, dice)


def test_bundle_agrees_when_resampling(bundles, reference_dir, hippo_images, tmp_path):
    """Inputs at 0.8 × 0.8 × 0.625 mm (cubic zoom of two test cases): the bundle resamples to
    the plans' 1 mm and back, as nnU-Net does."""
    from scipy.ndimage import zoom

    from medslim.evaluate import dice_per_class
    from medslim.predict import predict_folder

    images = tmp_path / "images"
    images.mkdir()
    for case in CASES[:2]:
        src = nib.load(hippo_images / f"{case}_0000.nii.gz")
        factors = (1.25, 1.25, 1.6)
        affine = src.affine @ np.diag([1 / f for f in factors] + [1])
        nib.save(nib.Nifti1Image(zoom(np.asarray(src.dataobj, np.float32), factors, order=3), affine),
                 images / f"{case}_0000.nii.gz")
    monai_bundle(bundles["original"], "run", "--config_file", "configs/inference.json",
                 "--dataset_dir", str(images), "--output_dir", str(tmp_path / "bundle"))
    predict_folder(reference_dir, images, tmp_path / "nnunet", device=torch.device("cpu"), mirroring=False)
    for case in CASES[:2]:
        ours = nib.load(tmp_path / "bundle" / f"{case}.nii.gz")
        assert ours.shape == nib.load(images / f"{case}_0000.nii.gz").shape
        theirs = np.asarray(nib.load(tmp_path / "nnunet" / f"{case}.nii.gz").dataobj)
        dice = dice_per_class(np.asarray(ours.dataobj), theirs, [1, 2])
        assert min(dice.values()) >= 0.97, (case, dice)


def test_checks_pass_offline_and_ckpt_export_regenerates_torchscript(bundles, hippo_patch):
    for bundle in bundles.values():
        monai_bundle(bundle, "verify_metadata", "--meta_file", "configs/metadata.json",
                     "--filepath", "docs/meta_schema_20220324.json")
    bundle = bundles["compressed"]
    monai_bundle(bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                 "--config_file", "configs/inference.json", "--device", "cpu")
    (bundle / "models" / "model.ts").unlink()
    monai_bundle(bundle, "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
                 "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
                 "--use_trace", "True", "--input_shape", "[1, 1, 40, 56, 40]")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    ts = torch.jit.load(str(bundle / "models" / "model.ts")).eval()
    with torch.no_grad():
        assert torch.allclose(ts(hippo_patch), net(hippo_patch), atol=1e-4)


def test_totalsegmentator_architecture_bundle(totalseg_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(EXAMPLE_CT, images / "example_ct_0000.nii.gz")
    bundle = tmp_path / "bundle"
    assert cli("export-bundle", str(totalseg_dir), "-o", str(bundle)).exit_code == 0
    monai_bundle(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", str(images),
                 "--output_dir", str(tmp_path / "pred"))
    image, pred = nib.load(EXAMPLE_CT), nib.load(tmp_path / "pred" / "example_ct.nii.gz")
    labels = np.unique(np.asarray(pred.dataobj))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert labels.min() >= 0 and labels.max() <= 117 and len(labels) > 1


def test_bad_input_no_plans(reference_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(reference_dir, model)
    (model / "plans.json").unlink()
    out = tmp_path / "bundle"
    assert_user_error(cli("export-bundle", str(model), "-o", str(out)), out, "plans.json is missing")


def test_bad_input_output_exists(reference_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("export-bundle", str(reference_dir), "-o", str(out))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "already exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_input_spec_does_not_match_weights(compressed_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(compressed_dir, model)
    plans = json.loads((model / "plans.json").read_text())
    kept = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["compression"]["kept"]
    layer = next(iter(kept))
    kept[layer] = kept[layer][:-1]
    (model / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "bundle"
    assert_user_error(cli("export-bundle", str(model), "-o", str(out)), out, "does not match")


def test_bundle_runtime_backend_agrees_with_pytorch(bundles, hippo_images, tmp_path):
    """The bundle's default (exported) runtime and ``--backend torch`` give the same labels."""
    from medslim.infer import is_installed

    if not (is_installed("openvino") or is_installed("onnxruntime")):
        pytest.skip("no exported runtime installed")
    for backend in ("auto", "torch"):
        monai_bundle(bundles["compressed"], "run", "--config_file", "configs/inference.json", "--backend", backend,
                     "--dataset_dir", str(hippo_images), "--output_dir", str(tmp_path / backend))
    for case in CASES:
        auto = np.asarray(nib.load(tmp_path / "auto" / f"{case}.nii.gz").dataobj)
        eager = np.asarray(nib.load(tmp_path / "torch" / f"{case}.nii.gz").dataobj)
        assert (auto == eager).mean() >= 0.999, case
