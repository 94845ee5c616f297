"""``medslim evaluate``: outputs on good input; on bad input one stderr line, exit code 2, no
output folder, inputs untouched; predicting first with nnU-Net (``--model``/``--ref-model``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_user_error, tree_digest as digest

from medslim.cli import app

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
CASES = ["hippocampus_004", "hippocampus_006"]


def run(*args: str):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])






def save(data: np.ndarray, path: Path, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for case in CASES:
        shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", ref)
        img = nib.load(str(ref / f"{case}.nii.gz"))
        save(np.roll(np.rint(np.asanyarray(img.dataobj)).astype(np.uint8), 1, axis=0), pred / f"{case}.nii.gz", img.affine)
    return pred, ref


def test_writes_csv_json_markdown(folders, tmp_path):
    pred, ref = folders
    out = tmp_path / "out"
    before = digest(pred) + digest(ref)
    result = run("--pred", pred, "--ref", ref, "--dataset-json", HIPPO / "dataset.json", "-o", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.json", "summary.md"]
    frame = pd.read_csv(out / "per_case.csv")
    assert list(frame.columns) == ["case", "class_id", "class", "dice", "nsd", "ref_voxels", "pred_voxels"]
    assert len(frame) == 4 and set(frame["class"]) == {"Anterior", "Posterior"}
    assert frame["nsd"].between(0.5, 1.0).all() and frame["dice"].between(0.3, 0.99).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["tolerance_mm"] == 3.0 and summary["inputs"]["layout"] == "nnunet"
    assert summary["classes"]["Anterior"]["nsd"]["mean"] == pytest.approx(frame[frame["class"] == "Anterior"]["nsd"].mean())
    assert "| Posterior | 2 |" in (out / "summary.md").read_text() and "| Posterior | 2 |" in result.stdout
    assert digest(pred) + digest(ref) == before
    # tolerance changes NSD, a second run refuses to overwrite, --overwrite replaces
    assert_user_error(run("--pred", pred, "--ref", ref, "-o", out, "--tolerance", "0.5"), tmp_path / "never", "--overwrite")
    assert run("--pred", pred, "--ref", ref, "-o", out, "--tolerance", "0.5", "--overwrite").exit_code == 0
    assert pd.read_csv(out / "per_case.csv")["nsd"].sum() < frame["nsd"].sum()


def _shape(pred, ref):
    img = nib.load(str(ref / f"{CASES[1]}.nii.gz"))
    save(np.asanyarray(img.dataobj)[:-2].astype(np.uint8), pred / f"{CASES[1]}.nii.gz", img.affine)


def _affine(pred, ref):
    img = nib.load(str(ref / f"{CASES[1]}.nii.gz"))
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    save(np.asanyarray(img.dataobj).astype(np.uint8), pred / f"{CASES[1]}.nii.gz", affine)


def _not_nifti(pred, ref):
    (pred / f"{CASES[1]}.nii.gz").write_text("case,label\n1,2\n")


def _truncated(pred, ref):
    p = pred / f"{CASES[1]}.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _outside_map(pred, ref):
    img = nib.load(str(pred / f"{CASES[0]}.nii.gz"))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    save(data, pred / f"{CASES[0]}.nii.gz", img.affine)


def _non_integer(pred, ref):
    img = nib.load(str(pred / f"{CASES[0]}.nii.gz"))
    save(np.asanyarray(img.dataobj).astype(np.float32) * 0.5, pred / f"{CASES[0]}.nii.gz", img.affine)


def _missing(pred, ref):
    (pred / f"{CASES[1]}.nii.gz").unlink()


def _empty(pred, ref):
    for p in pred.iterdir():
        p.unlink()


BAD = [
    (_shape, [], f"case {CASES[1]}: prediction shape"),
    (_affine, [], f"case {CASES[1]}: prediction and reference affines differ"),
    (_not_nifti, [], "cannot read"),
    (_truncated, [], "cannot read"),
    (_outside_map, ["--dataset-json", HIPPO / "dataset.json"], "label(s) [3] outside the 2-class map"),
    (_non_integer, [], "non-integer values"),
    (_missing, [], "1 case(s) have no prediction in"),
    (_empty, [], "is an empty folder"),
    (None, ["--split", "test"], "--split needs the TotalSegmentator layout"),
    (None, ["--classes", "Anteror", "--dataset-json", HIPPO / "dataset.json"], "did you mean 'Anterior'"),
    (None, ["--tolerance", "-1"], "--tolerance must be >= 0"),
    (None, ["--workers", "0"], "--workers must be >= 1"),
]


@pytest.mark.parametrize("breakage, flags, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_one_line_exit_2(folders, tmp_path, breakage, flags, match):
    pred, ref = folders
    if breakage is not None:
        breakage(pred, ref)
    before = digest(pred) + digest(ref)
    out = tmp_path / "out"
    assert_user_error(run("--pred", pred, "--ref", ref, "-o", out, "--workers", "1", *flags), out, match)
    assert digest(pred) + digest(ref) == before


def test_bad_input_in_a_worker_process_is_one_line(folders, tmp_path):
    pred, ref = folders
    _shape(pred, ref)
    out = tmp_path / "out"
    assert_user_error(run("--pred", pred, "--ref", ref, "-o", out, "--workers", "2"), out, f"case {CASES[1]}")


def test_conflicting_modes(folders, tmp_path):
    pred, ref = folders
    out = tmp_path / "out"
    assert_user_error(run("--ref", ref, "-o", out), out, "exactly one of --pred or --model")
    assert_user_error(run("--pred", pred, "--ref", ref, "--ref-model", ref, "-o", out), out, "--ref or --ref-model")
    assert_user_error(run("--model", ref, "--ref", ref, "-o", out), out, "not an nnU-Net results folder")


def swapped_labels_model(reference_dir: Path, dst: Path) -> Path:
    """A copy of the reference model whose segmentation heads emit Posterior where the
    original emits Anterior and vice versa (output rows 1 and 2 of every head swapped)."""
    shutil.copytree(reference_dir, dst)
    path = dst / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k, v in ckpt["network_weights"].items():
        if ".seg_layers." in k:
            v[[1, 2]] = v[[2, 1]].clone()
    torch.save(ckpt, path)
    return dst


def test_predict_first_and_fidelity(reference_dir, tmp_path, monkeypatch):
    """The embedded reference nnU-Net on one held-out case: scored against the manual label,
    and the fidelity of a second model to it. The second model swaps the two labels, so its
    Dice to the original is 0 for both classes and each class's predicted voxels are the
    original's voxels of the other class (a self-comparison would give 1 and equal counts)."""
    monkeypatch.setenv("nnUNet_extTrainer", str(REPO / "nnunet_plugin"))
    images = tmp_path / "imagesTs"
    images.mkdir()
    shutil.copy(HIPPO / "imagesTr" / f"{CASES[0]}.nii.gz", images / f"{CASES[0]}_0000.nii.gz")
    labels = tmp_path / "labelsTs"
    labels.mkdir()
    shutil.copy(HIPPO / "labelsTr" / f"{CASES[0]}.nii.gz", labels)
    swapped = swapped_labels_model(reference_dir, tmp_path / "swapped")
    out = tmp_path / "fidelity"
    result = run("--model", swapped, "--ref-model", reference_dir, "--images", images, "-o", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "per_case.csv")
    assert list(frame["class"]) == ["Anterior", "Posterior"]  # names from the model's dataset.json
    assert (frame["ref_voxels"] > 100).all() and (frame["dice"] == 0.0).all()
    assert frame["pred_voxels"].tolist() == frame["ref_voxels"].tolist()[::-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["mode"] == "fidelity" and summary["overall"]["dice"]["mean"] == 0.0
    out2 = tmp_path / "vs_labels"
    result = run("--model", reference_dir, "--images", images, "--ref", labels, "-o", out2)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out2 / "per_case.csv")
    assert len(frame) == 2 and frame["nsd"].notna().all() and (frame["ref_voxels"] > 0).all()
    # a reference case without an image fails before any prediction
    shutil.copy(HIPPO / "labelsTr" / f"{CASES[1]}.nii.gz", labels)
    assert_user_error(run("--model", reference_dir, "--images", images, "--ref", labels, "-o", tmp_path / "x"),
                      tmp_path / "x", "have no image in")
