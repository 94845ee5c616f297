"""NN-Relief (Dekhovich et al. 2024; SPEC §8): connection scores and the α rule by hand, the
structured ``relief`` criterion on the reference nnU-Net with real calibration patches,
``medslim compress --criterion relief --alpha`` end to end, and the paper's unstructured mode."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from conftest import assert_user_error, held_out_cases, nnunet_images

from medslim.cli import app
from medslim.errors import MedslimError
from medslim.load import load_results_folder
from medslim.prune import prunable_layers
from medslim.prune.relief_masks import apply_masks, drop_dead_units, iterative_relief, kept_fraction, relief_masks
from medslim.prune.select import top_k
from medslim.score import NEEDS_CALIBRATION, ScoreContext, get_criterion
from medslim.score.calibration import calibration_patches
from medslim.score.relief import (alpha_count, alpha_mask, conv_contributions, connection_scores,
                                  layer_scores, linear_contributions)

pytestmark = pytest.mark.usefixtures("one_thread")
N_PATCHES = 2


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- by hand ---------------------------------------------------------------------------------

def test_linear_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    x = torch.tensor([[1.0, 1.0], [-1.0, 3.0]])  # E|x| = [1, 2]
    contrib = linear_contributions(w, x)
    torch.testing.assert_close(contrib, torch.tensor([[1.0, 4.0], [0.5, 2.0]], dtype=torch.float64))
    s, sb = connection_scores(contrib, torch.tensor([1.0, 0.0], dtype=torch.float64))  # S = [6, 2.5]
    torch.testing.assert_close(s, torch.tensor([[1 / 6, 4 / 6], [0.2, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(sb, torch.tensor([1 / 6, 0.0], dtype=torch.float64))


def tiny_conv() -> nn.Conv1d:
    conv = nn.Conv1d(2, 1, kernel_size=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -1.0], [2.0, 0.0]]]))
        conv.bias.fill_(3.0)
    return conv


def test_conv_scores_by_hand():
    conv = tiny_conv()
    x = torch.tensor([[[1.0, -2.0, 0.0], [0.0, 1.0, 1.0]]])
    x = torch.cat([x, 2 * x])  # the second sample doubles every map: means are 1.5× the first
    # |K00| ⋆ |x0| = [1·1 + 1·2, 1·2 + 1·0] = [3, 2];  |K01| ⋆ |x1| = [2·0 + 0·1, 2·1 + 0·1] = [0, 2]
    fro = conv_contributions(conv, x, "fro")
    torch.testing.assert_close(fro, torch.tensor([[1.5 * math.sqrt(13), 3.0]], dtype=torch.float64))
    l1 = conv_contributions(conv, x, "l1")
    torch.testing.assert_close(l1, torch.tensor([[7.5, 3.0]], dtype=torch.float64))
    scores = layer_scores(conv, x)[""]  # bias |3|·√2 (two output positions) in the denominator
    total = 1.5 * math.sqrt(13) + 3 + 3 * math.sqrt(2)
    torch.testing.assert_close(scores.weights, torch.tensor([[1.5 * math.sqrt(13), 3.0]], dtype=torch.float64) / total)
    torch.testing.assert_close(scores.bias, torch.tensor([3 * math.sqrt(2) / total], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["fro", "l1"])
def test_transposed_and_strided_conv_scores_match_one_pair_at_a_time(norm):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, 6)
    for conv in (nn.ConvTranspose3d(3, 4, 2, stride=2), nn.Conv3d(3, 4, 3, stride=2, padding=1)):
        got = conv_contributions(conv, x, norm, chunk=3)
        want = torch.zeros(4, 3, dtype=torch.float64)
        for o in range(4):
            for c in range(3):
                w = torch.zeros_like(conv.weight)
                idx = (c, o) if isinstance(conv, nn.ConvTranspose3d) else (o, c)
                w[idx] = conv.weight[idx].abs()
                y = conv._conv_forward(x.abs(), w, None) if isinstance(conv, nn.Conv3d) else \
                    F.conv_transpose3d(x.abs(), w, None, conv.stride, conv.padding, conv.output_padding)
                y = y[:, o].reshape(2, -1).double()
                want[o, c] = (y.norm(dim=1) if norm == "fro" else y.sum(1)).mean()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 convolutions


def test_alpha_rule_by_hand():
    s = torch.tensor([0.1, 0.5, 0.15, 0.25])  # sorted 0.5, 0.25, 0.15, 0.1: cumulative 0.5, 0.75, 0.9, 1
    assert [alpha_count(s, a) for a in (0.4, 0.7, 0.75, 0.76, 0.9, 1.0)] == [1, 2, 2, 3, 3, 4]
    assert alpha_count(torch.tensor([0.5, 0.5, 0.0]), 1.0) == 2  # a zero score is never needed
    assert alpha_count(torch.zeros(3), 0.9) == 1  # at least one channel
    assert alpha_count(2 * s, 0.76) == 3  # relative to the layer's own mass
    keep, keep_bias = alpha_mask(torch.tensor([[0.1, 0.6], [0.5, 0.5]]), 0.85, torch.tensor([0.3, 0.0]))
    # unit 0: 0.6 + bias 0.3 = 0.9 ≥ 0.85; unit 1: a tie, the lower index first, both needed
    assert keep.tolist() == [[False, True], [True, True]] and keep_bias.tolist() == [True, False]


# ---- the structured criterion on the reference nnU-Net ------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return nnunet_images(tmp_path_factory.mktemp("images"), held_out_cases(2))


@pytest.fixture(scope="module")
def patches(reference, images) -> torch.Tensor:
    return calibration_patches(reference, images, n=N_PATCHES, seed=0)  # what the CLI cuts with --seed 0


@pytest.fixture(scope="module")
def raw(reference_net, patches) -> dict[str, torch.Tensor]:
    ctx = ScoreContext(calibration=patches, normalize=False)
    return get_criterion("relief")(reference_net, prunable_layers(reference_net, "outer"), ctx)


def test_relief_scores_are_per_channel_non_negative_and_not_l1(reference_net, patches, raw):
    modules = dict(reference_net.named_modules())
    assert "relief" in NEEDS_CALIBRATION and set(raw) == set(prunable_layers(reference_net, "outer"))
    l1 = get_criterion("l1")(reference_net, list(raw), ScoreContext())
    for name, s in raw.items():
        m = modules[name]
        c = m.out_channels
        assert s.shape == (c,) and torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0
        assert not torch.equal(top_k(s, c // 2), top_k(l1[name], c // 2)), name
    normed = get_criterion("relief")(reference_net, ["decoder.stages.1.convs.0.conv"], ScoreContext(calibration=patches))
    torch.testing.assert_close(normed["decoder.stages.1.convs.0.conv"].norm(), torch.tensor(1.0))


def test_a_channel_scores_the_sum_of_its_connection_scores_over_every_consumer(reference_net, patches, raw):
    # encoder stage 0 (16 channels) feeds stage 1 and, as the skip, the second half of the last
    # decoder stage's concatenation [upsampled 16, skip 16]
    per_layer = layer_scores(reference_net, patches, names=["encoder.stages.1.0.convs.0.conv",
                                                            "decoder.stages.2.convs.0.conv"])
    want = (per_layer["encoder.stages.1.0.convs.0.conv"].weights.sum(0)
            + per_layer["decoder.stages.2.convs.0.conv"].weights[:, 16:].sum(0))
    torch.testing.assert_close(raw["encoder.stages.0.0.convs.1.conv"], want.float(), rtol=1e-5, atol=0)
    # each unit's scores (with its bias) sum to 1: the scores are shares of its signal
    s = per_layer["decoder.stages.2.convs.0.conv"]
    torch.testing.assert_close(s.weights.sum(1) + s.bias, torch.ones(16, dtype=torch.float64))


# ---- the CLI end to end -----------------------------------------------------------------------

def test_compress_relief_alpha_keeps_the_alpha_count_of_each_layer(reference_dir, reference, images, patches, raw,
                                                                   hippo_patch, tmp_path):
    alpha = 0.9
    out = tmp_path / "out"
    # DF 1: no layer gets smaller, so none is decomposed and the channels are those scored above
    result = run("compress", reference_dir, "-o", out, "--df", "1", "--criterion", "relief", "--alpha", alpha,
                 "--calibration", images, "--calibration-patches", N_PATCHES)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression_report.json").read_text())
    assert not any(r["decomposed"] for r in report["layers"])
    spec = json.loads((out / "compression_spec.json").read_text())
    config = spec["provenance"]["config"]
    assert config["criterion"] == "relief" and config["alpha"] == alpha and config["prune_ratio"] == 0
    assert set(spec["kept"]) == set(raw)
    counts = {}
    for name, s in raw.items():
        k = alpha_count(s, alpha)
        assert spec["kept"][name] == top_k(s, k).tolist(), name
        counts[name] = (len(s), k)
    assert any(k < c for c, k in counts.values())  # α 0.9 removes channels somewhere
    assert report["params"]["compressed"] < report["params"]["original"]
    net = load_results_folder(out).build_network().eval()
    with torch.no_grad():
        y = net(hippo_patch)
    assert y.shape == (1, 3, *reference.patch_size) and torch.isfinite(y).all()


@pytest.mark.parametrize("args, match", [
    (["--criterion", "hvs", "--alpha", "0.9"], "--alpha sets each layer's count from relief's score mass; it needs --criterion relief"),
    (["--criterion", "relief", "--alpha", "0"], "--alpha must be in (0, 1]"),
    (["--criterion", "relief", "--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--criterion", "relief", "--alpha", "0.9", "--prune", "0.3"], "--alpha and --prune both set how many channels stay"),
    (["--criterion", "relief", "--alpha", "0.9", "--selection", "global"], "does not combine with --selection global"),
])
def test_bad_relief_options_fail_in_one_line(reference_dir, images, tmp_path, args, match):
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, *args, "--calibration", images), out, match)


def test_relief_without_calibration_fails_in_one_line(reference_dir, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, "--criterion", "relief", "--alpha", "0.9"), out,
                      "--criterion relief needs calibration data, given by --calibration IMAGES")


# ---- the paper's unstructured mode --------------------------------------------------------------

def test_unstructured_masks_follow_the_rule_and_persist():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[2].weight[:, 4] = 0  # unit 4 of the hidden layer reaches no output
    x = torch.randn(32, 6)
    masks = relief_masks(net, x, alpha_fc=0.8)
    scores = layer_scores(net, x)
    for name in ("0", "2"):
        keep, keep_bias = alpha_mask(scores[name].weights, 0.8, scores[name].bias)
        assert torch.equal(masks[name][0].bool(), keep) and torch.equal(masks[name][1].bool(), keep_bias)
    assert masks["2"][0][:, 4].sum() == 0 and masks["0"][0][4].sum() > 0
    cleaned = drop_dead_units(["0", "2"], masks)
    assert cleaned["0"][0][4].sum() == 0 and cleaned["0"][1][4] == 0  # its incoming weights and bias go too
    assert torch.equal(cleaned["2"][0], masks["2"][0])
    before = kept_fraction(net)
    apply_masks(net, cleaned)
    kept, total = kept_fraction(net)
    assert total == before[1] and kept == int(sum(w.sum() + b.sum() for w, b in cleaned.values()))
    net[0].weight_orig.data.add_(1.0)  # a retraining step: masked weights stay zero
    assert kept_fraction(net)[0] == kept


def test_iterative_relief_only_removes_and_retrains_each_round():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(64, 8)
    kept, retrained = [], []

    def retrain(model: nn.Module) -> None:  # a stand-in step that moves every weight
        retrained.append(kept_fraction(model)[0])
        with torch.no_grad():
            model[0].weight_orig.mul_(1.1)

    iterative_relief(net, x, retrain, iterations=3, alpha_fc=0.9, chain=["0", "2"],
                     on_iteration=lambda i, m: kept.append(kept_fraction(m)[0]))
    assert len(kept) == 3 and retrained == kept
    assert kept[0] < kept_fraction(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))[1]
    assert kept[0] >= kept[1] >= kept[2] > 0 and kept[2] < kept[0]


def test_finetune_config_passes_alpha_to_compression(tmp_path):
    from medslim.finetune import resolve_config

    (tmp_path / "c.json").write_text(json.dumps({"criterion": "relief", "alpha": 0.9}))
    config = resolve_config({}, tmp_path / "c.json")
    assert config.compression().alpha == 0.9 and config.compression().prune_ratio == 0.0
    (tmp_path / "c.json").write_text(json.dumps({"criterion": "hvs", "alpha": 0.9}))
    with pytest.raises(MedslimError, match="alpha"):
        resolve_config({}, tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"criterion": "relief", "alpha": "most"}))
    with pytest.raises(MedslimError, match="'alpha' must be a number or null"):
        resolve_config({}, tmp_path / "c.json")
