"""2D classifier pruning (thesis chapter 4): physical removal, HVS input maps, reload, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medslim.errors import MedslimError
from medslim.measure import count_parameters
from medslim.prune.classifier import (classifier_layers, coupled_groups, global_keep, prune_classifier,
                                      stem_name)
from medslim.score.input_map import hvs_input_map

from conftest import SHARED

BREAST = SHARED / "medmnist" / "breastmnist.npz"


def resnet18(num_classes: int = 2) -> nn.Module:
    from torchvision.models import resnet18 as tv

    torch.manual_seed(0)
    return tv(weights=None, num_classes=num_classes).eval()


def plain_cnn(bn: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), norm(12), nn.ReLU(),
                         nn.Conv2d(12, 10, 3, padding=1), norm(10), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# --- pruned networks run, keep their output shape, and match their report ---------------------

@pytest.mark.parametrize("scope", ["layer", "global"])
def test_resnet18_pruned_runs_and_report_matches_model(scope):
    net = resnet18()
    pruned, rep = prune_classifier(net, 0.4, "hvs", (1, 3, 28, 28), scope)
    x = torch.randn(3, 3, 28, 28)
    assert pruned(x).shape == net(x).shape == (3, 2)
    assert rep.params == (count_parameters(net), count_parameters(pruned))
    assert rep.params[1] < rep.params[0] and rep.flops[1] < rep.flops[0]
    after = widths(pruned)
    for row in rep.layers:  # density is read off the physical model
        assert after[row.layer] == row.kept and widths(net)[row.layer] == row.original
    assert after["conv1"] == 64 and after["fc"] == 2  # stem and head untouched
    # layer1's residual stream is coupled to the stem: left whole; layer2's stream is one group
    assert all(after[n] == 64 for n in ("layer1.0.conv2", "layer1.1.conv2"))
    assert len({after[n] for n in ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")}) == 1
    if scope == "layer":
        assert after["layer3.0.conv1"] == math.ceil(0.6 * 256)
    assert all(row.kept >= 1 for row in rep.layers)


@pytest.mark.parametrize("source", ["resnet50", "timm:resnet18"])
def test_bottleneck_and_timm_resnets_prune_and_run(source):
    """torchvision Bottleneck blocks (3 convs + projection) and timm's ResNet graph."""
    from medslim.classify import build_classifier

    torch.manual_seed(0)
    net = build_classifier(source, 3).eval()
    pruned, rep = prune_classifier(net, 0.5, "hvs", (1, 3, 28, 28))
    x = torch.randn(2, 3, 28, 28)
    assert pruned(x).shape == net(x).shape == (2, 3)
    assert rep.params[1] < 0.6 * rep.params[0]
    before, after = widths(net), widths(pruned)
    inner = [r.layer for r in rep.layers if r.candidate and r.layer.endswith("conv1")]  # first conv of each block
    assert inner and all(after[n] == math.ceil(0.5 * before[n]) for n in inner)


def test_vgg16_prunes_convs_and_hidden_linear():
    from torchvision.models import vgg16

    torch.manual_seed(0)
    net = vgg16(weights=None, num_classes=3).eval()
    assert stem_name(net) == "features.0"
    assert classifier_layers(net, include_linear=True)[-2:] == ["classifier.0", "classifier.3"]
    pruned, rep = prune_classifier(net, 0.3, "hvs", (1, 3, 32, 32), include_linear=True)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    after = widths(pruned)
    assert after["features.0"] == 64 and after["classifier.6"] == 3
    assert after["features.28"] == math.ceil(0.7 * 512) and after["classifier.3"] == math.ceil(0.7 * 4096)
    assert pruned.classifier[0].in_features == after["features.28"] * 49  # flatten after 7×7 pooling
    assert rep.params[1] == count_parameters(pruned)


def test_plain_cnn_parameters_by_hand():
    net = plain_cnn()
    pruned, rep = prune_classifier(net, 0.5, "l1", (1, 3, 16, 16))
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    k = {r.layer: r.kept for r in rep.layers}
    assert (k["0"], k["4"], k["7"], k["12"], k["14"]) == (8, 6, 5, 16, 3)
    expected = (3 * 8 * 9 + 8 + 16) + (8 * 6 * 9 + 6 + 12) + (6 * 5 * 9 + 5 + 10) + (5 * 4 * 16 + 16) + (16 * 3 + 3)
    assert rep.params[1] == count_parameters(pruned) == expected


def test_removal_equals_masking_without_batchnorm():
    """conv → ReLU (no BN): removing channels = zeroing their filters and biases."""
    net = plain_cnn(bn=False)
    pruned, rep = prune_classifier(net, 0.5, "hvs", (1, 3, 16, 16))
    masked = plain_cnn(bn=False)
    with torch.no_grad():
        for root, keep in rep.kept.items():
            conv = masked.get_submodule(root)
            drop = sorted(set(range(conv.out_channels)) - set(keep))
            conv.weight[drop] = 0
            conv.bias[drop] = 0
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pruned(x), net(x))  # something was removed


def test_ratio_zero_changes_nothing():
    net = resnet18()
    pruned, rep = prune_classifier(net, 0.0, "random", (1, 3, 28, 28))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(pruned(x), net(x))
    assert rep.params[0] == rep.params[1] and not rep.kept


# --- global scope -------------------------------------------------------------------------------

def test_global_keep_budget_and_one_per_group():
    scores = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([1e-6, 2e-6]), "c": torch.tensor([3.0, 1.0])}
    kept = global_keep(scores, 0.5)  # 8 channels → 4 kept; L2-normalised scores rank across groups
    assert sum(map(len, kept.values())) == 4 and all(len(v) >= 1 for v in kept.values())
    assert kept["b"] == (1,)  # its best channel, although both are tiny
    tiny = global_keep(scores, 0.99)
    assert all(len(v) == 1 for v in tiny.values())


def test_global_scope_keeps_a_channel_in_every_layer():
    net = resnet18()
    pruned, rep = prune_classifier(net, 0.97, "hvs", (1, 3, 28, 28), "global")
    assert all(row.kept >= 1 for row in rep.layers)
    assert pruned(torch.randn(2, 3, 28, 28)).shape == (2, 2)
    groups = coupled_groups(net, classifier_layers(net), torch.zeros(1, 3, 28, 28), protect=["conv1"])
    assert set(rep.kept) == set(groups)
    n = sum(len(rep.kept[g]) for g in groups)
    total = sum(net.get_submodule(g).out_channels for g in groups)
    assert n == max(len(groups), math.ceil(0.03 * total))


# --- HVS input maps -----------------------------------------------------------------------------

def test_input_map_mass_and_shapes():
    net = resnet18(num_classes=3)
    m = hvs_input_map(net, (1, 3, 28, 28))
    assert m.shape == (28, 28) and (m >= 0).all() and m.std() > 0
    assert float(m.sum()) == pytest.approx(3.0, rel=1e-5)  # seeded: 3 logits
    per_channel = hvs_input_map(net, (1, 3, 28, 28), channels="none")
    assert per_channel.shape == (3, 28, 28)
    torch.testing.assert_close(per_channel.sum(0), m)
    assert float(hvs_input_map(net, (2, 3, 28, 28), seed_classes=[1]).sum()) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(MedslimError, match="channels"):
        hvs_input_map(net, (1, 3, 28, 28), channels="max")


def test_residual_half_rule_at_pixel_level():
    """Input map of block → head = ½ (map of the head alone) + ½ (map of main path → head):
    the score at the block's output goes half to the identity skip and half to the main path."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(6, 6).eval()
    head = nn.Conv2d(6, 4, 3, padding=1)
    shape = (1, 6, 9, 9)
    full = hvs_input_map(nn.Sequential(block, head), shape, channels="none")
    skip = hvs_input_map(nn.Sequential(head), shape, channels="none")
    main = hvs_input_map(nn.Sequential(block.conv1, block.bn1, block.relu, block.conv2, block.bn2, head), shape,
                         channels="none")
    torch.testing.assert_close(full, 0.5 * skip + 0.5 * main, rtol=1e-5, atol=1e-6)
    assert float(full.sum()) == pytest.approx(4 * 81, rel=1e-5)


# --- reload from spec ---------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["layer", "global"])
def test_reload_from_spec_gives_identical_outputs(tmp_path, scope):
    from medslim.classify import build_classifier
    from medslim.prune.classifier_io import load_pruned_classifier, save_pruned_classifier

    torch.manual_seed(1)
    net = build_classifier("resnet18", 2).eval()
    pruned, rep = prune_classifier(net, 0.3, "random", (1, 3, 28, 28), scope, seed=3)
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pruned_classifier(pruned, tmp_path, arch="resnet18", num_classes=2, in_channels=3,
                           input_shape=(1, 3, 28, 28), kept=rep.kept)
    spec = json.loads((tmp_path / "pruned_spec.json").read_text())
    assert spec["base"]["arch"] == "resnet18" and spec["compression"]["kept"]
    loaded = load_pruned_classifier(tmp_path)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(loaded(x), pruned.eval()(x), rtol=0, atol=0)
    (tmp_path / "pruned_spec.json").write_text("{}")
    with pytest.raises(MedslimError, match="not a medslim pruned-classifier spec"):
        load_pruned_classifier(tmp_path)


def test_errors():
    net = plain_cnn()
    with pytest.raises(MedslimError, match=r"\[0, 1\)"):
        prune_classifier(net, 1.0)
    with pytest.raises(MedslimError, match="did you mean 'hvs'"):
        prune_classifier(net, 0.3, "hsv", (1, 3, 16, 16))
    with pytest.raises(MedslimError, match="did you mean 'global'"):
        prune_classifier(net, 0.3, "hvs", (1, 3, 16, 16), scope="globl")
    lone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(MedslimError, match="no prunable layer"):
        prune_classifier(lone, 0.3, "hvs", (1, 3, 16, 16))


# --- CLI on real data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def breast_checkpoint(tmp_path_factory):
    """resnet18 trained for one epoch on 64 real BreastMNIST images."""
    from medslim.classify import TrainConfig, build_classifier, fit, load_medmnist, save_classifier

    train = load_medmnist(BREAST, "train").subset(64, seed=0)
    model = build_classifier("resnet18", train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", milestones=()))
    return save_classifier(model, tmp_path_factory.mktemp("ckpt") / "breast.pt", "resnet18", train.num_classes)


def test_cli_end_to_end(tmp_path, breast_checkpoint):
    from medslim.classify import evaluate, load_medmnist
    from medslim.cli import app
    from medslim.prune.classifier_io import load_pruned_classifier

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune2d", str(breast_checkpoint), "--data", str(BREAST), "-o", str(out),
                                   "--ratio", "0.2", "--ratio", "0.5", "--finetune-epochs", "1", "--max-train", "32",
                                   "--seed", "1"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.csv", "accuracy_vs_ratio.png", "density.png", "input_map.png",
            "ratio_0.20", "ratio_0.50"} <= names
    result = json.loads((out / "results.json").read_text())
    assert [r["ratio"] for r in result["runs"]] == [0.2, 0.5] and result["control"] is not None
    assert result["finetune"]["optimizer"] == "adamw" and result["finetune"]["lr"] == 1e-4
    run = result["runs"][1]
    assert run["params"][1] < run["params"][0] and 0 < run["flop_reduction"] < 1
    model = load_pruned_classifier(out / "ratio_0.50")
    assert count_parameters(model) == run["params"][1]
    acc = evaluate(model, load_medmnist(BREAST, "test"))["accuracy"]
    assert acc == pytest.approx(run["accuracy_finetuned"])
    assert run["delta_vs_original"] == pytest.approx(acc - result["original"]["accuracy"])


def test_cli_serene_sparsifies_while_fine_tuning(tmp_path, breast_checkpoint):
    from medslim.classify import evaluate, load_medmnist
    from medslim.cli import app
    from medslim.prune.classifier_io import load_pruned_classifier

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune2d", str(breast_checkpoint), "--data", str(BREAST), "-o", str(out),
                                   "--regularizer", "serene", "--reg-lambda", "0.5", "--reg-tolerance", "1.0",
                                   "--finetune-epochs", "1", "--max-train", "32", "--calibration-images", "8"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    run, = result["runs"]
    assert result["criterion"] == "serene" and run["accuracy_pruned"] is None and result["control"] is not None
    assert run["regularizer"]["channels_zeroed"] > 0 and run["params"][1] < run["params"][0]
    model = load_pruned_classifier(next(p for p in out.iterdir() if p.name.startswith("ratio_")))
    assert count_parameters(model) == run["params"][1]
    assert evaluate(model, load_medmnist(BREAST, "test"))["accuracy"] == pytest.approx(run["accuracy_finetuned"])


def test_cli_dprp_writes_factored_convs_that_load_back(tmp_path, breast_checkpoint):
    from medslim.classify import evaluate, load_medmnist
    from medslim.cli import app
    from medslim.prune.classifier_io import load_pruned_classifier, read_pruned_spec

    from medslim.classify import build_classifier, save_classifier

    model = build_classifier(str(breast_checkpoint))
    conv = model.layer4[1].conv2  # made rank 8: DPRP's cut finds it
    u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1), full_matrices=False)
    conv.weight.data = ((u[:, :8] * s[:8]) @ vh[:8]).reshape(conv.weight.shape)
    low_rank = save_classifier(model, tmp_path / "low_rank.pt", str(breast_checkpoint), 2)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune2d", str(low_rank), "--data", str(BREAST), "-o", str(out),
                                   "--regularizer", "dprp", "--dprp-epsilon", "0.1", "--finetune-epochs", "1",
                                   "--max-train", "32", "--no-control"])
    assert res.exit_code == 0, res.output
    run, = json.loads((out / "results.json").read_text())["runs"]
    folder = out / "ratio_0.00"
    assert read_pruned_spec(folder)["compression"]["ranks"] and run["params"][1] < run["params"][0]
    model = load_pruned_classifier(folder)
    assert count_parameters(model) == run["params"][1]
    assert evaluate(model, load_medmnist(BREAST, "test"))["accuracy"] == pytest.approx(run["accuracy_finetuned"])


@pytest.mark.parametrize("args, message", [
    (["--regularizer", "serine", "--finetune-epochs", "1"], "did you mean 'serene'"),
    (["--regularizer", "dprp", "--dprp-epsilon", "1.5", "--finetune-epochs", "1"], "--dprp-epsilon must be in (0, 1)"),
    (["--regularizer", "serene", "--ratio", "0.3", "--finetune-epochs", "1"], "--ratio does not apply"),
    (["--regularizer", "lobster"], "--finetune-epochs ≥ 1"),
    (["--ratio", "1.2"], "[0, 1)"),
    (["--criterion", "hsv"], "did you mean 'hvs'"),
    (["--scope", "globl"], "did you mean 'global'"),
])
def test_cli_bad_options(tmp_path, breast_checkpoint, args, message):
    from medslim.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune2d", str(breast_checkpoint), "--data", str(BREAST), "-o", str(out), *args])
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_model_without_prunable_layers(tmp_path):
    """An MLP-Mixer has one convolution (its stem); the rest is Linear."""
    from medslim.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune2d", "timm:mixer_s16_224", "--data", str(BREAST), "-o", str(out)])
    assert res.exit_code == 2 and "no prunable layer" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
