"""NORTON end to end: filters of CP blocks (``CPDConv``) removed physically through
Torch-Pruning's customized-pruner hook, checked against zeroing them, on tiny 2D/3D nets and
the embedded reference nnU-Net; the spec rebuild of a CP + pruned model; the criteria on CP
blocks; ``medslim compress --decomposition cp --criterion norton --prune``."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import assert_user_error
from test_prune import zero_removed

from medslim import CompressionSpec
from medslim.cli import app
from medslim.decompose import CPDConv, decompose_network_cp
from medslim.network import CompressedUNet
from medslim.prune import example_input, prunable_layers, prune_network
from medslim.prune.graph import CUSTOM_PRUNERS
from medslim.prune.graph import build_graph
from medslim.prune.sites import stem_output
from medslim.score import ScoreContext, get_criterion
from medslim.score.linearise import cp_dense

pytestmark = pytest.mark.usefixtures("one_thread")
CP_RANK = 2
RATIO = 0.3


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny(conv: type[nn.Module]) -> nn.Sequential:
    """CP blocks at 0 (the stem: its input is the network input), 2 and 4, LeakyReLU between
    (0 ↦ 0, so a zeroed filter equals a removed one), a dense 1×…×1 head."""
    torch.manual_seed(0)
    net = nn.Sequential(conv(2, 6, 3, padding=1), nn.LeakyReLU(), conv(6, 8, 3, padding=1, stride=2),
                        nn.LeakyReLU(), conv(8, 5, 3, padding=1), nn.LeakyReLU(), conv(5, 3, 1))
    for i in (0, 2, 4):
        net[i] = CPDConv.from_conv(net[i], CP_RANK)[0]
        nn.init.normal_(net[i].bias)
    return net.eval()


def zero_filters(net: nn.Module, kept: dict[str, tuple[int, ...]]) -> nn.Module:
    """A copy of ``net`` whose CP blocks' removed filters are zeroed: projection rows
    ``o·R … o·R + R − 1`` and ``bias[o]``."""
    net = copy.deepcopy(net)
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name, keep in kept.items():
            block = modules[name]
            drop = sorted(set(range(block.out_channels)) - set(keep))
            block.project.weight.view(block.out_channels, block.rank, -1)[drop] = 0
            block.bias[drop] = 0
    return net


def random_scores(net: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    modules = dict(net.named_modules())
    return {n: torch.rand(modules[n].out_channels, generator=g) for n in layers}


@pytest.mark.parametrize("conv, shape", [(nn.Conv2d, (2, 2, 12, 10)), (nn.Conv3d, (1, 2, 8, 6, 10))], ids=["2d", "3d"])
def test_removal_equals_zeroing_filters(conv, shape):
    net = tiny(conv)
    x = torch.randn(shape)
    layers = ["0", "2", "4"]
    pruned, record = prune_network(net, layers, random_scores(net, layers), 0.5, x[:1])
    with torch.no_grad():
        want, got = zero_filters(net, record.kept)(x), pruned(x)
    torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5)
    for name, block in [("0", pruned[0]), ("2", pruned[2]), ("4", pruned[4])]:
        o = len(record.kept[name])
        assert block.out_channels == o and block.bias.shape == (o,)
        assert block.project.weight.shape[0] == o * CP_RANK
        assert all(a.weight.shape[0] == a.groups == a.in_channels == o * CP_RANK for a in block.axes)
    assert pruned[2].in_channels == len(record.kept["0"]) and pruned[6].in_channels == len(record.kept["4"])
    # the factors of a kept filter are unchanged: norton on the pruned block sees them
    channel, _ = pruned[2].factors()
    assert torch.equal(channel, net[2].factors()[0][list(record.kept["2"])][:, list(record.kept["0"])])


def test_the_graph_sees_cp_blocks_as_leaves():
    """Torch-Pruning traces no op inside a block (projection, axis convs, reshape-sum): each
    block's node reads the previous activation directly (the stem block: nothing)."""
    net = tiny(nn.Conv2d)
    graph = build_graph(net, torch.randn(1, 2, 8, 8))
    inputs = {n: [i.grad_fn.name() for i in graph.module2node[net[int(n)]].inputs] for n in ("0", "2", "4")}
    assert inputs == {"0": [], "2": ["LeakyReluBackward0"], "4": ["LeakyReluBackward0"]}
    assert len(graph.module2node) == 7  # 3 blocks, 3 activations, the head
    assert graph.get_pruner_of_module(net[2]) is CUSTOM_PRUNERS[CPDConv]


@pytest.mark.parametrize("engine", ["channel", "spatial"])
def test_hvs_scores_a_cp_block_as_the_conv_of_its_absolute_factors(engine):
    net = tiny(nn.Conv2d)
    dense = copy.deepcopy(net)
    for i in (0, 2, 4):  # W⁺ = Σ_r |c_r| ⊗ |a_r| ⊗ |b_r| as a real convolution
        w = cp_dense(net[i]).weight
        dense[i] = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, stride=net[i].stride)
        with torch.no_grad():
            dense[i].weight.copy_(w)
    ctx = ScoreContext(input_shape=(1, 2, 12, 12), engine=engine)
    for criterion in ("hvs", "nisp", "consumer_l1"):
        got, want = get_criterion(criterion)(net, ["0", "2"], ctx), get_criterion(criterion)(dense, ["0", "2"], ctx)
        for name in ("0", "2"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def cp_net(reference_net):
    return decompose_network_cp(reference_net, CP_RANK)[0].eval()


@pytest.fixture(scope="module")
def norton_pruned(cp_net, reference):
    layers = prunable_layers(cp_net, "outer")
    scores = get_criterion("norton")(cp_net, layers, ScoreContext(cp_rank=CP_RANK))
    return prune_network(cp_net, layers, scores, RATIO, example_input(cp_net, 1), protect=(stem_output(cp_net),))


def test_reference_removal_equals_masking_after_activation(cp_net, norton_pruned, hippo_patch):
    pruned, record = norton_pruned
    blocks = [n for n, m in pruned.named_modules() if isinstance(m, CPDConv) and n in record.kept]
    assert len(blocks) > len(record.kept) - 4  # all but the 3 transposed convs (dense) and nothing else
    masked = copy.deepcopy(cp_net)
    zero_removed(masked, record.kept, record.members)
    with torch.no_grad():
        want, got = masked(hippo_patch), pruned(hippo_patch)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in cp_net.parameters())
    for name, (before, after) in record.channels.items():
        assert after == math.ceil((1 - RATIO) * before)


def test_spec_rebuild_of_cp_pruned_model_is_identical(cp_net, norton_pruned, reference, hippo_patch):
    pruned, record = norton_pruned
    cp = {n: CP_RANK for n, m in cp_net.named_modules() if isinstance(m, CPDConv)}
    spec = CompressionSpec.from_dict(json.loads(json.dumps(CompressionSpec(cp=cp, kept=record.kept).to_dict())))
    arch = reference.architecture
    rebuilt = CompressedUNet(1, reference.num_classes, arch["network_class_name"], arch["arch_kwargs"],
                             spec.to_dict(), arch["_kw_requires_import"]).eval()
    state = pruned.state_dict()
    assert set(rebuilt.state_dict()) == set(state)
    rebuilt.load_state_dict(state)  # strict
    with torch.no_grad():
        assert torch.equal(rebuilt(hippo_patch), pruned(hippo_patch))


def test_cli_cp_norton_prune_end_to_end(norton_pruned, reference_dir, tmp_path, hippo_patch):
    from medslim.load import load_results_folder

    out = tmp_path / "norton-cp"
    result = run("compress", reference_dir, "-o", out, "--decomposition", "cp", "--cp-rank", CP_RANK,
                 "--criterion", "norton", "--prune", RATIO)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "compression_spec.json").read_text())
    pruned, record = norton_pruned
    assert spec["kept"] == {n: list(k) for n, k in record.kept.items()}
    assert {n for n in record.kept if "transpconvs" not in n} <= set(spec["cp"])  # transposed convs stay dense
    loaded = load_results_folder(out).build_network()  # CompressedUNet from the plans, strict load
    with torch.no_grad():
        want = pruned(hippo_patch)
        assert float((loaded(hippo_patch) - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("args, match", [
    (["--criterion", "relief", "--prune", "0.3"], "--criterion relief cannot score CP blocks"),
    (["--criterion", "relief", "--alpha", "0.9"], "--criterion relief cannot score CP blocks"),
    (["--criterion", "norton", "--prune", "0.3", "--prune-site", "rank"], "--prune-site rank prunes Tucker ranks"),
])
def test_criteria_that_cannot_score_cp_blocks_exit_2(reference_dir, tmp_path, args, match):
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, "--decomposition", "cp", *args), out, match)
