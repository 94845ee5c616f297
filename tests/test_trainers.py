"""medslim's nnU-Net trainers with stock ``nnUNetv2_train``/``nnUNetv2_predict`` on the real
Hippocampus data: plan/preprocess → compress-then-fine-tune (tiny CPU budget) → predict held-out
test cases → Dice; ``--c``; and bad input failing before any training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from medslim.errors import MedslimError
from medslim.evaluate import mean_dice_folder
from medslim.finetune import SCHEDULES, resolve_config
from medslim.finetune.hippocampus import DATASET, PLANS
from medslim.network import COMPRESSED_CLASS
from medslim.finetune.nnunet import (
    load_full_weights,
    pretrained_weights_arg,
)

CKPT = REPO / "src" / "medslim" / "default_model" / "Dataset004_Hippocampus" / "fold_0" / "checkpoint_final.pth"
TRAINER = "nnUNetTrainerMedslim"
N_CASES = 5
BIN = Path(sys.executable).parent


def train(env: dict[str, str], trainer: str, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = ["nice", "-n", "10", str(BIN / "nnUNetv2_train"), "4", "3d_fullres", "0", "-p", PLANS, "-tr", trainer,
           "-device", "cpu", *extra]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def predict(env: dict[str, str], trainer: str, images: Path, out: Path, checkpoint: str) -> Path:
    subprocess.run(["nice", "-n", "10", str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", "4",
                    "-c", "3d_fullres", "-p", PLANS, "-tr", trainer, "-f", "0", "-chk", checkpoint,
                    "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
                   env=env, check=True, capture_output=True, timeout=600)
    return out


def trained_folder(workdir: tuple[Path, dict[str, str]], trainer: str, epochs: int, iters: int) -> Path:
    """Run ``trainer`` from the reference checkpoint for ``epochs`` x ``iters``; its results folder."""
    work, env = workdir
    run = train(dict(env, MEDSLIM_EPOCHS=str(epochs), MEDSLIM_ITERS=str(iters)), trainer, "-pretrained_weights", str(CKPT))
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__3d_fullres"


def train_with_config(workdir: tuple[Path, dict[str, str]], tmp_path: Path, config: dict) -> Path:
    """Run ``TRAINER`` from the reference checkpoint with ``config`` into ``tmp_path``; its results folder."""
    work, env = workdir
    path = tmp_path / "medslim.json"
    path.write_text(json.dumps(config))
    results = tmp_path / "results"
    run = train(dict(env, MEDSLIM_CONFIG=str(path), nnUNet_results=str(results)), TRAINER, "-pretrained_weights", str(CKPT))
    assert run.returncode == 0, run.stderr[-3000:]
    return results / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"


@pytest.fixture(scope="module")
def workdir(hippocampus_nnunet) -> tuple[Path, dict[str, str]]:
    work, env = hippocampus_nnunet
    config = work / "finetune.json"
    # The thesis schedule (Adam, lr 1e-4) with a tiny budget: 2 epochs x 6 updates.
    config.write_text(json.dumps({"epochs": 2, "iterations": 6,
                                  "val_iterations": 1, "dataset_name": DATASET, "plans_name": PLANS}))
    env = dict(env, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", MEDSLIM_CONFIG=str(config), OMP_NUM_THREADS="2")
    return work, env


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    work, env = workdir
    run = train(env, TRAINER, "-pretrained_weights", str(CKPT))
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"


@pytest.fixture(scope="module")
def test_images(workdir) -> tuple[Path, list[str]]:
    work, _ = workdir
    cases = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"][:N_CASES]
    folder = work / "imagesTs_subset"
    folder.mkdir()
    for case in cases:
        (folder / f"{case}_0000.nii.gz").symlink_to(work / "nnUNet_raw" / DATASET / "imagesTsLabeled" / f"{case}_0000.nii.gz")
    return folder, cases


@pytest.mark.slow
def test_results_folder_names_compressed_network_and_config(trained):
    plans = json.loads((trained / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == COMPRESSED_CLASS
    assert arch["arch_kwargs"]["compression"]["kept"], "nothing was pruned at rho 0.5"
    record = json.loads((trained / "medslim_config.json").read_text())
    assert record["config"]["df"] == 0.3 and record["config"]["prune_ratio"] == 0.5
    assert record["config"]["optimizer"] == "adam" and record["config"]["updates"] == 12
    report = record["compression_report"]
    assert report["parameters_after"] < 0.5 * report["parameters_before"]
    ckpt = torch.load(trained / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == TRAINER
    before = torch.load(trained / "fold_0" / "checkpoint_compressed.pth", map_location="cpu", weights_only=False)
    # the not-yet-fine-tuned checkpoint predicts like the final one (test-time mirroring included)
    assert before["inference_allowed_mirroring_axes"] == ckpt["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert before["network_weights"].keys() == ckpt["network_weights"].keys()
    # deep supervision heads were trained with the pruned channels: their inputs match the decoder
    heads = {k: v.shape for k, v in ckpt["network_weights"].items() if ".seg_layers." in k and k.endswith("weight")}
    assert len(heads) == 3 and all(s[0] == 3 for s in heads.values())


@pytest.mark.slow
def test_stock_predict_loads_finetuned_model_and_dice_improves(workdir, trained, test_images):
    work, env = workdir
    images, cases = test_images
    labels = work / "nnUNet_raw" / DATASET / "labelsTsLabeled"
    dice = {}
    for chk in ("checkpoint_compressed.pth", "checkpoint_final.pth"):
        out = predict(env, TRAINER, images, work / f"pred_{chk}", chk)
        dice[chk] = mean_dice_folder(out, labels, cases, [1, 2])["mean"]
    print("test-case Dice before/after fine-tuning:", dice)
    assert dice["checkpoint_final.pth"] > dice["checkpoint_compressed.pth"] + 0.01, dice
    assert dice["checkpoint_final.pth"] > 0.3, dice


@pytest.mark.slow
def test_continue_rebuilds_compressed_network(workdir, trained):
    _, env = workdir
    run = train(dict(env, MEDSLIM_EPOCHS="3", MEDSLIM_ITERS="2"), TRAINER, "--c")
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = torch.load(trained / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3
    record = json.loads((trained / "medslim_config.json").read_text())
    assert record["continued"] is True and record["compression_report"]["parameters_after"] > 0


@pytest.mark.slow
def test_control_finetunes_the_uncompressed_model(workdir):
    folder = trained_folder(workdir, "nnUNetTrainerMedslimControl", 1, 3)
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"].endswith(".PlainConvUNet")
    record = json.loads((folder / "medslim_config.json").read_text())
    assert record["config"]["compression"] is None and record["config"]["optimizer"] == "adam"
    after = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    before = torch.load(CKPT, map_location="cpu", weights_only=False)["network_weights"]
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    # 3 Adam updates at lr 1e-4 move a weight by < 1e-3: the heads started from the pretrained ones
    head = "decoder.seg_layers.2.weight"
    assert 0 < (after[head] - before[head]).abs().max() < 1e-2


@pytest.mark.slow
def test_kd_trainer_distills_from_the_pretrained_model(workdir):
    folder = trained_folder(workdir, "nnUNetTrainerMedslimKD", 1, 2)
    config = json.loads((folder / "medslim_config.json").read_text())["config"]
    assert (config["kd_weight"], config["optimizer"], config["lr_schedule"]) == (1.0, "sgd", "poly")
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert f"medslim: distilling from {CKPT}" in log and "λ 1" in log


@pytest.mark.slow
def test_iterative_trainer_compresses_in_stages_and_rebuilds_from_its_plans(workdir, tmp_path):
    folder = train_with_config(workdir, tmp_path, {"epochs": 2, "iterations": 1, "val_iterations": 1, "df": 0.25,
                                                   "steps": 2, "final_validation": False})
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "medslim: stage 2/2 at epoch 1" in log
    from medslim.load import load_results_folder
    model = load_results_folder(folder, "0")  # plans.json of the last stage rebuild the checkpoint
    spec = model.architecture["arch_kwargs"]["compression"]
    assert len(spec["provenance"]["stages"]) == 2
    stage1 = json.loads((folder / "medslim_config.json").read_text())["compression_report"]
    params = sum(p.numel() for p in model.build_network().parameters())
    assert params < 0.5 * stage1["parameters_after"]  # stage 2 shrank the stage-1 network again
    assert not (folder / "fold_0" / "checkpoint_compressed.pth").exists()


@pytest.mark.slow
def test_relief_alpha_rule_scores_on_training_batches(workdir, tmp_path):
    """NN-Relief's α rule (no fixed ratio) needs calibration data: the trainer feeds it training
    batches, and each layer keeps fewer channels than it had."""
    folder = train_with_config(workdir, tmp_path, {"epochs": 1, "iterations": 1, "val_iterations": 1, "df": 0.25,
                                                   "criterion": "relief", "alpha": 0.9, "calibration_batches": 1,
                                                   "final_validation": False})
    spec = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"]["compression"]
    assert spec["provenance"]["config"]["alpha"] == 0.9
    before = torch.load(CKPT, map_location="cpu", weights_only=False)["network_weights"]
    # kept channels are named by the Tucker block's last conv ("….conv.restore"); the original is "….conv"
    widths = {name: before[f"{name.removesuffix('.restore')}.weight"].shape[0] for name in spec["kept"]}
    assert spec["kept"] and any(len(kept) < widths[name] for name, kept in spec["kept"].items())


@pytest.mark.slow
def test_scratch_trainer_keeps_the_architecture_and_redraws_the_weights(workdir, trained):
    folder = trained_folder(workdir, "nnUNetTrainerMedslimScratch", 1, 1) / "fold_0"
    scratch = torch.load(folder / "checkpoint_compressed.pth", map_location="cpu", weights_only=False)["network_weights"]
    pretrained = torch.load(trained / "fold_0" / "checkpoint_compressed.pth", map_location="cpu",
                            weights_only=False)["network_weights"]
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in pretrained.items()}
    convs = [k for k, v in scratch.items() if k.endswith("weight") and v.dim() == 5]
    assert convs and all(not torch.equal(scratch[k], pretrained[k]) for k in convs)
    norms = [k for k, v in scratch.items() if ".norm." in k and k.endswith("weight")]
    assert norms and all(torch.equal(scratch[k], torch.ones_like(scratch[k])) for k in norms)


@pytest.mark.slow
@pytest.mark.parametrize("problem, extra, config, message", [
    ("missing weights", [], None, "pass -pretrained_weights"),
    ("weights file absent", ["-pretrained_weights", "/nonexistent/checkpoint_final.pth"], None, "does not exist"),
    ("unknown key", ["-pretrained_weights", str(CKPT)], {"df": 0.3, "learning_rate": 1e-4}, "unknown key(s) learning_rate"),
    ("out of range", ["-pretrained_weights", str(CKPT)], {"prune_ratio": 1.5}, "--prune must be in [0, 1)"),
    ("other plans", ["-pretrained_weights", str(CKPT)], {"plans_name": "nnUNetPlans"}, "expects plans_name 'nnUNetPlans'"),
])
def test_bad_input_fails_before_training(workdir, tmp_path, problem, extra, config, message):
    work, env = workdir
    env = dict(env)
    if config is not None:
        (tmp_path / "bad.json").write_text(json.dumps(config))
        env["MEDSLIM_CONFIG"] = str(tmp_path / "bad.json")
    trainer = "nnUNetTrainerMedslimWeber"
    run = train(env, trainer, *extra, timeout=120)
    assert run.returncode != 0
    assert "MedslimError: " in run.stderr and message in run.stderr, run.stderr[-2000:]
    assert not (work / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__3d_fullres").exists()


@pytest.mark.slow
def test_incompatible_weights_fail_before_training(workdir, tmp_path):
    work, env = workdir
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=False)
    key = "decoder.stages.0.convs.0.conv.weight"
    ckpt["network_weights"][key] = ckpt["network_weights"][key][:, :7]
    torch.save(ckpt, tmp_path / "bad.pth")
    trainer = "nnUNetTrainerMedslim_DF0p9_P0p0"
    run = train(env, trainer, "-pretrained_weights", str(tmp_path / "bad.pth"), timeout=300)
    assert run.returncode != 0
    assert "MedslimError: " in run.stderr and f"'{key}' has shape" in run.stderr, run.stderr[-2000:]
    folder = work / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__3d_fullres" / "fold_0"
    assert not list(folder.glob("checkpoint_*.pth")) and not (folder.parent / "plans.json").exists()


# --- library side, no nnU-Net run -------------------------------------------------------------

def test_schedules_and_overrides(tmp_path):
    thesis = resolve_config()
    assert (thesis.optimizer, thesis.lr, thesis.updates) == ("adam", 1e-4, 200)
    weber = resolve_config({"schedule": "weber"})
    assert (weber.optimizer, weber.lr, weber.epochs, weber.rank_min) == ("adamw", 1e-5, 50, 8)
    env = resolve_config({"schedule": "weber"}, environ={"MEDSLIM_EPOCHS": "3", "MEDSLIM_ITERS": "7"})
    assert (env.epochs, env.iterations, env.lr) == (3, 7, 1e-5)
    control = resolve_config({"compress": False})
    assert control.to_dict()["compression"] is None and control.updates == thesis.updates
    assert set(SCHEDULES) == {"thesis", "weber", "nnunet"}
    staged = resolve_config({"schedule": "nnunet", "steps": 2, "df": 0.25, "prune_ratio": 0.75})
    stage = staged.stage_compression()
    assert (stage.df, stage.prune_ratio, staged.stage_epochs()) == (0.5, 0.5, [0, 10])
    assert resolve_config().stage_compression() == resolve_config().compression()
    nnunet = resolve_config({"schedule": "nnunet"})
    assert (nnunet.optimizer, nnunet.lr, nnunet.lr_schedule, nnunet.updates) == ("sgd", 1e-2, "poly", 1000)


@pytest.mark.parametrize("config, message", [
    ({"df": 0.0}, "--df must be in (0, 1]"),
    ({"df": "0.3"}, "'df' must be a number"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"criterion": "magic"}, "magic"),
    ({"prune_site": "nowhere"}, "unknown prune site"),
    ({"schedule": "fast"}, "unknown schedule 'fast'"),
    ({"kd_weight": -1}, "kd_weight must be >= 0"),
    ({"kd_temperature": 0}, "kd_temperature must be > 0"),
    ({"kd_levels": "middle"}, "unknown kd_levels 'middle'"),
    ({"init": "zeros"}, "unknown init 'zeros'"),
    ({"steps": 5, "epochs": 4}, "steps (5) must not exceed epochs (4)"),
    ({"steps": 2, "prune_site": "rank"}, "supports prune_site 'outer' only"),
    ({"steps": 2, "epochs": 4, "criterion": "relief", "alpha": 0.9}, "with iterative compression (steps > 1) is not supported"),
    ({"prune_ratio": 0.3}, "the trainer fixes prune_ratio=0.5"),
])
def test_config_errors(tmp_path, config, message):
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(MedslimError) as err:
        resolve_config({"prune_ratio": 0.5}, tmp_path / "c.json")
    assert message in str(err.value)


def test_config_must_match_plans(reference):
    cfg = resolve_config(None)
    cfg.check_plans(reference.plans, "3d_fullres")
    with pytest.raises(MedslimError, match="expects configuration '2d'"):
        resolve_config({"configuration": "2d"}).check_plans(reference.plans, "3d_fullres")
    compressed = json.loads(json.dumps(reference.plans))
    compressed["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = COMPRESSED_CLASS
    with pytest.raises(MedslimError, match="already describe a medslim-compressed network"):
        cfg.check_plans(compressed, "3d_fullres")
    resolve_config({"compress": False}).check_plans(compressed, "3d_fullres")


def test_full_weights_include_heads_and_reject_mismatch(reference, tmp_path):
    net = reference.build_network()
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    load_full_weights(net, CKPT)
    ref = torch.load(CKPT, map_location="cpu", weights_only=False)["network_weights"]
    assert torch.equal(net.state_dict()["decoder.seg_layers.2.weight"], ref["decoder.seg_layers.2.weight"])
    with pytest.raises(MedslimError, match="is not an nnU-Net checkpoint"):
        torch.save({"weights": {}}, tmp_path / "x.pth")
        load_full_weights(net, tmp_path / "x.pth")
    assert pretrained_weights_arg(["nnUNetv2_train", "4", "-pretrained_weights", "a.pth"], {}) == "a.pth"
    assert pretrained_weights_arg(["nnUNetv2_train"], {"MEDSLIM_PRETRAINED_WEIGHTS": "b.pth"}) == "b.pth"
    assert pretrained_weights_arg(["nnUNetv2_train"], {}) is None
