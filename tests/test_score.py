"""Channel scoring criteria (SPEC §2, §3, §6): hand-computed values, mass conservation, the
baselines, and the reference nnU-Net."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from scipy.stats import spearmanr
from torch import nn

from medslim.errors import MedslimError
from medslim.score import ScoreContext, find_head, get_criterion, list_criteria, propagate

torch.set_num_threads(2)

REFERENCE = Path(__file__).resolve().parents[1] / "src/medslim/default_model/Dataset004_Hippocampus"
RAW = dict(normalize=False, reduce="sum")


def convs(net: nn.Module, *, heads: bool = False) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
            and (heads or "seg_layers" not in n)]


def tiny_mlp(w2: list[list[float]]) -> nn.Sequential:
    """x(3) → Linear(3→2) → ReLU → Linear(2→2) with W1 = [[1, -2, 1], [0, 3, 1]] and ``w2``."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1., -2., 1.], [0., 3., 1.]]))
        net[2].weight.copy_(torch.tensor(w2))
        net[0].bias.fill_(5.0)  # biases never enter HVS
    return net


def small_unet(kind: type = PlainConvUNet, ds: bool = False) -> nn.Module:
    torch.manual_seed(0)
    n = (1, 2, 2) if kind is ResidualEncoderUNet else 2
    return kind(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), n, 3, 2, True, nn.InstanceNorm3d,
                {"affine": True}, None, None, nn.LeakyReLU, {"inplace": True}, deep_supervision=ds)


# --- hand-computed values --------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["channel", "spatial"])
def test_hvs_by_hand_linear(engine):
    # P2 = [[2, 2]/4, [1, 3]/4] → S_h = P2ᵀ 1 = [0.75, 1.25]
    # P1 = [[1, 2, 1]/4, [0, 3, 1]/4] → S_x = P1ᵀ S_h = [0.1875, 1.3125, 0.5]
    net = tiny_mlp([[2., -2.], [1., 3.]])
    ctx = ScoreContext(input_shape=(1, 3), engine=engine, **RAW)
    p = propagate(net, ctx, outputs_of=["0"], inputs_of=[""])
    torch.testing.assert_close(p.outputs["0"], torch.tensor([0.75, 1.25], dtype=torch.float64))
    torch.testing.assert_close(p.inputs[""], torch.tensor([0.1875, 1.3125, 0.5], dtype=torch.float64))
    assert p.seeded == 2 and p.input_mass == pytest.approx(2)
    # seeding class 1 only: S_h = row 1 of P2
    one = propagate(net, ScoreContext(input_shape=(1, 3), engine=engine, seed_classes=(1,), **RAW),
                    outputs_of=["0"])
    torch.testing.assert_close(one.outputs["0"], torch.tensor([0.25, 0.75], dtype=torch.float64))
    # the criterion L2-normalises the same numbers
    s = get_criterion("hvs")(net, ["0"], ScoreContext(input_shape=(1, 3), engine=engine))
    torch.testing.assert_close(s["0"], torch.tensor([0.75, 1.25]) / math.hypot(0.75, 1.25))


def test_rows_of_p_sum_to_one():
    torch.manual_seed(1)
    lin = nn.Linear(5, 4)
    for i in range(4):  # seeding output i alone returns row i of P = |W[i]| / ‖W[i]‖₁
        p = propagate(lin, ScoreContext(input_shape=(1, 5), seed_classes=(i,), **RAW), inputs_of=[""])
        row = lin.weight[i].detach().abs().double()
        torch.testing.assert_close(p.inputs[""], row / row.sum())
        assert float(p.inputs[""].sum()) == pytest.approx(1.0)


def test_hvs_by_hand_conv_spatial():
    # x [1, 3] → Conv1d(1→2, k=1) → head Conv1d(2→1, k=2): taps W[0,0] = [1, 2], W[0,1] = [-3, 0].
    # D = 6 at both head outputs; S at the hidden map (2 channels × 3 positions):
    # ch0 = [1, 2+1, 2]/6, ch1 = [3, 3+0, 0]/6
    net = nn.Sequential(nn.Conv1d(1, 2, 1), nn.Conv1d(2, 1, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[2.]], [[-1.]]]))
        net[1].weight.copy_(torch.tensor([[[1., 2.], [-3., 0.]]]))
    ch0, ch1 = torch.tensor([1., 3., 2.]) / 6, torch.tensor([3., 3., 0.]) / 6
    for reduce, expect in (("sum", [ch0.sum(), ch1.sum()]),
                           ("mean", [ch0.mean(), ch1.mean()]),
                           ("rms", [ch0.square().mean().sqrt(), ch1.square().mean().sqrt()])):
        ctx = ScoreContext(input_shape=(1, 1, 3), engine="spatial", reduce=reduce, normalize=False)
        got = propagate(net, ctx, outputs_of=["0"]).outputs["0"]
        torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64))
    # channel engine: P̄ = [|1|+|2|, |-3|+|0|] / 6 on one voxel
    ch = propagate(net, ScoreContext(input_shape=(1, 1, 3), **RAW), outputs_of=["0"]).outputs["0"]
    torch.testing.assert_close(ch, torch.tensor([0.5, 0.5], dtype=torch.float64))


# --- mass conservation -----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["channel", "spatial"])
def test_mass_conserved_across_unet_cut(engine):
    """Cut across the U: bottleneck output + every skip edge (the skip half of each decoder
    concatenation) carries exactly the seeded mass; so do the input and the stem output."""
    net = small_unet(ds=True)  # deep-supervision heads exist but are not seeded
    ctx = ScoreContext(input_shape=(1, 1, 16, 16, 12), engine=engine, **RAW)
    stages = [f"decoder.stages.{s}" for s in range(2)]
    p = propagate(net, ctx, outputs_of=["encoder.stages.2", "encoder.stages.0"], inputs_of=stages)
    skip_mass = sum(float(p.inputs[s][p.inputs[s].numel() // 2:].sum()) for s in stages)
    assert float(p.outputs["encoder.stages.2"].sum()) + skip_mass == pytest.approx(p.seeded, rel=1e-5)
    assert float(p.outputs["encoder.stages.0"].sum()) == pytest.approx(p.seeded, rel=1e-5)
    assert p.input_mass == pytest.approx(p.seeded, rel=1e-5)
    assert p.seeded == (3 * 16 * 16 * 12 if engine == "spatial" else 3)
    assert float(p.outputs["encoder.stages.2"].sum()) < 0.9 * p.seeded  # the cut is not trivial


@pytest.mark.parametrize("engine", ["channel", "spatial"])
def test_mass_conserved_through_residual_blocks(engine):
    net = small_unet(ResidualEncoderUNet)
    ctx = ScoreContext(input_shape=(1, 1, 16, 16, 12), engine=engine, **RAW)
    block = "encoder.stages.2.blocks.1"  # BasicBlockD with an identity skip
    p = propagate(net, ctx, outputs_of=[block, f"{block}.conv2.conv", "encoder.stages.0"],
                  inputs_of=[block])
    assert p.input_mass == pytest.approx(p.seeded, rel=1e-5)
    # ½ rule: the main path gets half of the block output's score, the skip the other half
    torch.testing.assert_close(p.outputs[f"{block}.conv2.conv"], p.outputs[block] / 2)
    # blocks.0 → blocks.1 → transposed conv is a chain: the block passes its mass on unchanged
    assert float(p.inputs[block].sum()) == pytest.approx(float(p.outputs[block].sum()), rel=1e-5)
    assert float(p.outputs["encoder.stages.0"].sum()) == pytest.approx(p.seeded, rel=1e-5)


def _resnet18(library: str) -> nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        import timm
        return timm.create_model("resnet18", pretrained=False, num_classes=2)
    from torchvision.models import resnet18
    return resnet18(weights=None, num_classes=2)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_mass_conserved_resnet18_basic_block(library):
    """Both libraries write ``x += shortcut`` in their own ``BasicBlock``; the addition is found
    in the forward pass, so each addend gets half and the mass stays 2 at every cut."""
    net = _resnet18(library)
    ctx = ScoreContext(input_shape=(1, 3, 28, 28), engine="spatial", **RAW)
    p = propagate(net, ctx, outputs_of=["layer2.0", "layer2.0.conv2", "layer2.0.downsample.0", "layer4.1"],
                  inputs_of=["layer2.0"])
    assert p.seeded == 2 and p.input_mass == pytest.approx(2, rel=1e-5)
    for t in (p.inputs["layer2.0"], p.outputs["layer2.0"], p.outputs["layer4.1"]):
        assert float(t.sum()) == pytest.approx(2, rel=1e-5)
    torch.testing.assert_close(p.outputs["layer2.0.conv2"], p.outputs["layer2.0"] / 2)
    torch.testing.assert_close(p.outputs["layer2.0.downsample.0"], p.outputs["layer2.0"] / 2)


def test_timm_and_torchvision_resnet18_score_alike():
    """Same weights in both libraries' ResNet-18 → the same HVS scores (the libraries differ only
    in how their blocks are written)."""
    tv, tm = _resnet18("torchvision"), _resnet18("timm")
    tm.load_state_dict(tv.state_dict())
    layers = ["layer1.0.conv1", "layer2.1.conv2", "layer3.0.downsample.0", "layer4.1.conv1"]
    ctx = ScoreContext(input_shape=(1, 3, 32, 32), engine="spatial")
    a, b = get_criterion("hvs")(tv, layers, ctx), get_criterion("hvs")(tm, layers, ctx)
    for n in layers:
        torch.testing.assert_close(a[n], b[n])


def test_any_two_map_addition_is_a_residual():
    """A hand-written block (``x + conv(x)``, ``add_`` in place, ``torch.add``) and a
    squeeze-excitation gate: mass is conserved without knowing the block classes."""
    class Block(nn.Module):
        def __init__(self, how: str):
            super().__init__()
            self.conv, self.fc, self.how = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1), how

        def forward(self, x):
            y = self.conv(x)
            if self.how == "gate":
                return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True))) + x
            return {"plus": lambda: x + y, "add_": lambda: y.add_(x), "torch.add": lambda: torch.add(y, x)}[self.how]()

    for how in ("plus", "add_", "torch.add", "gate"):
        torch.manual_seed(0)
        net = nn.Sequential(Block(how), Block(how), nn.Conv2d(2, 1, 1))
        p = propagate(net, ScoreContext(input_shape=(1, 2, 5, 5), engine="spatial", **RAW),
                      outputs_of=["0.conv", "1"])
        assert p.input_mass == pytest.approx(p.seeded, rel=1e-5), how
        torch.testing.assert_close(p.outputs["0.conv"].sum(), p.outputs["1"].sum() / 2)


def test_unrecognised_merge_is_reported(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.stack([x, self.conv(x)]).sum(0)  # a sum, but not a two-operand addition

    net = nn.Sequential(Block(), nn.Conv2d(2, 1, 1))
    with caplog.at_level(logging.WARNING, logger="medslim.score.propagate"):
        p = propagate(net, ScoreContext(input_shape=(1, 2, 5, 5), engine="spatial", **RAW))
    assert p.input_mass == pytest.approx(2 * p.seeded, rel=1e-5)
    assert "mass grew" in caplog.text


def test_classifier_pools_and_linear():
    """VGG-like: max pool (as average pool), adaptive pool to 2×2, flatten, Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d((2, 2)),
                        nn.Flatten(), nn.Dropout(), nn.Linear(32, 5), nn.ReLU(), nn.Linear(5, 3))
    for engine in ("channel", "spatial"):
        p = propagate(net, ScoreContext(input_shape=(2, 3, 12, 12), engine=engine, **RAW),
                      outputs_of=["0", "4", "9"])
        assert p.input_mass == pytest.approx(p.seeded, rel=1e-5)
        assert float(p.outputs["0"].sum()) == pytest.approx(p.seeded, rel=1e-5)
        assert p.outputs["4"].shape == (8,) and p.outputs["9"].shape == (5,)


# --- decomposed networks, generic classifiers ------------------------------------------------

def test_decomposed_unet():
    from medslim.decompose import decompose_network, get_rank_policy
    net, _ = decompose_network(small_unet(), get_rank_policy("df", df=0.5))
    name = "encoder.stages.1.0.convs.1.conv"
    layers = [name, f"{name}.reduce", f"{name}.core", f"{name}.restore"]
    ctx = ScoreContext(input_shape=(1, 1, 16, 16, 12), engine="spatial", **RAW)
    p = propagate(net, ctx, outputs_of=layers)
    assert p.input_mass == pytest.approx(p.seeded, rel=1e-5)
    torch.testing.assert_close(p.outputs[name], p.outputs[f"{name}.restore"])  # same tensor
    assert [p.outputs[n].numel() for n in layers] == [8, 4, 4, 8]
    for n in layers[1:]:  # reduce → core → restore is a chain: each carries the conv's mass
        assert float(p.outputs[n].sum()) == pytest.approx(float(p.outputs[name].sum()), rel=1e-5)
    l1 = get_criterion("l1")(net, [name], ScoreContext(normalize=False))[name]
    restore = net.get_submodule(f"{name}.restore").weight.detach()
    torch.testing.assert_close(l1, restore.abs().flatten(1).sum(1))


@pytest.mark.parametrize("engine", ["channel", "spatial"])
def test_resnet18_scores_every_conv(engine):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    net = resnet18(weights=None, num_classes=2)
    layers = convs(net)
    assert find_head(net) == "fc"
    scores = get_criterion("hvs")(net, layers, ScoreContext(input_shape=(1, 3, 28, 28), engine=engine))
    assert set(scores) == set(layers)
    for name in layers:
        s = scores[name]
        assert s.shape == (net.get_submodule(name).out_channels,)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert float(s.norm()) == pytest.approx(1.0, rel=1e-5)


# --- NISP, random, l1, consumer_l1 -----------------------------------------------------------

def test_nisp_differs_from_hvs_on_unequal_fan_in():
    # output 0 has a large fan-in, output 1 a small one. NISP: S_h = |W2|ᵀ 1 = [10, 2];
    # HVS: P2 = [[10, 1]/11, [0, 1]/1] → S_h = [10/11, 12/11]: the ranking flips.
    net = tiny_mlp([[10., 1.], [0., 1.]])
    ctx = ScoreContext(input_shape=(1, 3), normalize=False)
    hvs, nisp = (get_criterion(c)(net, ["0"], ctx)["0"] for c in ("hvs", "nisp"))
    torch.testing.assert_close(nisp, torch.tensor([10., 2.]))
    torch.testing.assert_close(hvs, torch.tensor([10 / 11, 12 / 11]))
    # NISP at the input: |W1|ᵀ [10, 2] = [10, 26, 12]
    p = propagate(net, ScoreContext(input_shape=(1, 3), **RAW), inputs_of=[""], rule="nisp")
    torch.testing.assert_close(p.inputs[""], torch.tensor([10., 26., 12.], dtype=torch.float64))


def test_random_is_seeded():
    net = small_unet()
    layers = convs(net)
    rnd = get_criterion("random")
    a, b = rnd(net, layers, ScoreContext(seed=3)), rnd(net, layers[::-1], ScoreContext(seed=3))
    c = rnd(net, layers, ScoreContext(seed=4))
    for name in layers:
        torch.testing.assert_close(a[name], b[name])  # same seed, any layer order
        assert not torch.allclose(a[name], c[name])
    raw = rnd(net, layers, ScoreContext(seed=3, normalize=False))
    assert all(((0 <= s) & (s < 1)).all() for s in raw.values())
    assert len({tuple(s[:4].tolist()) for s in raw.values()}) == len(layers)  # per-layer streams


def test_filter_norms_by_hand():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    up = nn.ConvTranspose2d(2, 3, 1, bias=False)  # weight [C_in=2, C_out=3, 1, 1]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1., -2.], [3., 4.]]).reshape(2, 2, 1, 1))
        up.weight.copy_(torch.tensor([[1., -1., 0.], [2., 2., -5.]]).reshape(2, 3, 1, 1))
    net = nn.Sequential(conv, up)
    ctx = ScoreContext(normalize=False)
    l1, l2 = (get_criterion(c)(net, ["0", "1"], ctx) for c in ("l1", "l2"))
    torch.testing.assert_close(l1["0"], torch.tensor([3., 7.]))
    torch.testing.assert_close(l2["0"], torch.tensor([math.sqrt(5), 5.]))
    torch.testing.assert_close(l1["1"], torch.tensor([3., 3., 5.]))  # columns of the [C_in, C_out] layout
    torch.testing.assert_close(get_criterion("l1")(net, ["0"], ScoreContext())["0"],
                               torch.tensor([3., 7.]) / math.hypot(3, 7))


def test_consumer_l1_matches_weights():
    """Stage-0 output feeds the next encoder stage and, at offset C, the last decoder conv;
    the transposed conv's output sits at offset 0 of the same concatenation."""
    net = small_unet()
    stem_out, up = "encoder.stages.0.0.convs.1.conv", "decoder.transpconvs.1"
    dec = net.get_submodule("decoder.stages.1.convs.0.conv").weight.detach().abs()
    nxt = net.get_submodule("encoder.stages.1.0.convs.0.conv").weight.detach().abs()
    mid = net.get_submodule("encoder.stages.0.0.convs.1.conv").weight.detach().abs()
    got = get_criterion("consumer_l1")(net, [stem_out, up, "encoder.stages.0.0.convs.0.conv"],
                                       ScoreContext(engine="spatial", normalize=False))
    col = lambda w: w.sum(dim=(0, 2, 3, 4))  # noqa: E731  ‖W[:, c]‖₁
    torch.testing.assert_close(got[stem_out], (col(dec)[4:] + col(nxt)).float())
    torch.testing.assert_close(got[up], col(dec)[:4].float())
    torch.testing.assert_close(got["encoder.stages.0.0.convs.0.conv"], col(mid).float())


def test_hvs_data_weights_by_activation():
    net = tiny_mlp([[2., -2.], [1., 3.]])
    x = torch.tensor([[1., 0., 2.], [-1., 1., 0.]])
    h = torch.relu(net[0](x)).abs().mean(0)  # E|h| at the input of the head
    a = net[2].weight.detach().abs() * h
    expect = (a / a.sum(1, keepdim=True)).sum(0)
    got = get_criterion("hvs_data")(net, ["0"], ScoreContext(calibration=x, normalize=False))["0"]
    torch.testing.assert_close(got, expect)
    with pytest.raises(MedslimError, match="calibration"):
        get_criterion("hvs_data")(net, ["0"], ScoreContext())


# --- registry, errors, purity ----------------------------------------------------------------

def test_registry_and_errors():
    assert {"hvs", "nisp", "l1", "l2", "consumer_l1", "random", "hvs_data"} <= set(list_criteria())
    with pytest.raises(MedslimError, match="did you mean 'hvs'"):
        get_criterion("hsv")
    with pytest.raises(MedslimError, match="did you mean 'spatial'"):
        ScoreContext(engine="spatail")
    net = small_unet()
    with pytest.raises(MedslimError, match="did you mean 'encoder.stages.0.0.convs.0.conv'"):
        get_criterion("hvs")(net, ["encoder.stages.0.0.convs.0.cnv"], ScoreContext())
    with pytest.raises(MedslimError, match="seed class 7"):
        get_criterion("hvs")(net, ["encoder.stages.0"], ScoreContext(seed_classes=(7,)))
    with pytest.raises(MedslimError, match="input_shape"):
        get_criterion("hvs")(net, ["encoder.stages.0"], ScoreContext(engine="spatial"))
    with pytest.raises(MedslimError, match="not run"):  # deep-supervision head, DS off
        get_criterion("hvs")(net, ["decoder.seg_layers.0"], ScoreContext())


def test_scoring_leaves_model_untouched():
    net = small_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = convs(net)
    for name in ("hvs", "nisp", "consumer_l1", "l1", "random"):
        get_criterion(name)(net, layers, ScoreContext(input_shape=(1, 1, 8, 8, 8), engine="spatial"))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert net.decoder.stages[0].convs[0].nonlin.inplace and net.training


# --- the reference nnU-Net -------------------------------------------------------------------

def load_reference() -> tuple[nn.Module, tuple[int, ...]]:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    ckpt = REFERENCE / "fold_0" / "checkpoint_final.pth"
    assert ckpt.is_file(), f"reference model missing: {ckpt}"
    plans = json.loads((REFERENCE / "plans.json").read_text())
    n_classes = len(json.loads((REFERENCE / "dataset.json").read_text())["labels"])
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                 arch["_kw_requires_import"], 1, n_classes, deep_supervision=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    net.load_state_dict(state)
    return net.eval(), (1, 1, *config["patch_size"])


def test_reference_model_channel_and_spatial_engines_agree():
    net, shape = load_reference()
    layers = convs(net)
    assert find_head(net) == "decoder.seg_layers.2"
    fast = get_criterion("hvs")(net, layers, ScoreContext(input_shape=shape, engine="channel"))
    exact = get_criterion("hvs")(net, layers, ScoreContext(input_shape=shape, engine="spatial"))
    rho = [spearmanr(fast[n], exact[n])[0] for n in layers]
    assert sum(rho) / len(rho) >= 0.8, dict(zip(layers, rho))
    assert min(rho) >= 0.5, dict(zip(layers, rho))
    # the recursion is not a relabelled filter norm
    l1 = get_criterion("l1")(net, layers, ScoreContext())
    assert sum(spearmanr(l1[n], exact[n])[0] for n in layers) / len(layers) < 0.95
