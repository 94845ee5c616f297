"""Compression of MONAI's own networks (``UNet``, ``SegResNet``, ``DynUNet``, ``BasicUNet``),
built with the arguments model-zoo bundles use: full-rank Tucker reproduces them, removal
equals masking (GroupNorm losing whole groups), deep-supervision heads follow pruning, and the
spec rebuilds each network on a fresh instance."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medslim.compress import CompressConfig, compress_network
from medslim.families import family_of
from medslim.network import rebuild
from medslim.prune import build_graph, example_input, prunable_layers, prune_network
from medslim.prune.pruner import out_channel_fn

monai_nets = pytest.importorskip("monai.networks.nets")
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine and running statistics in every norm (the defaults γ 1, β 0, mean 0, var 1
    would hide a wrong channel map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return net.eval()


# the networks of real bundles: spleen_ct_segmentation (UNet), wholeBody_ct_segmentation
# (SegResNet, 105 classes), an nnU-Net-like DynUNet with deep supervision, BasicUNet's defaults
NETS = {
    "UNet": lambda: monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[16, 32, 64, 128, 256],
                                    strides=[2, 2, 2, 2], num_res_units=2, norm="batch"),
    "SegResNet": lambda: monai_nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=105, init_filters=32,
                                              blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], dropout_prob=0.2),
    "DynUNet": lambda: monai_nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3, 3],
                                          strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], norm_name="instance",
                                          deep_supervision=True, deep_supr_num=2, res_block=True),
    "BasicUNet": lambda: monai_nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2),
}

NETS_OUT = {"UNet": 2, "SegResNet": 105, "DynUNet": 3, "BasicUNet": 2}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_norms(NETS[kind](), seed)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(NETS))
def test_full_rank_tucker_reproduces_the_network(kind, x):
    net = build(kind)
    result = compress_network(net, CompressConfig(df=1.0, prune_ratio=0.0, guard=None), x.shape)
    assert result.spec.ranks and not result.spec.kept
    assert not any(name in result.spec.ranks for name in family_of(net).heads(net))
    with torch.no_grad():
        want, got = net(x), result.network(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _zero_removed_where_coupled(net: nn.Module, kept: dict[str, tuple[int, ...]], example: torch.Tensor) -> None:
    """Hooks zeroing the removed channels at the output of every module whose output channels
    are pruned with them (producing convolutions and their norms), so the zeros pass every
    activation, addition and concatenation as removal would."""
    graph = build_graph(net, example)
    modules = dict(net.named_modules())
    for root, keep in kept.items():
        group = graph.get_pruning_group(modules[root], out_channel_fn(graph, modules[root]), idxs=[0])
        targets = {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}
        for m in targets:
            def hook(_m, _i, out, keep=keep):
                mask = torch.zeros(out.shape[1], dtype=out.dtype)
                mask[list(keep)] = 1
                return out * mask.view(1, -1, *[1] * (out.dim() - 2))
            m.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["UNet", "SegResNet"])
def test_removal_equals_masking(kind, x):
    net = build(kind)
    example = example_input(net, 1)
    layers = prunable_layers(net, "outer")
    g = torch.Generator().manual_seed(2)
    modules = dict(net.named_modules())
    scores = {n: torch.rand(modules[n].out_channels, generator=g) for n in layers}
    pruned, record = prune_network(net, layers, scores, 0.5, example, protect=(layers[0],))
    masked = copy.deepcopy(net)
    _zero_removed_where_coupled(masked, record.kept, example)
    with torch.no_grad():
        want, got, original = masked(x), pruned(x), net(x)
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)
    assert (got - original).abs().max() > 1e-2 * original.abs().max()  # pruning did change the network
    if kind == "SegResNet":  # whole groups went: group sizes as before, fewer groups
        before = {n: m for n, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
        after = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.GroupNorm)}
        sizes = {n: (before[n].num_channels // before[n].num_groups, m.num_channels // m.num_groups)
                 for n, m in after.items()}
        assert all(a == b for a, b in sizes.values())
        assert any(m.num_groups < before[n].num_groups for n, m in after.items())


def test_dynunet_deep_supervision_heads_follow_pruning(x):
    net = build("DynUNet")
    result = compress_network(net, CompressConfig(df=0.5, prune_ratio=0.5), x.shape)
    assert result.spec.kept
    result.network.train()
    with torch.no_grad():
        out = result.network(x)
    assert out.shape == (1, 3, 3, *x.shape[2:])  # main output + 2 deep-supervision heads, 3 classes


@pytest.mark.parametrize("kind", list(NETS))
def test_spec_rebuilds_the_compressed_network_on_a_fresh_instance(kind, x):
    net = build(kind)
    result = compress_network(net, CompressConfig(df=0.5, prune_ratio=0.5, seed=3), x.shape)
    fresh = rebuild(build(kind, seed=7), result.spec, 1)
    fresh.load_state_dict(result.network.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), result.network(x))
    assert sum(p.numel() for p in fresh.parameters()) < 0.5 * sum(p.numel() for p in net.parameters())


def test_granule_top_k_keeps_whole_blocks_by_summed_score():
    from medslim.prune.groupnorm import granule_top_k

    scores = torch.tensor([0.9, 0.0, 0.1, 0.1, 0.5, 0.4, 0.0, 0.0])  # blocks of 2: 0.9 0.2 0.9 0.0
    assert granule_top_k(scores, 3, 2).tolist() == [0, 1, 4, 5]  # 3 channels round up to 2 blocks
    assert granule_top_k(scores, 1, 1).tolist() == [0]


@pytest.mark.parametrize("kind", ["UNet", "SegResNet"])
def test_hvs_conserves_score_mass_through_monai_blocks(kind):
    """Seeded at the network's output, HVS mass reaches the input unchanged: residual units,
    concatenating skip connections, transposed convs, PReLU/GroupNorm pass-throughs."""
    from medslim.score import ScoreContext, propagate

    net = build(kind)
    p = propagate(net, ScoreContext(engine="channel", reduce="sum"))
    assert p.seeded == NETS_OUT[kind] and p.input_mass == pytest.approx(p.seeded, rel=1e-6)



@pytest.mark.parametrize("criterion", ["consumer_l1", "hvs", "hvs_data", "l1", "nisp", "random", "relief", "taylor"])
def test_every_criterion_prunes_a_monai_unet(criterion, x):
    net = build("UNet")
    calibration = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    config = CompressConfig(df=0.5, prune_ratio=0.5, criterion=criterion, with_calibration=True)
    result = compress_network(net, config, x.shape, calibration=calibration)
    kept = {root: len(k) for root, k in result.spec.kept.items()}
    assert kept and all(k == -(-result.pruning.channels[r][0] // 2) for r, k in kept.items())
    with torch.no_grad():
        assert torch.isfinite(result.network(x)).all()
