"""Start-up cost: ``medslim --help`` and ``medslim evaluate`` import neither torch, nnU-Net,
pandas nor SimpleITK (together seconds and hundreds of MB per process); package ``__init__``s
export lazily; evaluation starts worker processes only when they pay off."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medslim.evaluate import folder
from medslim.evaluate.layouts import find_cases
from medslim.evaluate.outputs import COLUMNS, write_csv

HEAVY = ("torch", "nnunetv2", "torch_pruning", "tensorly", "pandas", "SimpleITK", "matplotlib", "monai")
PACKAGES = ("medslim.classify", "medslim.evaluate", "medslim.export", "medslim.finetune", "medslim.load",
            "medslim.prune", "medslim.transfer")


def heavy_after(code: str) -> list[str]:
    """The modules of ``HEAVY`` that a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def cli(args: list[str]) -> str:
    """Code that runs ``medslim ARGS`` in-process and fails unless it exits with code 0."""
    return (f"from medslim.cli import app\ntry:\n    app({args!r}, prog_name='medslim')\n"
            "except SystemExit as e:\n    assert not e.code, e.code")


@pytest.fixture
def cases(tmp_path) -> tuple[Path, Path]:
    """Three small label maps as references, shifted by one voxel as predictions."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        labels = np.zeros((12, 10, 8), np.uint8)
        x = int(rng.integers(1, 4))
        labels[x:x + 6, 2:8, 2:6] = 1
        labels[x + 3:x + 6, 4:7, 3:5] = 2
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(ref / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.roll(labels, 1, axis=0), np.eye(4)), str(pred / f"c{i}.nii.gz"))
    return pred, ref


def test_help_imports_nothing_heavy():
    assert heavy_after(cli(["--help"])) == []
    assert heavy_after(cli(["evaluate", "--help"])) == []


def test_evaluate_imports_nothing_heavy(cases, tmp_path):
    pred, ref = cases
    out = tmp_path / "out"
    assert heavy_after(cli(["evaluate", "--pred", str(pred), "--ref", str(ref), "-o", str(out)])) == []
    assert len(pd.read_csv(out / "per_case.csv")) == 6  # the command really ran


def test_packages_export_lazily():
    assert heavy_after("import medslim.cli, medslim.load.totalseg, " + ", ".join(PACKAGES)) == []
    import importlib

    for name in PACKAGES:  # every re-exported name still resolves
        package = importlib.import_module(name)
        for attr in package.__all__:
            assert getattr(package, attr) is not None, f"{name}.{attr}"
            assert attr in dir(package)
        with pytest.raises(AttributeError):
            getattr(package, "no_such_name")


@pytest.mark.parametrize("elapsed, done, remaining, workers, pays", [
    (0.013, 1, 59, 2, False),  # 60 Hippocampus cases: 0.8 s of work left, a pool costs more
    (3.0, 1, 5, 2, True),      # full-resolution CTs: 15 s left
    (30.0, 1, 1, 2, False),    # one case left: nothing to share
    (30.0, 1, 5, 1, False),    # one CPU
    (0.0, 0, 5, 2, False),     # nothing timed yet
])
def test_pool_pays(elapsed, done, remaining, workers, pays):
    assert folder._pool_pays(elapsed, done, remaining, workers) is pays


@pytest.mark.parametrize("workers, start_seconds, pooled", [
    (None, 1e9, []),                # default, pool start-up too dear: all cases here
    (None, 0.0, ["c1", "c2"]),      # default, pool free: the first case here, the rest in workers
    (2, 1e9, ["c0", "c1", "c2"]),   # explicit --workers 2: always the pool
    (1, 0.0, []),
])
def test_workers_start_only_when_they_pay(cases, monkeypatch, workers, start_seconds, pooled):
    sent = []

    def fake_pool(todo, args, n, on_done):  # scores here; records what would have gone to workers
        for case in todo:
            sent.append(case.name)
            on_done(case.name, folder._score(case, *args))

    monkeypatch.setattr(folder, "POOL_START_SECONDS", start_seconds)
    monkeypatch.setattr(folder, "_score_in_pool", fake_pool)
    monkeypatch.setattr(folder, "default_workers", lambda: 2)
    table = folder.score_dataset(find_cases(*cases), workers=workers)
    assert sent == pooled
    assert list(dict.fromkeys(table["case"])) == ["c0", "c1", "c2"]


def test_csv_as_pandas_writes_it(tmp_path):
    table = {"case": np.array(["a", "b,c", "d"], object), "class_id": np.array([1, 2, 3]),
             "class": np.array(["liver", 'say "x"', "3"], object), "dice": np.array([1.0, np.nan, 1 / 3]),
             "nsd": np.array([0.0, np.nan, 2 / 3]), "ref_voxels": np.array([5, 0, 7]),
             "pred_voxels": np.array([5, 1, 0])}
    write_csv(tmp_path / "ours.csv", table)
    expected = pd.DataFrame(table, columns=COLUMNS).to_csv(index=False, float_format="%.10g")
    assert (tmp_path / "ours.csv").read_text() == expected
