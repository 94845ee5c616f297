"""Folders: a TotalSegmentator-layout dataset built in a temp dir from the shared example maps,
and nnU-Net folders of Hippocampus labels; per-case frames, summaries, parallel runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medslim.errors import MedslimError
from medslim.evaluate import evaluate_folder, score_label_maps, summarize, total_class_map
from medslim.evaluate.outputs import markdown_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TS = SHARED / "totalsegmentator"
HIPPO = SHARED / "Task04_Hippocampus"
HIPPO_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


def split_structures(label_map: Path, folder: Path, names: dict[int, str]) -> None:
    """Write ``folder/<structure>.nii.gz`` for every class, as TotalSegmentator does."""
    img = nib.load(str(label_map))
    data = np.asanyarray(img.dataobj)
    folder.mkdir(parents=True)
    for i, name in names.items():
        nib.save(nib.Nifti1Image((data == i).astype(np.uint8), img.affine), str(folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def ts_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """REF: s01 (test), s02 (train), both = example_seg split per structure, plus meta.csv.
    PRED: s01 as a multi-label map, s02 as a per-structure folder, both = example_seg_fast."""
    root = tmp_path_factory.mktemp("ts")
    ref, pred = root / "ref", root / "pred"
    names = total_class_map()
    for image_id in ("s01", "s02"):
        split_structures(TS / "example_seg.nii.gz", ref / image_id / "segmentations", names)
    (ref / "meta.csv").write_text("image_id;split\ns01;test\ns02;train\n")
    pred.mkdir()
    shutil.copy(TS / "example_seg_fast.nii.gz", pred / "s01.nii.gz")
    split_structures(TS / "example_seg_fast.nii.gz", pred / "s02", names)
    return pred, ref


def arrays(path: Path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms())


def test_total_class_map_is_totalsegmentators_label_order():
    plans = json.loads((TS / "Dataset297_total_3mm_plans_reconstructed.json").read_text())["labels"]
    assert total_class_map() == {v: k for k, v in plans.items() if v}


def test_totalseg_layout_split_and_names(ts_dataset):
    pred, ref = ts_dataset
    frame = evaluate_folder(pred, ref, split="test", workers=1)
    assert list(frame["case"].unique()) == ["s01"]
    assert len(frame) == 117
    assert list(frame["class"]) == list(total_class_map().values())
    assert frame.loc[frame["class"] == "liver", "class_id"].item() == 5
    r, sp = arrays(TS / "example_seg.nii.gz")
    p, _ = arrays(TS / "example_seg_fast.nii.gz")
    direct = score_label_maps(r, p, sp, range(1, 118), 3.0)
    np.testing.assert_array_equal(frame["nsd"].to_numpy(), direct.nsd)
    np.testing.assert_array_equal(frame["dice"].to_numpy(), direct.dice)
    assert frame["nsd"].notna().sum() >= 30


def test_totalseg_per_structure_prediction_equals_multilabel(ts_dataset):
    pred, ref = ts_dataset
    frame = evaluate_folder(pred, ref, workers=1, classes=["liver", "spleen", "7"])
    assert sorted(frame["case"].unique()) == ["s01", "s02"]
    a, b = (frame[frame["case"] == c].drop(columns="case").reset_index(drop=True) for c in ("s01", "s02"))
    pd.testing.assert_frame_equal(a, b)
    assert list(a["class"]) == ["spleen", "liver", "pancreas"]


def test_unknown_split_and_class_suggest(ts_dataset):
    pred, ref = ts_dataset
    with pytest.raises(MedslimError, match="unknown split 'tset'.*did you mean 'test'.*train"):
        evaluate_folder(pred, ref, split="tset")
    with pytest.raises(MedslimError, match="unknown class 'livr'.*did you mean 'liver'"):
        evaluate_folder(pred, ref, classes=["livr"])


@pytest.fixture
def hippo(tmp_path) -> tuple[Path, Path]:
    """nnU-Net folders: references = 4 Hippocampus labels; predictions = shifted copies."""
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i, case in enumerate(HIPPO_CASES):
        shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", ref / f"{case}.nii.gz")
        img = nib.load(str(ref / f"{case}.nii.gz"))
        data = np.rint(np.asanyarray(img.dataobj)).astype(np.uint8)
        nib.save(nib.Nifti1Image(np.roll(data, i % 3, axis=i % 3), img.affine), str(pred / f"{case}.nii.gz"))
    return pred, ref


def test_nnunet_folder_names_workers_and_summary(hippo):
    pred, ref = hippo
    named = evaluate_folder(pred, ref, dataset_json=HIPPO / "dataset.json", workers=1)
    assert list(named["class"].unique()) == ["Anterior", "Posterior"]
    assert list(named["case"].unique()) == HIPPO_CASES
    first = named[named["case"] == HIPPO_CASES[0]]
    assert (first["dice"] == 1.0).all() and (first["nsd"] == 1.0).all()  # roll by 0: identical
    assert (named["dice"] < 1.0).sum() >= 4
    parallel = evaluate_folder(pred, ref, dataset_json=HIPPO / "dataset.json", workers=2)
    pd.testing.assert_frame_equal(named, parallel)
    by_id = evaluate_folder(pred, ref, workers=1)
    assert list(by_id["class"].unique()) == ["1", "2"]
    np.testing.assert_array_equal(by_id["nsd"], named["nsd"])

    s = summarize(named, 3.0)
    assert s["n_cases"] == 4 and s["classes"]["Posterior"]["n_cases"] == 4
    per_case = named.groupby("case")[["dice", "nsd"]].mean()
    assert s["overall"]["nsd"]["mean"] == pytest.approx(per_case["nsd"].mean())
    assert s["classes"]["Anterior"]["dice"]["median"] == pytest.approx(named[named["class"] == "Anterior"]["dice"].median())
    table = markdown_table(s)
    assert "| Anterior | 4 |" in table and "**all" in table


def test_empty_reference_class_is_not_counted(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    data = np.zeros((8, 8, 8), np.uint8)
    data[2:5, 2:5, 2:5] = 1
    only_pred = data.copy()
    only_pred[6, 6, 6] = 2  # class 2: absent from the reference, present in the prediction
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(ref / "a.nii.gz"))
    nib.save(nib.Nifti1Image(only_pred, np.eye(4)), str(pred / "a.nii.gz"))
    frame = evaluate_folder(pred, ref, workers=1)
    row = frame[frame["class_id"] == 2].iloc[0]
    assert np.isnan(row["dice"]) and np.isnan(row["nsd"]) and row["pred_voxels"] == 1
    s = summarize(frame, 3.0)
    assert s["classes"]["2"]["empty_reference"] == ["a"] and s["classes"]["2"]["dice"]["mean"] is None
    assert s["overall"]["dice"]["mean"] == 1.0


def test_totalseg_cli_split_classes_and_outputs(ts_dataset, tmp_path):
    from typer.testing import CliRunner

    from medslim.cli import app

    pred, ref = ts_dataset
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--ref", str(ref), "--split", "train",
                                      "--classes", "liver,spleen,colon", "-o", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "per_case.csv")
    assert list(frame["case"]) == ["s02"] * 3 and list(frame["class"]) == ["spleen", "liver", "colon"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == {"pred": str(pred), "ref": str(ref), "layout": "totalsegmentator",
                                 "mode": "reference", "split": "train"}
    assert set(summary["classes"]) == {"spleen", "liver", "colon"} and summary["cases"] == ["s02"]
    assert "| liver | 1 |" in result.stdout
    bad = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--ref", str(ref), "--split", "tst"])
    assert bad.exit_code == 2 and "did you mean 'test'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_totalseg_bad_structures_and_labels(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:4, 1:4, 1:4] = 1
    (ref / "a" / "segmentations").mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(ref / "a" / "segmentations" / "liver.nii.gz"))
    (pred / "a").mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(pred / "a" / "livr.nii.gz"))
    with pytest.raises(MedslimError, match="unknown structure 'livr'; did you mean 'liver'"):
        evaluate_folder(pred, ref, workers=1)
    shutil.rmtree(pred / "a")
    nib.save(nib.Nifti1Image(mask * 200, np.eye(4)), str(pred / "a.nii.gz"))
    with pytest.raises(MedslimError, match=r"case a: prediction .* label\(s\) \[200\] outside the 117-class map"):
        evaluate_folder(pred, ref, workers=1)
    nib.save(nib.Nifti1Image(mask * 5, np.eye(4)), str(pred / "a.nii.gz"))  # 5 = liver
    frame = evaluate_folder(pred, ref, workers=1)
    assert frame.set_index("class").loc["liver", "nsd"] == 1.0 and frame["nsd"].notna().sum() == 1
