"""LOBSTER and SeReNe (``medslim.finetune.regularize``/``sparsify``): the update and the
sensitivity by hand, the threshold search at its tolerance, SeReNe's removal of zeroed channels
on the reference model, and one tiny run of each trainer with stock ``nnUNetv2_train``."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medslim.errors import MedslimError
from medslim.finetune import resolve_config
from medslim.finetune.regularize import channel_sensitivity, lobster_update, plateaued, threshold_search
from medslim.finetune.sparsify import LobsterRegularizer, attach, make_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lobster_update_by_hand():
    theta = torch.tensor([0.5, -2.0, 1.0])
    grad = torch.tensor([0.2, -0.5, 3.0])
    # η 0.1, λ 0.01: θ − ηg − λθ·max(0, 1 − |g|)
    # 0.5 − 0.02 − 0.01·0.5·0.8 = 0.476; −2 + 0.05 + 0.01·2·0.5 = −1.94; 1 − 0.3 − 0 (|g| > 1) = 0.7
    want = torch.tensor([0.476, -1.94, 0.7])
    assert torch.allclose(lobster_update(theta, grad, 0.1, 0.01), want)
    # the trainer's path: SGD's own step + the decoupled shrinkage hooked before it
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(theta[None])
    layer.weight.grad = grad[None].clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    attach(opt, LobsterRegularizer(layer, 0.01))
    opt.step()
    assert torch.allclose(layer.weight[0].detach(), want)


def test_serene_sensitivity_by_hand():
    # p = W1·x + b1 per position (1×1 conv), y = softmax(W2·relu(p)) over 2 classes.
    net = nn.Sequential(nn.Conv1d(1, 2, 1), nn.ReLU(), nn.Conv1d(2, 2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[1.0]], [[-1.0]]]))
        net[0].bias.copy_(torch.tensor([0.0, 1.5]))
        net[2].weight.copy_(torch.tensor([[[2.0], [1.0]], [[0.0], [3.0]]]))
    x = torch.tensor([[[1.0, 2.0]]])  # positions: p = [1, 0.5] and [2, −0.5]
    # logits [2.5, 1.5] and [4, 0]: with two classes ∂y_0/∂p_i = σ'(z0 − z1)·(W2[0,i] − W2[1,i])·relu'(p_i)
    # and ∂y_1/∂p_i = −∂y_0/∂p_i, so S_i = mean over positions of σ'(Δz)·|ΔW_i|·relu'(p_i), ΔW = [2, −2].
    d = [math.exp(-a) / (1 + math.exp(-a)) ** 2 for a in (1.0, 4.0)]
    want = torch.tensor([(2 * d[0] + 2 * d[1]) / 2, (2 * d[0] + 0.0) / 2])
    s = channel_sensitivity(net, ["0"], x)["0"]
    assert torch.allclose(s, want, atol=1e-6), (s, want)


def test_threshold_search_stops_at_the_tolerance():
    scores = torch.arange(1, 11) / 10  # 0.1 … 1.0
    calls = []

    def loss_at(t: float) -> float:  # every pruned score costs 0.01 on a base loss of −1
        calls.append(t)
        return -1.0 + 0.01 * int((scores < t).sum())

    r = threshold_search(scores, loss_at, tolerance=0.035)
    assert r.base_loss == -1.0 and r.budget == pytest.approx(-0.965)
    assert int((scores < r.threshold).sum()) == 3  # a 4th would cost 0.04 > 0.035
    assert r.loss <= r.budget and loss_at(0.41) > r.budget
    assert r.evaluations == 4 == len(calls) - 1  # L̂, then bisection over 10 sorted values: 3 steps
    assert threshold_search(scores, lambda t: 0.0 if t == 0 else 1.0, 0.0).threshold == 0.0
    with pytest.raises(MedslimError, match="tolerance must be >= 0"):
        threshold_search(scores, loss_at, -0.1)


def test_threshold_search_resolves_clustered_scores():
    # 800 scores within 1e-4 of 0.8145 (four uniform shrinkage steps): a bisection of [0, max]
    # at max/1024 cannot tell them apart; on ranks it zeroes exactly what the budget allows.
    scores = 0.8145 + 1e-4 * torch.rand(800, generator=torch.Generator().manual_seed(0))
    r = threshold_search(scores, lambda t: -1.0 + 0.001 * int((scores < t).sum()), tolerance=0.1)
    assert int((scores < r.threshold).sum()) == 100
    assert r.evaluations <= 1 + math.ceil(math.log2(800))


def test_plateau():
    assert not plateaued([1.0, 0.9], patience=2)
    assert not plateaued([1.0, 0.9, 0.8], patience=2)
    assert plateaued([1.0, 0.9, 0.95, 0.9], patience=2)


def test_serene_removal_equals_the_masked_network_and_rebuilds_from_its_spec(reference, hippo_patch):
    from medslim.finetune.nnunet import build_compressed, compressed_plans

    net = reference.build_network().eval()
    reg = make_regularizer(net, "serene", 0.5, 1)
    torch.manual_seed(0)
    for root in reg.groups:  # uneven shrinkage, as insensitive channels get
        reg.insens[root] = torch.rand(reg.insens[root].numel())
    for _ in range(3):
        reg.before_step()
    total = sum(a.numel() for a in reg.alive.values())

    def loss() -> float:  # 1 + the fraction of zeroed channels, counted on the network
        return 1.0 + sum(int((reg.channel_norms(r) == 0).sum()) for r in reg.groups) / total

    reg.threshold(loss, tolerance=0.2)
    assert 0 < reg.dead_count() <= 0.2 * total
    with torch.no_grad():
        masked = net(hippo_patch)
    pruned, spec = reg.remove(net)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        removed = pruned.eval()(hippo_patch)
    assert torch.allclose(masked, removed, atol=1e-4 * masked.abs().max()), (masked - removed).abs().max()
    arch = compressed_plans(reference.plans, "3d_fullres", spec)["configurations"]["3d_fullres"]["architecture"]
    rebuilt = build_compressed(arch["arch_kwargs"], 1, 3, False)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(hippo_patch), removed)


@pytest.mark.parametrize("config, message", [
    ({"regularizer": "lobstr"}, "unknown regularizer 'lobstr'; did you mean 'lobster'?"),
    ({"regularizer": "lobster", "reg_lambda": 0}, "reg_lambda must be in (0, 1), got 0"),
    ({"regularizer": "serene", "reg_tolerance": -1}, "reg_tolerance must be >= 0"),
    ({"reg_patience": 0}, "reg_patience must be >= 1"),
    ({"regularizer": "serene", "steps": 2}, "with iterative compression (steps > 1) is not supported"),
    ({"reg_lambda": "big"}, "'reg_lambda' must be a number"),
])
def test_config_errors(tmp_path, config, message):
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(MedslimError) as err:
        resolve_config({}, tmp_path / "c.json")
    assert message in str(err.value) and "\n" not in str(err.value)


# --- stock nnUNetv2_train, tiny budgets ---------------------------------------------------------

@pytest.fixture(scope="module")
def reg_env(hippocampus_nnunet, tmp_path_factory):
    from conftest import REPO

    work, env = hippocampus_nnunet
    config = tmp_path_factory.mktemp("reg") / "config.json"
    # 2 epochs x 2 updates; λ large enough to shrink visibly in 4 updates; a lenient tolerance
    config.write_text(json.dumps({"epochs": 2, "iterations": 2, "val_iterations": 1, "final_validation": False,
                                  "calibration_batches": 1, "reg_lambda": 0.05, "reg_tolerance": 0.5}))
    env = dict(env, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", MEDSLIM_CONFIG=str(config), OMP_NUM_THREADS="1",
               nnUNet_extTrainer=str(REPO / "nnunet_plugin"))  # this checkout's trainers
    return work, env


def _run(reg_env, trainer: str):
    from test_trainers import CKPT, train
    from medslim.finetune.hippocampus import DATASET, PLANS

    work, env = reg_env
    run = train(env, trainer, "-pretrained_weights", str(CKPT))
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__3d_fullres"


@pytest.mark.slow
def test_lobster_trainer_shrinks_weights_and_reports_the_zeros_it_made(reg_env):
    from test_trainers import CKPT

    folder = _run(reg_env, "nnUNetTrainerMedslimLOBSTER")
    after = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    before = torch.load(CKPT, map_location="cpu", weights_only=False)["network_weights"]
    report = json.loads((folder / "fold_0" / "medslim_regularizer.json").read_text())
    layers = report["per_layer"]  # state-dict keys of every conv weight (aliases counted once)
    # 4 Adam updates at lr 1e-4 move a weight by < 1e-3; (1 − 0.05)^4 shrinks the norms by ≈ 19 %.
    # Not the lowest deep-supervision head: nnU-Net weights its loss 0, so it gets no gradient.
    shrunk = [k for k in layers if k != "decoder.seg_layers.0.weight"]
    assert len(layers) == 20 and all(after[k].norm() < 0.9 * before[k].norm() for k in shrunk)
    assert all(layers[k]["zeros"] == int((after[k] == 0).sum()) for k in layers)
    zeros = sum(int((after[k] == 0).sum()) for k in layers)
    assert report["zeros"] == zeros > 0 and report["weights"] == sum(after[k].numel() for k in layers)
    assert report["sparsity"] == pytest.approx(zeros / report["weights"])
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "does not make the dense network faster" in log


@pytest.mark.slow
def test_serene_trainer_removes_zeroed_channels_and_predict_rebuilds_them(reg_env):
    from medslim.load import load_results_folder
    from medslim.network import COMPRESSED_CLASS

    folder = _run(reg_env, "nnUNetTrainerMedslimSeReNe")
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == COMPRESSED_CLASS
    spec = arch["arch_kwargs"]["compression"]
    report = json.loads((folder / "fold_0" / "medslim_regularizer.json").read_text())
    removal = report["removal"]
    assert report["channels_zeroed"] > 0 and spec["kept"], report
    assert removal["max_abs_output_difference"] < 1e-3
    assert removal["parameters_after"] < removal["parameters_before"]
    assert not (folder / "fold_0" / "checkpoint_best.pth").exists()
    model = load_results_folder(folder, "0")  # plans.json + checkpoint_final, strict load
    assert sum(p.numel() for p in model.build_network().parameters()) == removal["parameters_after"]
