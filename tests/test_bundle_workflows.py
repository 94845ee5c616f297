"""medslim inside MONAI's own bundle workflows (``medslim.bundle.workflows``):
``monai.bundle run compress`` with ``configs/compress.json``, and the compressed bundle's
``finetune.json`` + ``distill.json`` overlays on its own ``train.json`` — the spleen bundle's
real training workflow (SupervisedTrainer, DiceCE, Novograd, CheckpointSaver) on a real CT."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SHARED, monai_bundle
from test_bundle_compress import make_bundle, n_params, rebuilt

pytest.importorskip("ignite")
pytestmark = pytest.mark.usefixtures("one_thread")
TS = SHARED / "totalsegmentator"


def test_monai_bundle_run_compress_writes_the_compressed_bundle(tmp_path):
    from medslim.bundle.workflows import COMPRESS_FILE, compress_config

    bundle = tmp_path / "bundle"
    original = make_bundle(bundle)
    (bundle / "configs" / COMPRESS_FILE).write_text(json.dumps(compress_config({"df": 0.5, "prune_ratio": 0.5})))
    monai_bundle(bundle, "run", "compress", "--config_file", "['configs/inference.json','configs/compress.json']",
                 "--bundle_root", str(bundle), threads=1)
    out = tmp_path / "bundle_compressed"
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["medslim"]["compression"]["kept"] and n_params(rebuilt(out)) < 0.5 * n_params(original)


def _spleen_dataset(folder: Path) -> Path:
    """The example CT and its spleen (class 1 of TotalSegmentator's map) as a one-case
    ``imagesTr``/``labelsTr`` dataset."""
    (folder / "imagesTr").mkdir(parents=True), (folder / "labelsTr").mkdir()
    shutil.copyfile(TS / "example_ct_sm.nii.gz", folder / "imagesTr" / "ct.nii.gz")
    seg = nib.load(TS / "example_seg.nii.gz")
    spleen = (np.asarray(seg.dataobj) == 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(spleen, seg.affine), folder / "labelsTr" / "ct.nii.gz")
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A compressed spleen bundle fine-tuned for one epoch with distillation by
    ``monai.bundle run`` on its own train.json (+ a data overlay: one case, 32³ crops, CPU, no
    TensorBoard)."""
    from medslim.cli import app
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("workflow")
    make_bundle(tmp / "bundle")
    out = tmp / "compressed"
    result = CliRunner().invoke(app, ["compress-bundle", str(tmp / "bundle"), "-o", str(out), "--df", "0.5", "--prune", "0.5"])
    assert result.exit_code == 0, result.output
    before = torch.load(out / "models" / "model.pt", weights_only=True)
    one_case = "$[{'image': i, 'label': l} for i, l in zip(@images, @labels)]"
    train = json.loads((out / "configs" / "train.json").read_text())
    data = tmp / "data.json"
    data.write_text(json.dumps({
        "dataset_dir": str(_spleen_dataset(tmp / "data")), "output_dir": str(tmp / "eval"), "epochs": 1,
        "device": "$torch.device('cpu')",
        "train#dataset#data": one_case, "train#dataset#num_workers": 0, "train#dataloader#num_workers": 0,
        "train#random_transforms#0#spatial_size": [32, 32, 32], "train#random_transforms#0#num_samples": 2,
        "validate#dataset#data": one_case, "validate#dataset#num_workers": 0, "validate#dataloader#num_workers": 0,
        "validate#inferer#roi_size": [64, 64, 32], "train#trainer#amp": False, "validate#evaluator#amp": False,
        # the bundle's handlers without TensorBoard's (tensorboard is not installed here)
        "train#handlers": [h for h in train["train"]["handlers"] if "TensorBoard" not in h["_target_"]],
        "validate#handlers": [h for h in train["validate"]["handlers"] if "TensorBoard" not in h["_target_"]]}))
    # the data overlay first: distill.json then appends its handler to the bundle's list
    (tmp / "kd.json").write_text(json.dumps({"medslim_kd_weight": 2.0}))  # a user's setting, last
    files = [str(out / "configs" / "train.json"), str(data), str(out / "configs" / "finetune.json"),
             str(out / "configs" / "distill.json"), str(tmp / "kd.json")]
    monai_bundle(out, "run", "--config_file", str(files), threads=1)
    return out, before, files


def test_distillation_overlay_wires_the_teacher_into_the_bundle_trainer(finetuned):
    from monai.bundle import ConfigParser

    from medslim.finetune.distill import DistillationLoss
    from medslim.finetune.monai_kd import TeacherOutputs

    out, _, files = finetuned
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(out)
    loss = parser.get_parsed_content("train#trainer#loss_function")
    handlers = parser.get_parsed_content("train#handlers")
    assert isinstance(loss, DistillationLoss) and loss.weight == 2.0
    teacher = next(h for h in handlers if isinstance(h, TeacherOutputs))
    assert teacher.loss is loss and not any(p.requires_grad for p in teacher.teacher.parameters())
    # the teacher is the original network with the original weights
    original = torch.load(Path(parser["medslim_teacher_ckpt"]), weights_only=True)
    assert all(torch.equal(teacher.teacher.state_dict()[k], v) for k, v in original.items())


def test_finetune_overlay_trains_the_compressed_network_and_saves_it(finetuned):
    out, before, _ = finetuned
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    saved = saved.get("model", saved)
    assert saved.keys() == before.keys()
    assert any(not torch.equal(saved[k], before[k]) for k in before if saved[k].is_floating_point())
    net = rebuilt(out)  # the inference config rebuilds it and loads the fine-tuned weights strictly
    with torch.no_grad():
        assert torch.isfinite(net(torch.zeros(1, 1, 32, 32, 32))).all()


def test_bundle_config_command_writes_compress_json_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from conftest import assert_user_error
    from medslim.cli import app

    target = tmp_path / "compress.json"
    result = CliRunner().invoke(app, ["bundle-config", "-o", str(target), "--df", "0.4", "--prune", "0.25"])
    assert result.exit_code == 0, result.output
    written = json.loads(target.read_text())
    assert written["medslim_settings"] == {"df": 0.4, "prune_ratio": 0.25, "criterion": "hvs", "seed": 0}
    assert "compress_from_config" in written["compress"]
    assert_user_error(CliRunner().invoke(app, ["bundle-config", "-o", str(target)]), tmp_path / "none", "already exists")
    assert_user_error(CliRunner().invoke(app, ["bundle-config", "-o", str(tmp_path / "new.json"), "--df", "2"]),
                      tmp_path / "new.json", "--df must be in (0, 1]")
