"""``medslim prune2d`` with the data-aware criteria (relief, hvs_data, taylor) and norton, on real
BreastMNIST: calibration images from the training split, pruned widths, choices unlike l1's."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medslim.errors import MedslimError

from conftest import SHARED

BREAST = SHARED / "medmnist" / "breastmnist.npz"
CRITERIA = ("relief", "hvs_data", "taylor", "norton")
DATA_AWARE = ("relief", "hvs_data", "taylor")
N_CALIB, SEED = 16, 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module runs single-threaded: on a busy 2-core machine relief's grouped convolutions
    cost ≈ 16× the CPU at 2 threads (resnet18, 4 images: 21 s instead of 1.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: str):
    from medslim.cli import app

    return CliRunner().invoke(app, ["prune2d", *args])


# End to end on timm's tiny test_resnet (≈ 370 k parameters, 500 filters; residual, projection and
# Bottleneck blocks, a deep stem): norton decomposes every filter (CP by ALS, ≈ 20 ms a filter,
# minutes on resnet18's 4 k). resnet18 itself: test_calibration_images_come_from_the_training_split
# (taylor end to end) and test_data_aware_criteria_on_resnet18.
ARCH = "timm:test_resnet"
# output channels after ρ = 0.5 (layer scope): stem and head whole, every other group ceil(C / 2),
# residual streams one group (conv1.6 feeds layer1's identity skip)
WIDTHS = {"conv1.0": 16, "fc": 2, "conv1.3": 8, "conv1.6": 16, "layer1.0.conv2": 16, "layer2.0.conv2": 24,
          "layer2.0.downsample.1": 24, "layer3.0.conv1": 24, "layer3.0.conv3": 96, "layer3.0.downsample.1": 96,
          "layer4.0.conv1": 48, "layer4.0.conv2": 48}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_resnet trained for one epoch on 64 real BreastMNIST training images."""
    from medslim.classify import TrainConfig, build_classifier, fit, load_medmnist, save_classifier

    train = load_medmnist(BREAST, "train").subset(64, seed=0)
    torch.manual_seed(0)
    model = build_classifier(ARCH, train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", milestones=()))
    return save_classifier(model, tmp_path_factory.mktemp("ckpt") / "breast.pt", ARCH, train.num_classes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint):
    """``{criterion: output folder}`` of ``prune2d`` at ρ = 0.5 without fine-tune, for l1 and each
    new criterion on the same checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for criterion in ("l1", *CRITERIA):
        res = invoke(str(checkpoint), "--data", str(BREAST), "-o", str(root / criterion), "--ratio", "0.5",
                     "--criterion", criterion, "--calibration-images", str(N_CALIB), "--seed", str(SEED))
        assert res.exit_code == 0, f"{criterion}: {res.output}"
        out[criterion] = root / criterion
    return out


def widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_prune2d_end_to_end(runs, criterion):
    from medslim.classify import evaluate, load_medmnist
    from medslim.measure import count_parameters
    from medslim.prune.classifier_io import load_pruned_classifier, read_pruned_spec

    folder = runs[criterion]
    result = json.loads((folder / "results.json").read_text())
    assert result["criterion"] == criterion and result["arch"] == ARCH
    run = result["runs"][0]
    model = load_pruned_classifier(folder / "ratio_0.50")
    w = widths(model)
    assert {n: w[n] for n in WIDTHS} == WIDTHS
    assert all(w[row["layer"]] == row["kept"] for row in run["layers"])  # the report is the model
    assert count_parameters(model) == run["params"][1] < run["params"][0]
    test = load_medmnist(BREAST, "test")
    assert evaluate(model, test)["accuracy"] == pytest.approx(run["accuracy_pruned"])
    provenance = read_pruned_spec(folder / "ratio_0.50")["compression"]["provenance"]
    assert provenance["criterion"] == criterion
    if criterion in DATA_AWARE:
        calib = result["calibration"]
        assert calib["split"] == "train" and calib["n"] == N_CALIB == len(set(calib["indices"]))
        assert calib["indices"] == sorted(calib["indices"]) and 0 <= calib["indices"][0] <= calib["indices"][-1] < 546
        assert provenance["calibration_images"] == N_CALIB
    else:  # weight-only: no data drawn
        assert result["calibration"] is None and "calibration_images" not in provenance


@pytest.mark.parametrize("criterion", CRITERIA)
def test_choices_differ_from_l1(runs, criterion):
    from medslim.prune.classifier_io import read_pruned_spec

    kept = {c: read_pruned_spec(runs[c] / "ratio_0.50")["compression"]["kept"] for c in ("l1", criterion)}
    assert set(kept["l1"]) == set(kept[criterion])  # the same groups, at the same widths
    assert all(len(kept["l1"][g]) == len(kept[criterion][g]) for g in kept["l1"])
    differ = [g for g in kept["l1"] if sorted(kept["l1"][g]) != sorted(kept[criterion][g])]
    assert differ, f"{criterion} keeps exactly l1's channels in every layer"


def test_calibration_images_come_from_the_training_split(tmp_path, monkeypatch):
    """taylor on resnet18, end to end: what reaches ``prune_classifier`` are training images and
    their labels, at the recorded indices; none of them is a test image."""
    import medslim.prune.classifier as pc
    from medslim.classify import load_medmnist

    seen: dict = {}
    real = pc.prune_classifier

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pc, "prune_classifier", spy)
    out = tmp_path / "out"
    res = invoke("resnet18", "--data", str(BREAST), "-o", str(out), "--ratio", "0.3",
                 "--criterion", "taylor", "--calibration-images", "12", "--seed", "3")
    assert res.exit_code == 0, res.output
    idx = json.loads((out / "results.json").read_text())["calibration"]["indices"]
    train, test = load_medmnist(BREAST, "train"), load_medmnist(BREAST, "test")
    x, y = seen["calibration"], seen["calibration_target"]
    assert x.shape == (12, 3, 28, 28) and y.shape == (12,) and y.dtype == torch.int64
    assert torch.equal(x, train.images[idx]) and torch.equal(y, train.labels[idx])
    assert len(set(y.tolist())) == 2  # both classes: real labels, not a constant
    flat_train, flat_test = train.images.flatten(1), test.images.flatten(1)
    for row in x.flatten(1):
        assert (flat_train == row).all(1).any() and not (flat_test == row).all(1).any()


def test_draw_calibration_is_seeded_and_bounded():
    from medslim.classify import load_medmnist
    from medslim.classify.prune2d import draw_calibration

    train = load_medmnist(BREAST, "train")
    a, b, c = draw_calibration(train, 16, 1), draw_calibration(train, 16, 1), draw_calibration(train, 16, 2)
    assert a.indices == b.indices and torch.equal(a.images, b.images) and a.indices != c.indices
    assert draw_calibration(train, len(train), 0).indices == tuple(range(len(train)))
    with pytest.raises(MedslimError, match="exceeds the 546 images of breastmnist/train"):
        draw_calibration(train, 547, 0)


@pytest.mark.parametrize("args, message", [
    (["--calibration-images", "0"], "--calibration-images must be an integer ≥ 1, got 0"),
    (["--calibration-images", "-4", "--criterion", "relief"], "--calibration-images must be an integer ≥ 1, got -4"),
    (["--calibration-images", "5000", "--criterion", "taylor"], "exceeds the 546 images"),
    (["--criterion", "reliev"], "did you mean 'relief'"),
])
def test_bad_calibration_options_exit_2(tmp_path, checkpoint, args, message):
    out = tmp_path / "out"
    res = invoke(str(checkpoint), "--data", str(BREAST), "-o", str(out), *args)
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_criterion_help_lists_every_criterion():
    from medslim.cli_prune2d import CRITERION_HELP
    from medslim.score import NEEDS_CALIBRATION, list_criteria

    weight_only, data_aware = CRITERION_HELP.split("data-aware")
    names = lambda text: set(re.findall(r"[a-z][a-z0-9_]*", text)) & set(list_criteria())  # noqa: E731
    assert names(weight_only) | names(data_aware) == set(list_criteria())
    assert names(data_aware) == NEEDS_CALIBRATION and not names(weight_only) & NEEDS_CALIBRATION


# --- library: prune_classifier and taylor on a classifier ----------------------------------------

def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 3)).eval()


def test_prune_classifier_refuses_data_aware_criteria_without_calibration():
    from medslim.prune.classifier import prune_classifier

    for criterion in DATA_AWARE:
        with pytest.raises(MedslimError, match=f"criterion {criterion} needs calibration data"):
            prune_classifier(small_cnn(), 0.5, criterion, (1, 3, 16, 16))


def test_taylor_on_classifier_logits():
    """``[B, K]`` logits take ``[B]`` labels; labels equal to the model's argmax give the
    pseudo-label scores; other labels change them; a segmentation-shaped target is refused."""
    from medslim.score import ScoreContext, get_criterion

    net, layers = small_cnn(), ["3", "7"]
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = net(x).argmax(1)
    taylor = get_criterion("taylor")
    pseudo = taylor(net, layers, ScoreContext(calibration=x))
    labelled = taylor(net, layers, ScoreContext(calibration=x, calibration_target=own))
    other = taylor(net, layers, ScoreContext(calibration=x, calibration_target=(own + 1) % 3))
    for name in layers:
        torch.testing.assert_close(labelled[name], pseudo[name])
        assert labelled[name].shape == (net.get_submodule(name).out_channels,) and labelled[name].abs().sum() > 0
    assert any(not torch.allclose(other[n], labelled[n]) for n in layers)
    with pytest.raises(MedslimError, match="does not fit the model's output"):
        taylor(net, layers, ScoreContext(calibration=x, calibration_target=torch.zeros(6, 16, 16, dtype=torch.long)))
    with pytest.raises(MedslimError, match="calibration_target must be"):
        taylor(net, layers, ScoreContext(calibration=x, calibration_target=torch.zeros(5, dtype=torch.long)))


@pytest.mark.parametrize("criterion", DATA_AWARE)
def test_prune_classifier_with_calibration_keeps_widths(criterion):
    from medslim.prune.classifier import prune_classifier

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pruned, rep = prune_classifier(small_cnn(), 0.5, criterion, (1, 3, 16, 16), calibration=x,
                                   calibration_target=torch.tensor([0, 1, 2, 0]))
    assert {r.layer: r.kept for r in rep.layers if r.candidate} == {"3": math.ceil(0.5 * 12), "7": 5}
    assert pruned(x).shape == (4, 3)


@pytest.mark.parametrize("criterion", DATA_AWARE)
def test_data_aware_criteria_on_resnet18(criterion):
    """torchvision resnet18 (as ``build_classifier`` builds it) with 8 training images and labels:
    the layer-scope widths, the output shape, and a choice unlike l1's."""
    from medslim.classify import build_classifier, load_medmnist
    from medslim.classify.prune2d import draw_calibration
    from medslim.prune.classifier import prune_classifier

    torch.manual_seed(0)
    net = build_classifier("resnet18", 2).eval()
    calib = draw_calibration(load_medmnist(BREAST, "train"), 8, seed=0)
    pruned, rep = prune_classifier(net, 0.5, criterion, (1, 3, 28, 28), calibration=calib.images,
                                   calibration_target=calib.labels)
    w = widths(pruned)
    assert (w["conv1"], w["layer1.0.conv2"], w["layer2.0.conv1"], w["layer3.0.conv1"], w["layer4.1.conv1"], w["fc"]) \
        == (64, 64, 64, 128, 256, 2)
    assert {w[n] for n in ("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2")} == {128}  # one group
    assert pruned(calib.images).shape == (8, 2)
    _, l1 = prune_classifier(net, 0.5, "l1", (1, 3, 28, 28))
    assert any(sorted(rep.kept[g]) != sorted(l1.kept[g]) for g in l1.kept)
