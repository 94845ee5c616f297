"""Tucker-2 decomposition (SPEC §1) on the trained reference nnU-Net, a ResEnc U-Net and the
TotalSegmentator 3 mm architecture: exactness at full rank, the HOSVD error bound, rank
policies, the rank guard, rebuild-from-spec round trips and user errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from medslim import CompressionSpec, LayerRanks, MedslimError
from medslim.decompose import (TuckerConv, apply_ranks, decompose_network, eligible_convs, get_rank_policy,
                               stem_name, tucker2_factors)

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "src" / "medslim" / "default_model" / "Dataset004_Hippocampus"
DATA = REPO.parent / "shared" / "data"
IMAGE = DATA / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
TOTALSEG_PLANS = DATA / "totalsegmentator" / "Dataset297_total_3mm_plans_reconstructed.json"
PATCH = (40, 56, 40)
DF_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 1.0)


def build_reference_arch(folder: Path = MODEL) -> nn.Module:
    """The reference model's architecture from its plans.json (3d_fullres), untrained."""
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  len(dataset["channel_names"]), len(dataset["labels"]),
                                  allow_init=False, deep_supervision=False)


def load_reference_model(folder: Path = MODEL) -> nn.Module:
    """The trained reference nnU-Net (fold 0, ``checkpoint_final.pth``), eval mode."""
    net = build_reference_arch(folder)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net.load_state_dict(ckpt["network_weights"])
    return net.eval()


def load_case(path: Path = IMAGE, patch: tuple[int, ...] = PATCH) -> torch.Tensor:
    """A real MRI, z-scored and centre-cropped/zero-padded to ``patch``: ``[1, 1, *patch]``."""
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    img = (img - img.mean()) / img.std()
    out = np.zeros(patch, np.float32)
    src, dst = [], []
    for n, p in zip(img.shape, patch):
        a, b = max((n - p) // 2, 0), max((p - n) // 2, 0)
        m = min(n, p)
        src.append(slice(a, a + m))
        dst.append(slice(b, b + m))
    out[tuple(dst)] = img[tuple(src)]
    return torch.from_numpy(out)[None, None]


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return load_reference_model()


@pytest.fixture(scope="module")
def case() -> torch.Tensor:
    return load_case()


@pytest.fixture(scope="module")
def logits(net, case) -> torch.Tensor:
    with torch.no_grad():
        return net(case)


def df(x: float):
    return get_rank_policy("df", df=x)


# --- whole networks -----------------------------------------------------------------------

def test_full_rank_hosvd_reproduces_the_trained_network(net, case, logits):
    seen: list[str] = []
    new, rec = decompose_network(net, df(1.0), guard=None, progress=seen.append)
    eligible = eligible_convs(net)
    assert seen == list(eligible) == list(rec.ranks)
    assert sum(isinstance(m, TuckerConv) for m in new.modules()) == len(eligible)
    with torch.no_grad():
        out = new(case)
    assert logits.abs().max() > 1  # a trained model, not an all-zero output
    assert rel_max_error(logits, out) <= 1e-4
    assert torch.equal(out.argmax(1), logits.argmax(1))
    assert all(r.rel_error < 1e-6 for r in rec.layers.values())


def test_input_network_is_not_modified(net, logits, case):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    decompose_network(net, df(0.3))
    assert not any(isinstance(m, TuckerConv) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_alias_and_all_modules_entry_are_the_same_new_module(net):
    new, _ = decompose_network(net, df(0.5))
    blocks = [m for m in new.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")]
    assert blocks
    for block in blocks:
        assert block.conv is block.all_modules[0]
    assert isinstance(new.encoder.stages[1][0].convs[0].conv, TuckerConv)
    assert new.decoder.encoder is new.encoder  # nnU-Net registers the encoder twice
    keys = new.state_dict().keys()
    assert "encoder.stages.1.0.convs.0.all_modules.0.core.weight" in keys
    assert "decoder.encoder.stages.1.0.convs.0.conv.restore.bias" in keys


def test_stem_keeps_input_mode_and_heads_stay_dense(net):
    eligible = eligible_convs(net)
    stem = stem_name(net)
    assert stem == "encoder.stages.0.0.convs.0.conv" and stem in eligible
    assert not any("seg_layers" in n for n in eligible)
    assert stem not in eligible_convs(net, include_stem=False)
    new, rec = decompose_network(net, df(0.3))
    assert rec.layers[stem].ranks == LayerRanks(None, 5)  # ceil(0.3 · 16)
    stem_module = new.encoder.stages[0][0].convs[0].conv
    assert isinstance(stem_module, TuckerConv) and not hasattr(stem_module, "reduce")
    assert stem_module.in_channels == 1 and stem_module.out_channels == 16
    for head, original in zip(new.decoder.seg_layers, net.decoder.seg_layers):
        assert type(head) is nn.Conv3d and torch.equal(head.weight, original.weight)


def test_rank_guard_skips_layers_that_would_grow(net):
    _, full = decompose_network(net, df(1.0))  # full rank only adds the projections
    assert full.ranks == {} and len(full.skipped) == len(eligible_convs(net))
    _, p = decompose_network(net, df(0.9), guard="params")
    _, pf = decompose_network(net, df(0.9), guard="params+flops")
    _, none = decompose_network(net, df(0.9), guard=None)
    # the stem (1 → 16 gains 15·16 projection weights) and the 2³ transposed convs (whose
    # projections cost as much as a 2³ kernel saves) grow; the 3³ convs shrink
    assert p.skipped == ["encoder.stages.0.0.convs.0.conv", *(f"decoder.transpconvs.{i}" for i in range(3))]
    assert set(p.skipped) < set(pf.skipped)
    # stride 2: the reduce conv runs on 8x more voxels than the rest of the layer
    assert "encoder.stages.1.0.convs.0.conv" in pf.skipped
    assert none.skipped == []
    for rec in (p, pf):
        for name in rec.skipped:
            r = rec.layers[name]
            assert r.params_after >= r.params_before or r.macs_after >= r.macs_before
            assert r.reason.startswith("guard")


def test_rebuild_from_spec_reproduces_the_decomposed_network(net, case):
    new, rec = decompose_network(net, df(0.3))
    spec = CompressionSpec.from_dict(json.loads(json.dumps(CompressionSpec(ranks=rec.ranks).to_dict())))
    base = build_reference_arch()
    rebuilt = apply_ranks(base, spec.ranks)
    assert not any(isinstance(m, TuckerConv) for m in base.modules())  # apply_ranks works on a copy
    rebuilt.load_state_dict(new.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(case), new(case))


def test_energy_policy_keeps_the_requested_energy(net):
    _, rec = decompose_network(net, get_rank_policy("energy", energy=0.9), guard=None)
    for name, r in rec.layers.items():
        assert all(e <= 0.1 + 1e-9 for e in r.discarded_energy.values()), name
        for mode, rank in (("in", r.ranks.rank_in), ("out", r.ranks.rank_out)):
            if rank is not None and rank > 1:  # one component fewer would drop more than 10 %
                f = tucker2_factors(eligible_convs(net)[name].weight,
                                    rank - 1 if mode == "in" else r.ranks.rank_in,
                                    rank - 1 if mode == "out" else r.ranks.rank_out,
                                    transposed=r.transposed)
                assert f.discarded_energy[mode] > 0.1, (name, mode)


def test_residual_encoder_unet_decomposes_and_runs():
    torch.manual_seed(0)
    net = ResidualEncoderUNet(
        1, 4, [8, 16, 32, 64], nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], 3, [1, 1, 1], conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()
    eligible = eligible_convs(net)
    assert stem_name(net) == "encoder.stem.convs.0.conv" and stem_name(net) in eligible
    skips = [n for n, m in net.named_modules() if isinstance(m, nn.Conv3d) and ".skip." in n]
    assert skips and not set(skips) & set(eligible)  # 1³ skip projections stay dense
    assert set(skips) <= set(eligible_convs(net, include_1x1=True))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        y = net(x)
        exact, _ = decompose_network(net, df(1.0), guard=None)
        assert rel_max_error(y, exact(x)) <= 1e-4
        small, rec = decompose_network(net, df(0.5))
        assert small(x).shape == y.shape
    assert n_params(small) < n_params(net)
    blocks = [m for m in small.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")]
    assert all(b.conv is b.all_modules[0] for b in blocks)


def test_totalsegmentator_3mm_architecture_at_df_0_3():
    a = json.loads(TOTALSEG_PLANS.read_text())["architecture_inferred"]
    net = PlainConvUNet(a["input_channels"], a["n_stages"], a["features_per_stage"], nn.Conv3d, a["kernel_sizes"],
                        a["strides"], a["n_conv_per_stage"], a["num_classes"], a["n_conv_per_stage_decoder"],
                        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    net.apply(PlainConvUNet.initialize)
    net.eval()
    new, rec = decompose_network(net, df(0.3))  # speed is measured in scripts/bench_compression.py
    assert rec.skipped == [] and len(rec.ranks) == 22
    assert n_params(new) < n_params(net) / 5  # 16.6 M → 2.0 M
    assert n_params(net) - n_params(new) == rec.params_saved()
    assert new.decoder.seg_layers[-1].out_channels == 118
    with torch.no_grad():
        assert new(torch.randn(1, 1, 32, 32, 32)).shape == (1, 118, 32, 32, 32)


# --- single layers ------------------------------------------------------------------------

def test_relative_error_decreases_as_df_grows(net):
    conv = net.encoder.stages[2][0].convs[1].conv  # 64 → 64, 3³
    errors = [tucker2_factors(conv.weight, *df(x)(conv.weight).to_list()).rel_error for x in DF_GRID]
    # 64 channels: every DF of the grid gives a different rank (4, 7, 13, …, 58, 64)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.2 and errors[-1] < 1e-6


@pytest.mark.parametrize("x", [0.1, 0.3, 0.5, 0.9])
def test_hosvd_error_obeys_the_discarded_energy_bound(net, x):
    """max_n D_n ≤ ‖W − Ŵ‖² / ‖W‖² ≤ Σ_n D_n, D_n = discarded share of Σσ² of mode n."""
    for name, conv in eligible_convs(net).items():
        f = tucker2_factors(conv.weight, *df(x)(conv.weight, transposed=conv.transposed).to_list(),
                            transposed=conv.transposed)
        d = f.discarded_energy.values()
        assert max(d) - 1e-9 <= f.rel_error ** 2 <= sum(d) + 1e-9, name


@pytest.mark.parametrize("layer", ["encoder.stages.2.0.convs.1.conv", "decoder.transpconvs.0"])
def test_hooi_runs_and_beats_hosvd(net, layer, monkeypatch):
    """Both channel modes truncated below their rank bound: HOOI really iterates (spied) and
    lowers the error (measured 0.892 → 0.878 and 0.877 → 0.845 at DF 0.3)."""
    import medslim.decompose.tucker as tucker

    calls, real = [], tucker._hooi
    monkeypatch.setattr(tucker, "_hooi", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = dict(net.named_modules())[layer]
    ranks = df(0.3)(conv.weight, transposed=conv.transposed).to_list()
    hosvd = tucker2_factors(conv.weight, *ranks, transposed=conv.transposed)
    hooi = tucker2_factors(conv.weight, *ranks, transposed=conv.transposed, method="hooi")
    assert calls == [1]
    assert hooi.rel_error < hosvd.rel_error - 5e-3, (hooi.rel_error, hosvd.rel_error)
    assert hooi.core.shape == hosvd.core.shape
    for u in (hooi.u_in, hooi.u_out):
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)


def test_hooi_falls_back_to_hosvd_only_where_hosvd_is_optimal(net, monkeypatch):
    """One truncated mode (Eckart–Young) or a rank at its unfolding's bound: HOSVD is optimal,
    HOOI is skipped and the factors are the HOSVD's exactly."""
    import medslim.decompose.tucker as tucker

    monkeypatch.setattr(tucker, "_hooi", lambda *a, **k: pytest.fail("HOOI ran where HOSVD is optimal"))
    conv = net.encoder.stages[2][0].convs[1].conv  # 64 → 64, 3³: unfoldings 64 × 1728
    for ranks in ((None, 20), (20, None), (64, 20)):
        hosvd = tucker2_factors(conv.weight, *ranks)
        hooi = tucker2_factors(conv.weight, *ranks, method="hooi")
        assert torch.equal(hooi.core, hosvd.core) and hooi.rel_error == hosvd.rel_error


@pytest.mark.parametrize("layer", ["decoder.transpconvs.0", "encoder.stages.1.0.convs.0.conv"])
def test_tucker_conv_computes_the_reconstructed_weight(net, layer):
    """The module equals the original layer with W replaced by Ŵ = G ×_out U_out ×_in U_in."""
    conv = dict(net.named_modules())[layer]
    transposed = bool(conv.transposed)
    x = torch.randn(2, conv.in_channels, 6, 8, 6)
    op = F.conv_transpose3d if transposed else F.conv3d
    kw = {"stride": conv.stride, "padding": conv.padding}
    full, _ = TuckerConv.from_conv(conv, conv.in_channels, conv.out_channels)
    with torch.no_grad():
        assert rel_max_error(conv(x), full(x)) < 1e-5
        module, f = TuckerConv.from_conv(conv, 7, 5)
        w_hat = f.core
        w_hat = torch.tensordot(f.u_out, w_hat.movedim(int(transposed), 0), dims=1).movedim(0, int(transposed))
        w_hat = torch.tensordot(f.u_in, w_hat.movedim(int(not transposed), 0), dims=1).movedim(0, int(not transposed))
        assert rel_max_error(op(x, w_hat, conv.bias, **kw), module(x)) < 1e-5
    assert type(module.core) is type(conv) and type(module.reduce) is type(module.restore) is nn.Conv3d
    assert (module.in_channels, module.out_channels, module.ranks) == (conv.in_channels, conv.out_channels, (7, 5))
    assert module.stride == conv.stride and module.kernel_size == conv.kernel_size
    assert module.core.bias is None and torch.equal(module.restore.bias, conv.bias)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2, padding=1),
                                  nn.ConvTranspose2d(6, 5, 2, stride=2)], ids=lambda c: type(c).__name__)
def test_other_dimensions_round_trip(conv):
    x = torch.randn(1, 6, *([8] * (conv.weight.dim() - 2)))
    module, _ = TuckerConv.from_conv(conv, 6, 5)
    with torch.no_grad():
        assert rel_max_error(conv(x), module(x)) < 1e-5


def test_empty_like_has_the_structure_of_from_conv(net):
    conv = net.decoder.transpconvs[1]
    filled, _ = TuckerConv.from_conv(conv, None, 9)
    empty = TuckerConv.empty_like(conv, None, 9)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in filled.state_dict().items()}
    assert list(empty._modules) == ["core", "restore"]


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 1.5, -0.3, "0.5"])
def test_df_outside_unit_interval_is_a_user_error(bad):
    with pytest.raises(MedslimError, match="DF"):
        get_rank_policy("df", df=bad)


def test_unknown_policy_and_parameters_are_user_errors():
    with pytest.raises(MedslimError, match="did you mean 'df'"):
        get_rank_policy("dff", df=0.3)
    with pytest.raises(MedslimError, match="rank policy 'df'"):
        get_rank_policy("df", energy=0.3)
    with pytest.raises(MedslimError, match="energy"):
        get_rank_policy("energy", energy=0)


def test_bad_decompose_options_are_user_errors(net):
    with pytest.raises(MedslimError, match="method 'hosv'"):
        decompose_network(net, df(0.3), method="hosv")
    with pytest.raises(MedslimError, match="guard"):
        decompose_network(net, df(0.3), guard="flops")
    with pytest.raises(MedslimError, match="rank_min"):
        decompose_network(net, df(0.3), rank_min=0)


def test_apply_ranks_rejects_bad_specs(net):
    layer = "encoder.stages.1.0.convs.0.conv"
    with pytest.raises(MedslimError, match=f"rank 48 exceeds the 32 output channels of `{layer}`"):
        apply_ranks(net, {layer: LayerRanks(8, 48)})
    with pytest.raises(MedslimError, match="does not have"):
        apply_ranks(net, {"encoder.stages.9.0.convs.0.conv": LayerRanks(8, 8)})
    with pytest.raises(MedslimError, match="not a convolution"):
        apply_ranks(net, {"encoder.stages.1.0.convs.0.norm": LayerRanks(8, 8)})


def test_networks_medslim_cannot_decompose_are_user_errors(net):
    mixed = build_reference_arch()
    block = mixed.decoder.stages[0].convs[1]
    block.conv = block.all_modules[0] = nn.Conv2d(64, 64, 3)
    with pytest.raises(MedslimError, match="`decoder.stages.0.convs.1.conv` is a Conv2d in a 3D network"):
        eligible_convs(mixed)
    odd = build_reference_arch()
    block = odd.encoder.stages[1][0].convs[0]
    block.conv = block.all_modules[0] = nn.Identity()
    with pytest.raises(MedslimError, match="`encoder.stages.1.0.convs.0.conv` is a Identity"):
        eligible_convs(odd)
    done, _ = decompose_network(net, df(0.5))
    with pytest.raises(MedslimError, match="already Tucker-decomposed"):
        decompose_network(done, df(0.5))
