"""Shared fixtures: the embedded reference nnU-Net, real cases from ../shared/data, and a
TotalSegmentator-architecture stand-in built in a temp dir."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HIPPO = SHARED / "Task04_Hippocampus"
TS_PLANS = SHARED / "totalsegmentator" / "Dataset297_total_3mm_plans_reconstructed.json"

os.environ.setdefault("nnUNet_compile", "f")
# medslim's ONNX/latency caches: per test session, not the user's ~/.cache/medslim
os.environ.setdefault("MEDSLIM_CACHE", tempfile.mkdtemp(prefix="medslim-test-cache-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    from medslim.api import DEFAULT_MODEL

    assert (DEFAULT_MODEL / "fold_0" / "checkpoint_final.pth").is_file(), "embedded reference model missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def reference(reference_dir):
    from medslim.load import load_results_folder

    return load_results_folder(reference_dir)


@pytest.fixture(scope="session")
def hippo_patch(reference) -> torch.Tensor:
    """The first held-out test case of ``configs/hippocampus_split.json``, z-scored and
    cropped/zero-padded to the model's patch: ``[1, 1, *patch]``."""
    case = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"][0]
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPO / "imagesTr" / f"{case}.nii.gz"))).astype(np.float32)
    img = (img - img.mean()) / (img.std() + 1e-8)
    patch = reference.patch_size
    out = np.zeros(patch, np.float32)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(img.shape, patch))
    out[sl] = img[sl]
    return torch.from_numpy(out)[None, None]


@pytest.fixture(scope="session")
def hippocampus_nnunet(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """nnU-Net raw/preprocessed folders of the reference task (``prepare_hippocampus``), built
    once per session. nnU-Net's final validation predicts every validation case, so fold 0
    keeps 4 of its validation cases; training still samples all 128 training cases."""
    from medslim.finetune.hippocampus import DATASET, prepare_hippocampus

    work = tmp_path_factory.mktemp("nnunet")
    env = prepare_hippocampus(HIPPO, REPO / "configs" / "hippocampus_split.json", work)
    splits_file = work / "nnUNet_preprocessed" / DATASET / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    splits[0]["val"] = splits[0]["val"][:4]
    splits_file.write_text(json.dumps(splits))
    return work, env


@pytest.fixture(scope="session")
def totalseg_dir(tmp_path_factory) -> Path:
    from medslim.load.totalseg import write_totalseg_standin

    return write_totalseg_standin(TS_PLANS, tmp_path_factory.mktemp("totalseg"))


def held_out_cases(n: int) -> list[str]:
    """The first ``n`` test cases of ``configs/hippocampus_split.json`` (never trained on)."""
    return json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"][:n]


def nnunet_images(folder: Path, cases: list[str]) -> Path:
    """``folder/<case>_0000.nii.gz`` copies of Hippocampus ``cases`` (nnU-Net's input layout)."""
    import shutil

    for case in cases:
        shutil.copy(HIPPO / "imagesTr" / f"{case}.nii.gz", folder / f"{case}_0000.nii.gz")
    return folder


def monai_bundle(bundle: Path, *args: str, threads: int = 2) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in a new process, from the bundle folder; fails the test
    unless it exits with 0 (showing the end of its stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], check=False, cwd=bundle, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tree_digest(folder: Path) -> str:
    """Hash of every file's relative path and bytes: proves an input folder was not modified."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def assert_user_error(result, out: Path, match: str) -> None:
    """A CLI user error: exit 2, one stderr line containing ``match``, no traceback, and no
    output folder (nor its temporary sibling) left behind."""
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary folder left behind"


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small linear algebra gains nothing from threads, and next to another busy process OpenMP
    spinning makes it ~40x slower (measured 3 s vs 0.07 s per decomposition)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def reference_net(reference) -> torch.nn.Module:
    """The reference network in eval mode, deep supervision off; tests must not modify it."""
    return reference.build_network().eval()
