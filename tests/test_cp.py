"""NORTON (Pham et al. 2024): per-filter CP blocks (exact at full rank, ALS below), the spec's
``cp`` record and its rebuild, ``medslim compress --decomposition cp`` and the ``norton``
criterion, on hand-made layers and the embedded reference nnU-Net (pruning CP blocks:
``test_cp_prune.py``)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import assert_user_error

from medslim import CompressionSpec, MedslimError
from medslim.cli import app
from medslim.compress import CompressConfig, compress_network
from medslim.decompose import CPDConv, apply_cp, cp_filter_factors
from medslim.decompose.cp import cp_weight
from medslim.network import CompressedUNet
from medslim.score import ScoreContext, get_criterion
from medslim.score.norton import removal_order, subspace_distance

pytestmark = pytest.mark.usefixtures("one_thread")
CP_RANK = 2


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv3d(5, 7, 3, stride=(2, 1, 1), padding=1), (2, 5, 9, 8, 7)),
    (nn.Conv3d(4, 6, (3, 1, 3), stride=2, padding=(0, 0, 1), dilation=(2, 1, 1)), (1, 4, 11, 6, 9)),
    (nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)), (2, 4, 13, 17)),
    (nn.Conv2d(4, 6, 3, padding="same", bias=False), (1, 4, 8, 8)),
])
def test_full_rank_reproduces_the_conv(conv, shape):
    torch.manual_seed(0)
    rank = math.prod(conv.kernel_size)
    block, f = CPDConv.from_conv(conv, rank)
    x = torch.randn(shape)
    with torch.no_grad():
        ref, out = conv(x), block(x)
    assert out.shape == ref.shape
    assert rel_max_error(ref, out) <= 1e-4
    assert f.rel_error < 1e-6 and f.nmse < 1e-12
    channel, spatial = block.factors()  # the module's weights are the factors
    assert torch.allclose(cp_weight(channel, spatial), conv.weight.detach(), atol=1e-6)
    assert sum(p.numel() for p in block.parameters()) == conv.out_channels * rank * (
        conv.in_channels + sum(conv.kernel_size)) + (conv.out_channels if conv.bias is not None else 0)


def test_als_recovers_a_low_rank_filter_bank_and_beats_random_factors():
    torch.manual_seed(1)
    o, c, k, r = 6, 8, 3, 2
    channel, spatial = torch.randn(o, c, r), tuple(torch.randn(o, k, r) for _ in range(3))
    w = cp_weight(channel, spatial)
    noisy = w + 0.01 * w.norm() / math.sqrt(w.numel()) * torch.randn_like(w)
    errors = {rank: cp_filter_factors(noisy, rank).rel_error for rank in (1, 2, 4, 8)}
    assert errors[2] < 0.03 < errors[1]  # the planted rank is found up to the noise
    assert all(errors[a] >= errors[b] - 1e-3 for a, b in [(1, 2), (2, 4), (4, 8)])
    # random factors of the same shape, each filter optimally scaled: error ≈ 1
    rnd = cp_weight(torch.randn(o, c, r), tuple(torch.randn(o, k, r) for _ in range(3))).flatten(1)
    flat = noisy.flatten(1)
    best = rnd * ((rnd * flat).sum(1) / rnd.square().sum(1))[:, None]
    random_error = float((flat - best).norm() / flat.norm())
    assert errors[1] < 0.9 * random_error


def test_als_error_shrinks_with_rank_on_a_trained_layer(net):
    w = net.encoder.stages[1][0].convs[1].conv.weight[:8]
    errors = [cp_filter_factors(w, rank).rel_error for rank in (1, 2, 4, 8, 27)]
    assert all(a >= b - 1e-3 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-6


def test_bad_cp_rank_is_a_user_error():
    with pytest.raises(MedslimError, match="positive integer"):
        cp_filter_factors(torch.randn(2, 2, 3, 3), 0)
    with pytest.raises(MedslimError, match="transposed"):
        CPDConv(nn.ConvTranspose3d(2, 2, 2, stride=2), 2)


@pytest.fixture(scope="module")
def net():
    from test_decompose import load_reference_model

    return load_reference_model()


@pytest.fixture(scope="module")
def compressed(net, reference):
    config = CompressConfig(decomposition="cp", cp_rank=CP_RANK, prune_ratio=0.0)
    return compress_network(net, config, [1, 1, *reference.patch_size])


def test_compress_cp_replaces_the_eligible_convs(net, compressed):
    blocks = {n for n, m in compressed.network.named_modules() if isinstance(m, CPDConv)}
    assert set(compressed.spec.cp) == blocks
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv3d)}
    stem, heads = "encoder.stages.0.0.convs.0.conv", {n for n in convs if "seg_layers" in n}
    # rank 2 shrinks the stem too (16·2·(1+9)+16 < 16·27+16); heads (1×1×1) stay dense
    assert blocks == convs - heads and stem in blocks
    assert all(r == CP_RANK for r in compressed.spec.cp.values()) and not compressed.spec.ranks
    rec = compressed.decomposition.layers
    assert all(0 < rec[n].rel_error < 1 for n in blocks)


def test_rebuild_from_spec_equals_the_compressed_model(compressed, reference, hippo_patch):
    arch = reference.architecture
    spec = CompressionSpec.from_dict(json.loads(json.dumps(compressed.spec.to_dict())))
    assert spec.cp == compressed.spec.cp
    rebuilt = CompressedUNet(1, reference.num_classes, arch["network_class_name"], arch["arch_kwargs"],
                             spec.to_dict(), arch["_kw_requires_import"])
    state = compressed.network.state_dict()
    assert set(rebuilt.state_dict()) == set(state)
    rebuilt.load_state_dict(state)  # strict
    with torch.no_grad():
        a, b = compressed.network(hippo_patch), rebuilt.eval()(hippo_patch)
    assert torch.equal(a, b)


def test_specs_without_cp_are_unchanged():
    old = {"format": "medslim.compression/1", "ranks": {"a.conv": [None, 4]}, "kept": {"b": [0, 2]},
           "provenance": {"x": 1}}
    spec = CompressionSpec.from_dict(old)
    assert spec.cp == {} and spec.to_dict() == old
    with pytest.raises(MedslimError, match="positive integer"):
        CompressionSpec.from_dict({**old, "cp": {"c.conv": 0}})
    with pytest.raises(MedslimError, match="both by Tucker-2"):
        CompressionSpec.from_dict({**old, "cp": {"a.conv": 2}})
    with pytest.raises(MedslimError, match="does not have"):
        apply_cp(nn.Sequential(nn.Conv2d(1, 2, 3)), {"1": 2})


def test_cli_compress_cp_end_to_end(compressed, reference_dir, tmp_path, hippo_patch):
    from medslim.load import load_results_folder

    out = tmp_path / "cp"
    result = run("compress", reference_dir, "-o", out, "--decomposition", "cp", "--cp-rank", CP_RANK)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "compression_spec.json").read_text())
    assert spec["cp"] == dict(compressed.spec.cp) and spec["kept"] == {}
    report = json.loads((out / "compression_report.json").read_text())
    assert report["params"]["ratio"] > 1.5
    assert "CP 2" in result.stdout
    loaded = load_results_folder(out).build_network()  # CompressedUNet from the plans, strict load
    assert any(isinstance(m, CPDConv) for m in loaded.modules())
    with torch.no_grad():
        assert rel_max_error(compressed.network(hippo_patch), loaded(hippo_patch)) < 1e-5


@pytest.mark.parametrize("conv_type, k", [(nn.Conv2d, (3, 3)), (nn.Conv3d, (3, 3, 3))])
def test_norton_scores_twins_below_a_distinct_filter(conv_type, k):
    torch.manual_seed(2)
    conv = conv_type(6, 3, k)
    with torch.no_grad():
        conv.weight[2] = -3.0 * conv.weight[1]  # same subspaces: CP's scaling ambiguity
    model = nn.Sequential(conv)
    scores = get_criterion("norton")(model, ["0"], ScoreContext(cp_rank=2))["0"]
    assert scores.shape == (3,)
    assert scores[1] < scores[0] and scores[2] < scores[0]


def test_removal_order_follows_algorithm_1():
    # 0 and 1 are the closest pair; 1 is closer to the rest (row sum 1.3 < 1.6) → removed first
    d = torch.tensor([[0.0, 0.1, 0.9, 0.6],
                      [0.1, 0.0, 0.5, 0.7],
                      [0.9, 0.5, 0.0, 0.8],
                      [0.6, 0.7, 0.8, 0.0]])
    assert removal_order(d)[0] == 1
    a = torch.randn(5, 3)
    same = subspace_distance(torch.stack([a, a[:, [2, 0, 1]] * torch.tensor([2.0, -1.0, 0.5]), torch.randn(5, 3)]))
    assert same[0, 1] < 1e-6 < same[0, 2]


def test_cli_norton_prune_end_to_end(reference_dir, tmp_path, hippo_patch):
    from medslim.load import load_results_folder

    out = tmp_path / "norton"
    result = run("compress", reference_dir, "-o", out, "--criterion", "norton", "--prune", "0.3", "--df", "0.5")
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "compression_spec.json").read_text())
    assert spec["provenance"]["config"]["criterion"] == "norton"
    kept = spec["kept"]["encoder.stages.3.0.convs.1.conv.restore"]
    assert len(kept) == math.ceil(0.7 * 128)
    net = load_results_folder(out).build_network()
    with torch.no_grad():
        assert torch.isfinite(net(hippo_patch)).all()


@pytest.mark.parametrize("args, match", [
    (["--decomposition", "cp", "--cp-rank", "0"], "--cp-rank must be an integer ≥ 1"),
    (["--decomposition", "tuker"], "did you mean 'tucker'"),
    (["--criterion", "nortn"], "did you mean 'norton'"),
])
def test_bad_options_exit_2(reference_dir, tmp_path, args, match):
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, *args), out, match)


def test_rank_above_a_mode_size_does_not_break_als():
    # a stem filter [1, 3, 3]: rank 2 makes ALS's normal equations singular without regularisation
    torch.manual_seed(3)
    f = cp_filter_factors(torch.randn(4, 1, 3, 3), 2)
    assert math.isfinite(f.rel_error) and f.rel_error < 0.7
