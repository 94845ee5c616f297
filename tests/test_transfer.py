"""medslim.transfer: divergences against hand-computed values, layer selection, Algorithm 1 through
the CLI on real MedMNIST data (Pneumonia source → Breast target), and bad input → exit 2."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn
from typer.testing import CliRunner

from conftest import SHARED, assert_user_error

from medslim.classify import TrainConfig, build_classifier, fit, load_medmnist, save_classifier
from medslim.classify.models import load_checkpoint
from medslim.cli import app
from medslim.errors import MedslimError
from medslim.transfer import MEASURES, candidate_layers, layer_divergence, layer_divergences
from medslim.transfer.divergence import filter_distributions, per_filter, stages
from medslim.transfer.pipeline import bn_partners, trainable_set
from medslim.transfer.select import last_k, percentile, random_k, select_layers, top_k

MED = SHARED / "medmnist"
BREAST, PNEUMONIA = MED / "breastmnist.npz", MED / "pneumoniamnist.npz"

# one filter: source |w| = (1, 1) → P_s = (½, ½); tuned |w| = (1, 3) → P_t = (¼, ¾)
WS, WT = torch.tensor([[1.0, -1.0]]), torch.tensor([[-1.0, 3.0]])
PS, PT = (0.5, 0.5), (0.25, 0.75)


def kl_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kl_by_hand_and_direction():
    assert layer_divergence(WS, WT, "kl") == pytest.approx(kl_hand(PT, PS), rel=1e-9)
    assert layer_divergence(WS, WT, "kl", "s||t") == pytest.approx(kl_hand(PS, PT), rel=1e-9)
    assert kl_hand(PT, PS) != pytest.approx(kl_hand(PS, PT))


def test_js_w1_frobenius_by_hand():
    m = tuple(0.5 * (a + b) for a, b in zip(PS, PT))
    assert layer_divergence(WS, WT, "js") == pytest.approx(0.5 * kl_hand(PT, m) + 0.5 * kl_hand(PS, m), rel=1e-9)
    assert layer_divergence(WS, WT, "w1") == pytest.approx(0.25, rel=1e-9)  # sorted (¼, ¾) vs (½, ½)
    assert layer_divergence(WS, WT, "frobenius") == pytest.approx(math.sqrt(2 * 0.25 ** 2), rel=1e-9)
    for name in ("js", "w1", "frobenius"):
        assert layer_divergence(WS, WT, name, "s||t") == pytest.approx(layer_divergence(WS, WT, name))


def test_w1_matches_scipy_on_real_weights():
    torch.manual_seed(0)
    a, b = torch.randn(8, 3, 3, 3), torch.randn(8, 3, 3, 3)
    ps, _ = filter_distributions(a)
    pt, _ = filter_distributions(b)
    expected = [wasserstein_distance(pt[f], ps[f]) for f in range(8)]
    assert np.allclose(per_filter(a, b, "w1"), expected, rtol=1e-10, atol=1e-15)


def test_identical_weights_give_zero_and_epsilon_keeps_kl_finite():
    w = build_classifier("resnet18", 2).layer2[0].conv1.weight
    for name in MEASURES:
        assert layer_divergence(w, w.clone(), name) == pytest.approx(0.0, abs=1e-15)
    # a zero entry in the source: ε = 1e-12·max|w| keeps KL finite but large
    value = layer_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), "kl")
    assert math.isfinite(value) and value > 10
    p, _ = filter_distributions(torch.tensor([[1.0, 0.0]]))
    assert p[0, 1] == pytest.approx(1e-12 / (1 + 2e-12)) and p.dtype == np.float64


def test_all_zero_rows_are_skipped():
    ws = torch.cat([WS, torch.zeros(1, 2), torch.tensor([[2.0, 2.0]])])
    wt = torch.cat([WT, torch.tensor([[5.0, 1.0]]), torch.zeros(1, 2)])
    assert per_filter(ws, wt, "kl").shape == (1,)
    assert layer_divergence(ws, wt, "kl") == pytest.approx(kl_hand(PT, PS), rel=1e-9)
    assert math.isnan(layer_divergence(torch.zeros(2, 3), torch.ones(2, 3), "kl"))
    with pytest.raises(MedslimError, match="unknown divergence measure 'kld'; use .*did you mean 'kl'"):
        layer_divergence(WS, WT, "kld")


def test_layer_table_ranks_the_changed_layer_first():
    torch.manual_seed(0)
    source = build_classifier("resnet18", 2)
    tuned = copy.deepcopy(source)
    with torch.no_grad():
        tuned.layer3[1].conv1.weight[:, :4] *= 3.0
        tuned.fc.weight.mul_(7.0)  # the head is never a candidate
    table = layer_divergences(source, tuned, "kl")
    assert len(table) == 20 and "fc" not in set(table["layer"])  # 17 convs + 3 downsample convs
    assert table.iloc[0]["layer"] == "conv1" and table.iloc[0]["stage"] == "conv1"
    assert top_k(table, 1) == ["layer3.1.conv1"]
    others = table[table["layer"] != "layer3.1.conv1"]["divergence"]
    assert (others == 0).all()


def test_selection_counts():
    div = {f"l{i}": float(i) for i in range(10)}
    assert top_k(div, 3) == ["l9", "l8", "l7"]
    assert percentile(div, 70) == ["l9", "l8", "l7"]  # threshold 6.3
    assert percentile(div, 0) == [f"l{i}" for i in range(9, -1, -1)]
    model = build_classifier("resnet18", 2)
    layers = candidate_layers(model)
    table = pd.DataFrame({"layer": layers, "stage": list(stages(model, layers).values()),
                          "divergence": np.arange(len(layers), dtype=float)})
    assert table.groupby("stage").size().to_dict() == {"conv1": 1, "layer1": 4, "layer2": 5, "layer3": 5, "layer4": 5}
    chosen = select_layers(table, "top_k", k=2, scope="blockwise")
    assert len(chosen) == 1 + 2 * 4 and "conv1" in chosen and "layer4.1.conv2" in chosen
    assert len(select_layers(table, "percentile", q=50, scope="blockwise")) == 1 + 2 + 3 + 3 + 3
    assert last_k(layers, 3) == ["layer4.1.conv2", "layer4.1.conv1", "layer4.0.downsample.0"]
    r = random_k(layers, 3, seed=5)
    assert r == random_k(layers, 3, seed=5) and len(set(r)) == 3 and set(r) <= set(layers)
    with pytest.raises(MedslimError, match="k = 21 exceeds the 20 candidate layers"):
        top_k(table, 21)
    with pytest.raises(MedslimError, match="largest stage"):
        select_layers(table, "top_k", k=6, scope="blockwise")
    with pytest.raises(MedslimError, match="no candidate layers"):
        top_k({}, 1)
    vgg_like = nn.Sequential()  # VGG layout: top-level `features` split into blocks by pooling
    vgg_like.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                                      nn.Conv2d(4, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    vgg_like.classifier = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    assert stages(vgg_like, candidate_layers(vgg_like)) == {
        "features.0": "features/0", "features.3": "features/1", "features.4": "features/1",
        "features.6": "features/2", "classifier.0": "classifier"}


def test_trainable_set_includes_bn_partner_and_head():
    model = build_classifier("resnet18", 2)
    partners = bn_partners(model)
    assert partners["conv1"] == "bn1" and partners["layer4.0.downsample.0"] == "layer4.0.downsample.1"
    assert trainable_set(model, ["layer2.1.conv2"]) == {"layer2.1.conv2", "layer2.1.bn2", "fc"}
    assert trainable_set(model, ["layer2.1.conv2"], train_bn=False) == {"layer2.1.conv2", "fc"}


# ---------------------------------------------------------------- CLI, real data, real training

@pytest.fixture(scope="session")
def source_ckpt(tmp_path_factory):
    """resnet18 trained for 1 epoch on 128 PneumoniaMNIST training images."""
    ds = load_medmnist(PNEUMONIA, "train").subset(128)
    torch.manual_seed(0)
    model = build_classifier("resnet18", ds.num_classes)
    fit(model, ds, TrainConfig(epochs=1, milestones=()))
    return save_classifier(model, tmp_path_factory.mktemp("source") / "pneumonia.pt", "resnet18", 2)


def invoke(*args):
    return CliRunner().invoke(app, ["transfer", *[str(a) for a in args]])


SMALL = ("--epochs", 1, "--initial-epochs", 1, "--max-train", 64, "--max-test", 48, "--milestones", "")


def test_cli_run_end_to_end(source_ckpt, tmp_path):
    out = tmp_path / "run"
    result = invoke("run", source_ckpt, "--data", BREAST, "-o", out, "--method", "kl,last-k", "-k", 3, *SMALL)
    assert result.exit_code == 0, result.output + result.stderr
    assert {"results.json", "results.csv", "divergences_kl.csv", "divergence_kl.png", "model_kl.pt",
            "model_last-k.pt"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "results.json").read_text())
    kl, last = report["results"]
    div = pd.read_csv(out / "divergences_kl.csv")
    assert kl["layers"] == list(div.nlargest(3, "divergence")["layer"])  # top-3 by divergence
    assert sorted(div[div["selected"]]["layer"]) == sorted(kl["layers"])
    assert last["layers"] == ["layer4.1.conv2", "layer4.1.conv1", "layer4.0.downsample.0"]
    assert report["test_items"] == 48 and 0 <= kl["test"]["accuracy"] <= 1
    # restart from the source: every non-selected layer keeps the source weights bitwise
    src = load_checkpoint(source_ckpt)["state_dict"]
    final = load_checkpoint(out / "model_kl.pt")["state_dict"]
    trained = tuple(p + "." for p in kl["trainable"])
    for k, v in src.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(v, final[k]) != k.startswith(trained), k
    table = pd.read_csv(out / "results.csv")
    assert list(table["method"]) == ["kl", "last-k"] and table["trainable_params"].iloc[0] == kl["trainable_params"]
    assert "kl" in result.stdout and "last-k" in result.stdout


def test_cli_select_percentile(source_ckpt, tmp_path):
    out = tmp_path / "sel"
    result = invoke("select", source_ckpt, "--data", BREAST, "-o", out, "--measure", "js", "--rule", "percentile",
                    "--percentile", 80, "--initial-epochs", 1, "--max-train", 64)
    assert result.exit_code == 0, result.output + result.stderr
    sel = json.loads((out / "selection.json").read_text())
    div = pd.read_csv(out / "divergences.csv")
    assert len(sel["layers"]) == (div["divergence"] >= np.percentile(div["divergence"], 80)).sum() == 4
    assert (out / "divergence.png").stat().st_size < 200_000


def test_cli_missing_layer(source_ckpt, tmp_path):
    out = tmp_path / "o"
    result = invoke("run", source_ckpt, "--data", BREAST, "-o", out, "--method", "layers",
                    "--layers", "layer4.1.conv2,layer5.0.conv1", *SMALL)
    assert_user_error(result, out, "no candidate layer 'layer5.0.conv1'")


def test_cli_k_too_large(source_ckpt, tmp_path):
    out = tmp_path / "o"
    assert_user_error(invoke("run", source_ckpt, "--data", BREAST, "-o", out, "-k", 25, *SMALL), out,
                      "k = 25 exceeds the 20 candidate layers")


def test_cli_mismatched_counts(source_ckpt, tmp_path):
    raw = dict(np.load(BREAST))
    raw["train_labels"] = raw["train_labels"][:500]
    np.savez(tmp_path / "bad.npz", **raw)
    out = tmp_path / "o"
    assert_user_error(invoke("run", source_ckpt, "--data", tmp_path / "bad.npz", "-o", out, *SMALL), out,
                      "546 images but 500 labels")


def test_cli_bad_options(source_ckpt, tmp_path):
    out = tmp_path / "o"
    assert_user_error(invoke("run", source_ckpt, "--data", BREAST, "-o", out, "--method", "kld", *SMALL), out,
                      "did you mean 'kl'")
    assert_user_error(invoke("run", tmp_path / "missing.pt", "--data", BREAST, "-o", out), out, "not found")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = invoke("select", source_ckpt, "--data", BREAST, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and (out / "keep.txt").exists()
