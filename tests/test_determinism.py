"""The same command and seed give bit-identical results: ``medslim compress`` (weights, spec,
report numbers) and ``medslim evaluate`` (per_case.csv, summary.json). Each run is its own
process with its own ``PYTHONHASHSEED``, so set and dict orders cannot hide in the result."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import HIPPO, held_out_cases


def medslim(*args, hash_seed: int) -> None:
    """``medslim ARGS`` in a fresh process with ``PYTHONHASHSEED=hash_seed``; must succeed."""
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    p = subprocess.run([sys.executable, "-m", "medslim.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


@pytest.mark.parametrize("criterion", ["random", "hvs"])
def test_compress_twice_is_bit_identical(reference_dir, tmp_path, criterion):
    outs = [tmp_path / "a", tmp_path / "b"]
    for hash_seed, out in enumerate(outs):
        medslim("compress", reference_dir, "-o", out, "--criterion", criterion, "--seed", 7, hash_seed=hash_seed)
    a, b = (torch.load(o / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
            for o in outs)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("compression_spec.json", "plans.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    reports = [json.loads((o / "compression_report.json").read_text()) for o in outs]
    assert without_timings(reports[0]) == without_timings(reports[1])
    assert reports[0]["params"]["compressed"] < reports[0]["params"]["original"]


def test_evaluate_twice_is_bit_identical(tmp_path):
    """Three real Hippocampus labels against shifted copies, scored in two processes (default
    workers: in-process or a pool, whichever the pace suggests)."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    for i, case in enumerate(held_out_cases(3)):
        img = nib.load(str(HIPPO / "labelsTr" / f"{case}.nii.gz"))
        labels = np.rint(np.asanyarray(img.dataobj)).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, img.affine), str(ref / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(np.roll(labels, i + 1, axis=i), img.affine), str(pred / f"{case}.nii.gz"))
    outs = [tmp_path / "a", tmp_path / "b"]
    for hash_seed, out in enumerate(outs):
        medslim("evaluate", "--pred", pred, "--ref", ref, "-o", out, hash_seed=hash_seed)
    for name in ("per_case.csv", "summary.json", "summary.md"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["n_cases"] == 3 and 0 < summary["overall"]["dice"]["mean"] < 1
