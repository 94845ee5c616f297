"""Physical channel removal (SPEC §3) on real nnU-Net U-Nets, checked against masking
*after* the activation (the only place where removing a channel equals zeroing it)."""
from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from torch import nn

from medslim.compress import CompressConfig, compress_network
from medslim.decompose import TuckerConv, decompose_network, get_rank_policy
from medslim.errors import MedslimError
from medslim.network import CompressedUNet, compressed_arch
from medslim.prune import example_input, keep_top_k, prunable_layers, prune_network


def _mask_target(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """Where zeroing the output channels of conv ``name`` equals removing them: the residual
    block when the conv feeds its addition (its last conv or its skip; the sum then passes
    the block's final nonlinearity), else the ``ConvDropoutNormReLU`` holding it (after norm
    and nonlin), else the conv itself (also a rank inside a Tucker unit: the next conv follows)."""
    target = modules[name]
    unit = modules.get(name.rpartition(".")[0])
    if isinstance(unit, TuckerConv) and target is not list(unit)[-1]:
        return target
    for block_name, block in modules.items():
        if isinstance(block, (BasicBlockD, BottleneckD)):
            last = "conv3" if isinstance(block, BottleneckD) else "conv2"
            if any(name.startswith(f"{block_name}.{part}.") for part in (last, "skip")):
                return block
    for parent in modules.values():  # the ConvDropoutNormReLU whose first module holds it
        mods = getattr(parent, "all_modules", None)
        if mods is not None and (mods[0] is target or (isinstance(mods[0], nn.Sequential) and list(mods[0])[-1] is target)):
            return parent
    return target


def _zero_all_but(keep: tuple[int, ...]):
    """A forward hook zeroing every output channel not in ``keep``."""
    def hook(m, i, o):
        mask = torch.zeros(o.shape[1], dtype=o.dtype)
        mask[list(keep)] = 1
        return o * mask.view(1, -1, *([1] * (o.dim() - 2)))
    return hook


def zero_removed(net: nn.Module, kept: dict[str, tuple[int, ...]],
                 members: dict[str, list[str]] | None = None) -> list:
    """Hooks that zero the removed channels of every pruned layer (``members[root]``, default
    the root alone) where they leave their block (see ``_mask_target``)."""
    modules = dict(net.named_modules())
    return [_mask_target(modules, name).register_forward_hook(_zero_all_but(keep))
            for root, keep in kept.items() for name in (members or {}).get(root, [root])]


def random_scores(net, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = dict(net.named_modules())
    return {n: torch.rand(mods[n].out_channels, generator=g) for n in layers}


@pytest.mark.parametrize("site", ["outer", "rank", "all"])
def test_removal_equals_masking_after_activation(reference, hippo_patch, site):
    net = decompose_network(reference.build_network(), get_rank_policy("df", df=0.5))[0].eval()
    layers = prunable_layers(net, site)
    assert layers
    pruned, record = prune_network(net, layers, random_scores(net, layers), 0.5, example_input(net, 1))
    ref_net = copy.deepcopy(net)
    zero_removed(ref_net, record.kept)
    with torch.no_grad():
        want, got = ref_net(hippo_patch), pruned(hippo_patch)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    for name, keep in record.kept.items():
        c_before, c_after = record.channels[name]
        assert c_after == len(keep) == -(-c_before // 2)


def test_sites_never_touch_heads_or_stem(reference):
    net = reference.build_network()
    outer = prunable_layers(net, "outer")
    assert not any("seg_layers" in n for n in outer)
    assert "encoder.stages.0.0.convs.0.conv" not in outer
    assert "encoder.stages.0.0.convs.0.conv" in prunable_layers(net, "outer", prune_stem=True)
    with pytest.raises(MedslimError, match="prune site"):
        prunable_layers(net, "inner")


def test_keep_top_k_counts_and_ties():
    assert keep_top_k(torch.tensor([0.1, 0.9, 0.5, 0.7]), 0.5).tolist() == [1, 3]
    assert len(keep_top_k(torch.ones(10), 0.7)) == 3  # ceil(0.3 * 10) despite 0.3 * 10 = 3.0000000000000004
    assert keep_top_k(torch.ones(5), 0.5).tolist() == [0, 1, 2]  # ties: lower index, count unchanged
    assert keep_top_k(torch.rand(3), 0.99).numel() == 1


def test_rho_zero_changes_nothing(reference, hippo_patch):
    net = reference.build_network()
    config = CompressConfig(df=0.5, prune_ratio=0.0)
    decomposed = decompose_network(net, config.rank_policy_fn())[0].eval()
    result = compress_network(net, config, [1, 1, *reference.patch_size])
    assert not result.spec.kept
    with torch.no_grad():
        assert torch.equal(result.network(hippo_patch), decomposed(hippo_patch))


def test_spec_round_trip_rebuilds_identical_network(reference, hippo_patch):
    net = reference.build_network()
    result = compress_network(net, CompressConfig(df=0.3, prune_ratio=0.5, prune_site="all"),
                              [1, 1, *reference.patch_size])
    arch = compressed_arch(reference.architecture, result.spec)
    rebuilt = CompressedUNet(input_channels=1, num_classes=3, **arch["arch_kwargs"]).eval()
    rebuilt.load_state_dict(result.network.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(hippo_patch), result.network(hippo_patch))


def test_residual_encoder_unet_groups_coupled_channels():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from medslim.prune.sites import stem_output

    torch.manual_seed(0)
    net = ResidualEncoderUNet(1, 4, [8, 16, 32, 64], nn.Conv3d, 3, [1, 2, 2, 2], [1, 2, 2, 2], 3, [1, 1, 1],
                              conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    layers = prunable_layers(net, "outer")
    stem = stem_output(net)
    pruned, record = prune_network(net, layers, random_scores(net, layers), 0.5, example_input(net, 1),
                                   protect=(stem,))
    coupled = [m for m in record.members.values() if len(m) > 1]
    assert coupled and all(any("skip" in n for n in m) for m in coupled), "residual additions couple channels"
    assert dict(pruned.named_modules())[stem].out_channels == 8, "the stem (and its residual stream) is protected"
    assert pruned(x).shape == (1, 3, 32, 32, 32)
    pruned.decoder.deep_supervision = True  # auxiliary heads follow the pruned channels
    assert [o.shape[1] for o in pruned(x)] == [3, 3, 3]


def resenc(block: type = BasicBlockD) -> nn.Module:
    """A small ``ResidualEncoderUNet`` with random InstanceNorm γ/β (β = 0 at init would hide
    the difference between masking and removal)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(0)
    net = ResidualEncoderUNet(1, 4, [8, 16, 32, 64], nn.Conv3d, 3, [1, 2, 2, 2], [1, 2, 2, 2], 3, [1, 1, 1],
                              conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False,
                              block=block, bottleneck_channels=[4, 8, 16, 32] if block is BottleneckD else None)
    for m in net.modules():
        if isinstance(m, nn.InstanceNorm3d):
            nn.init.normal_(m.weight, 1.0, 0.2), nn.init.normal_(m.bias, 0.0, 0.5)
    return net.eval()


@pytest.mark.parametrize("block, site", [(BasicBlockD, "outer"), (BasicBlockD, "all"), (BottleneckD, "outer")],
                         ids=["basic-outer", "basic-all", "bottleneck-outer"])
def test_resenc_removal_equals_masking_at_block_outputs(block, site):
    """SPEC §3 on ``ResidualEncoderUNet``: removing a residual group's channels equals zeroing
    them where every member's block ends (after the addition and the block's nonlinearity);
    zeroing them right after the convolutions does not (InstanceNorm turns a zero channel into
    β, and the skip still adds)."""
    from medslim.prune.sites import stem_output

    net = decompose_network(resenc(block), get_rank_policy("df", df=0.5))[0].eval()
    layers = prunable_layers(net, site)
    pruned, record = prune_network(net, layers, random_scores(net, layers), 0.5, example_input(net, 1),
                                   protect=(stem_output(net),))
    assert any(len(m) > 1 for m in record.members.values()), "no residual group was pruned"
    x = torch.randn(1, 1, 32, 32, 32)
    masked = copy.deepcopy(net)
    zero_removed(masked, record.kept, record.members)
    naive = copy.deepcopy(net)
    modules = dict(naive.named_modules())
    for root, keep in record.kept.items():
        for name in record.members[root]:
            modules[name].register_forward_hook(_zero_all_but(keep))
    with torch.no_grad():
        got, want, wrong = pruned(x), masked(x), naive(x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    assert (got - wrong).abs().max() > 1e-2 * want.abs().max()


def test_deep_supervision_heads_follow_pruning(reference, hippo_patch):
    result = compress_network(reference.build_network(), CompressConfig(df=0.3, prune_ratio=0.5),
                              [1, 1, *reference.patch_size])
    result.network.decoder.deep_supervision = True
    with torch.no_grad():
        outs = result.network(hippo_patch)
    assert len(outs) == len(reference.build_network().decoder.seg_layers)
    assert all(o.shape[1] == 3 for o in outs)
