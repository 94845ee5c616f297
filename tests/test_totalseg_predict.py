"""A compressed TotalSegmentator model gives TotalSegmentator's outputs on a real CT
(``medslim predict``): per-structure files named by the class map, or one multi-label map,
on the input's grid, without touching the original model folder or the input."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHARED, TS_PLANS, assert_user_error, tree_digest
from medslim.api import compress_model
from medslim.cli import app
from medslim.compress import CompressConfig
from medslim.load import load_results_folder

CT = SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"
TS_FAST_SEG = SHARED / "totalsegmentator" / "example_seg_fast.nii.gz"  # TotalSegmentator --fast on CT
ROIS = ["liver", "spleen", "aorta"]


@pytest.fixture(scope="module")
def compressed_ts(totalseg_dir, tmp_path_factory):
    """The TotalSegmentator 3 mm stand-in compressed (DF 0.3, ρ 0.5, all sites), and the digest
    of the original folder taken before compression."""
    before = tree_digest(totalseg_dir)
    out = tmp_path_factory.mktemp("ts") / "compressed"
    compress_model(load_results_folder(totalseg_dir), CompressConfig(df=0.3, prune_ratio=0.5, prune_site="all"), out)
    return out, before


@pytest.fixture(scope="module")
def ml_map(compressed_ts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "seg.nii.gz"
    ct_before = CT.read_bytes()
    result = CliRunner().invoke(app, ["predict", str(compressed_ts[0]), "-i", str(CT), "-o", str(out), "--ml",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert CT.read_bytes() == ct_before
    return nib.load(str(out))


def test_multilabel_map_on_totalsegmentators_grid(ml_map, compressed_ts, totalseg_dir):
    reference = nib.load(str(TS_FAST_SEG))
    assert ml_map.shape == reference.shape
    np.testing.assert_allclose(ml_map.affine, reference.affine, atol=1e-4)
    assert ml_map.get_data_dtype() == np.uint8
    labels = np.unique(np.asarray(ml_map.dataobj))
    assert labels.min() >= 0 and labels.max() <= 117
    assert len(labels) > 1  # the (random-weight) network predicts something beyond background
    assert tree_digest(totalseg_dir) == compressed_ts[1], "the original model folder was modified"


def test_per_structure_files_named_by_class_map_match_the_multilabel_map(ml_map, compressed_ts, tmp_path):
    out = tmp_path / "segmentations"
    result = CliRunner().invoke(app, ["predict", str(compressed_ts[0]), "-i", str(CT), "-o", str(out),
                                      "--roi-subset", ",".join(ROIS), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r}.nii.gz" for r in ROIS)
    (tmp_path / "made_by_mkdir").mkdir()  # written atomically, yet with the usual (umask) mode
    assert out.stat().st_mode & 0o777 == (tmp_path / "made_by_mkdir").stat().st_mode & 0o777
    names = {v: k for k, v in json.loads(TS_PLANS.read_text())["labels"].items()}
    ml = np.asarray(ml_map.dataobj)
    for roi in ROIS:
        ident = next(i for i, n in names.items() if n == roi)
        img = nib.load(str(out / f"{roi}.nii.gz"))
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, ml_map.affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj), (ml == ident).astype(np.uint8))


@pytest.mark.parametrize("args, match", [
    (["-i", str(TS_PLANS)], "is not a NIfTI file"),
    (["-i", str(CT), "--roi-subset", "livr"], "did you mean 'liver'"),
    (["-i", str(CT), "--ml"], "give a .nii.gz name"),
    (["-i", str(CT), "--device", "tpu"], "--device must be"),
])
def test_bad_input_is_one_line_before_any_prediction(compressed_ts, tmp_path, args, match):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(compressed_ts[0]), "-o", str(out), *args])
    assert_user_error(result, out, match)


def test_existing_output_is_kept(compressed_ts, tmp_path):
    out = tmp_path / "segs"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = CliRunner().invoke(app, ["predict", str(compressed_ts[0]), "-i", str(CT), "-o", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
