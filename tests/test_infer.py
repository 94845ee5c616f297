"""The fast inference path (``medslim.infer``): every backend's labels against nnU-Net's own
predictor on real held-out Hippocampus cases, the streamed sliding window against nnU-Net's
sliding window on a multi-tile volume, the resampling branch, the ONNX cache, and the
backend/benchmark command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import HIPPO, assert_user_error, held_out_cases, nnunet_images
from medslim.infer import RuntimeOptions, argmax_volume, is_installed, load_predictor
from medslim.predict import predict_folder

CASES = held_out_cases(2)
BACKENDS = [b for b in ("torch", "onnxruntime", "openvino") if is_installed(b)]


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return nnunet_images(tmp_path_factory.mktemp("imagesTs"), CASES)


@pytest.fixture(scope="module")
def stock(reference_dir, images, tmp_path_factory) -> Path:
    return predict_folder(reference_dir, images, tmp_path_factory.mktemp("stock"), backend="nnunet",
                          device=torch.device("cpu"))


def test_openvino_and_onnxruntime_are_installed_for_the_default_path():
    assert {"onnxruntime", "openvino"} <= set(BACKENDS)  # scripts/setup.sh installs medslim[fast]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_labels_agree_with_nnunet_predictor(reference_dir, images, stock, tmp_path, backend):
    out = predict_folder(reference_dir, images, tmp_path / backend, backend=backend, device=torch.device("cpu"))
    for case in CASES:
        ours, theirs = labels(out / f"{case}.nii.gz"), labels(stock / f"{case}.nii.gz")
        assert ours.shape == theirs.shape
        assert (ours == theirs).mean() >= 0.999, (backend, case, (ours == theirs).mean())
        assert set(np.unique(ours)) == {0, 1, 2}
        src, seg = nib.load(str(images / f"{case}_0000.nii.gz")), nib.load(str(out / f"{case}.nii.gz"))
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)


def test_streamed_window_matches_nnunet_sliding_window_on_many_tiles(reference):
    """A volume 2.6 patches long along the first axis: five tiles streamed through a one-patch
    buffer give nnU-Net's labels (its float16 buffer may flip a near-tie, hence ≥ 0.999)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    img = np.asarray(nib.load(str(HIPPO / "imagesTr" / f"{CASES[0]}.nii.gz")).dataobj, np.float32)
    img = (img - img.mean()) / img.std()
    patch = reference.patch_size
    vol = np.concatenate([img, img[::-1], img, img[::-1]], axis=0)[: int(2.6 * patch[0])]
    data = vol[None]
    net = reference.build_network()
    pm = PlansManager(reference.plans)
    cm = pm.get_configuration(reference.configuration_name)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], reference.dataset_json, "nnUNetTrainer", None)
    theirs = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float().argmax(0).numpy()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()
    ours = argmax_volume(data, run, patch, reference.num_classes)
    assert ours.shape == theirs.shape == vol.shape
    assert (ours == theirs).mean() >= 0.999
    assert len(np.unique(ours)) == 3


def test_resampling_branch_matches_nnunet(reference_dir, tmp_path):
    """An image whose spacing differs from the plans' (1.5 mm in-plane): logits resampled one
    class at a time with a running argmax give nnU-Net's labels."""
    src = nib.load(str(HIPPO / "imagesTr" / f"{CASES[1]}.nii.gz"))
    affine = src.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.5, 1.5, 1.0])
    folder = tmp_path / "img"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), affine), str(folder / "case_0000.nii.gz"))
    theirs = labels(predict_folder(reference_dir, folder, tmp_path / "stock", backend="nnunet", mirroring=False,
                                   device=torch.device("cpu")) / "case.nii.gz")
    ours = labels(predict_folder(reference_dir, folder, tmp_path / "ours", backend="torch", mirroring=False,
                                 device=torch.device("cpu")) / "case.nii.gz")
    assert ours.shape == theirs.shape == src.shape
    assert (ours == theirs).mean() >= 0.999


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime not installed")
def test_onnx_export_is_cached_and_keyed_by_checkpoint(reference_dir, tmp_path, monkeypatch):
    from medslim.infer import onnx_export

    monkeypatch.setenv("MEDSLIM_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    shutil.copytree(reference_dir, model_dir)
    exports = []
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a: exports.append(1) or real(*a))
    first = load_predictor(model_dir, backend="onnxruntime", options=RuntimeOptions(threads=1))
    second = load_predictor(model_dir, backend="onnxruntime", options=RuntimeOptions(threads=1))
    assert len(exports) == 1 and first.onnx_path == second.onnx_path and first.onnx_path.is_file()
    ckpt = model_dir / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes())  # same weights, new modification time: re-exported
    third = load_predictor(model_dir, backend="onnxruntime", options=RuntimeOptions(threads=1))
    assert len(exports) == 2 and third.onnx_path != first.onnx_path


def run_cli(*args: str):
    from medslim.cli import app

    return CliRunner().invoke(app, list(args))


def test_backend_not_installed_is_one_clear_line(reference_dir, images, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    out = tmp_path / "pred"
    result = run_cli("predict", str(reference_dir), "-i", str(images), "-o", str(out), "--backend", "openvino")
    assert_user_error(result, out, "backend 'openvino' is not installed; pip install openvino")
    result = run_cli("predict", str(reference_dir), "-i", str(images), "-o", str(out), "--backend", "openvin")
    assert_user_error(result, out, "did you mean 'openvino'")
    result = run_cli("predict", str(reference_dir), "-i", str(images), "-o", str(out), "--threads", "0")
    assert_user_error(result, out, "--threads must be ≥ 1")


def test_benchmark_command_times_model_against_original(reference_dir, tmp_path):
    from medslim.api import compress_model
    from medslim.compress import CompressConfig
    from medslim.load import load_results_folder

    compressed = tmp_path / "compressed"
    report = compress_model(load_results_folder(reference_dir), CompressConfig(df=0.3, prune_ratio=0.5), compressed)
    out = tmp_path / "bench.json"
    image = HIPPO / "imagesTr" / f"{CASES[0]}.nii.gz"
    result = run_cli("benchmark", str(compressed), "-i", str(image), "--vs", str(reference_dir), "--backend", "torch",
                     "--threads", "1", "--runs", "1", "--warmup", "0", "-o", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    first, second = summary["jobs"]
    assert Path(first["job"]["model"]) == reference_dir.resolve() or first["job"]["model"] == str(reference_dir)
    ratio = summary["ratios"][0]
    assert ratio["params_ratio"] == pytest.approx(report["params"]["ratio"], rel=1e-6)
    assert ratio["flops_ratio"] == pytest.approx(report["flops"]["ratio"], rel=1e-6)
    for job in summary["jobs"]:
        run = job["runs"][0]
        assert run["tiles"] == 1 and run["stages"]["network"] > 0 and run["peak_rss_mb"] > 100
        assert 0 < sum(run["stages"].values()) <= run["wall_seconds"]
        assert job["profile"] and abs(sum(p["share"] for p in job["profile"]) - 1) < 0.5
    assert "faster whole process" in result.stdout


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_exported_runtime_matches_pytorch_within_tolerance(reference_dir, hippo_patch, backend):
    """One real patch: the exported runtime's outputs equal PyTorch's to float32 tolerance."""
    ours = load_predictor(reference_dir, backend=backend, mirroring=False, options=RuntimeOptions(threads=1))
    ref = load_predictor(reference_dir, backend="torch", mirroring=False)
    x = hippo_patch.numpy()
    expected = ref.run(x).copy()
    np.testing.assert_allclose(ours.run(x), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_split_head_gives_the_networks_labels(reference, hippo_patch):
    """Features of the trunk + the head applied once = the argmax of the whole network."""
    from medslim.infer.head import apply_head, head_from_state_dict, trunk

    net = reference.build_network()
    head = head_from_state_dict(net.state_dict())
    assert head is not None and head[0].shape == (reference.num_classes, 16)
    with torch.inference_mode():
        logits = net(hippo_patch)[0]
        features = trunk(net)(hippo_patch)[0]
    np.testing.assert_array_equal(apply_head(features.numpy(), head, chunk_voxels=1000), logits.argmax(0).numpy())
    assert apply_head(features.numpy(), head).shape == tuple(hippo_patch.shape[2:])


def test_channels_last_layout_keeps_outputs(reference, hippo_patch):
    """Channels-last with instance norms as group norms: the same logits, no norm left, and
    the layout kept through the network."""
    from medslim.infer.layout import InstanceNormAsGroupNorm, channels_last

    net = reference.build_network()
    fast, fmt = channels_last(net)
    assert fmt == torch.channels_last_3d
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) and not isinstance(p, InstanceNormAsGroupNorm)
                   for p in fast.modules() for m in p.children())
    with torch.inference_mode():
        expected = net(hippo_patch)
        got = fast(hippo_patch.contiguous(memory_format=fmt))
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_truncated_image_in_folder_is_refused(reference_dir, images, tmp_path):
    """SimpleITK reads a truncated .nii.gz as zeros; predict must refuse it, not write labels."""
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    victim = sorted(folder.glob("*_0000.nii.gz"))[-1]
    victim.write_bytes(victim.read_bytes()[:3000])
    out = tmp_path / "pred"
    for backend in ("auto", "nnunet"):
        result = run_cli("predict", str(reference_dir), "-i", str(folder), "-o", str(out), "--backend", backend)
        assert_user_error(result, out, f"{victim} is truncated")
    result = run_cli("predict", str(reference_dir), "-i", str(victim), "-o", str(tmp_path / "seg.nii.gz"), "--ml")
    assert_user_error(result, tmp_path / "seg.nii.gz", "is truncated")
