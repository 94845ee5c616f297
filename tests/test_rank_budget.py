"""The ``budget`` rank policy (SPEC §1): per-layer ranks that meet a global parameter or FLOP
budget with the least discarded spectral energy, on the embedded reference nnU-Net."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medslim import LayerRanks, MedslimError
from medslim.decompose import decompose_network, eligible_convs, get_rank_policy, tucker_params
from medslim.decompose.apply import conv_macs
from medslim.decompose.latency import conv_input_shapes
from medslim.decompose.tucker import hosvd_error_grid, tucker2_factors
from medslim.measure import count_flops


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(reference_net) -> nn.Module:
    return reference_net


@pytest.fixture(scope="module")
def input_shape(reference) -> tuple[int, ...]:
    return (1, reference.num_input_channels, *reference.patch_size)  # [1, 1, 40, 56, 40]


def params_after(rec) -> int:
    return sum(r.params_after if r.replaced else r.params_before for r in rec.layers.values())


def largest_step(net: nn.Module, rec, multiple: int, input_shape) -> float:
    """Parameters one rank step up (``multiple``, capped at C) costs on any replaced layer: to the
    next rank pair, or back to dense where that pair would not be smaller (params, MACs)."""
    convs = eligible_convs(net)
    shapes = conv_input_shapes(net, input_shape, convs)
    steps = [0]
    for name, r in rec.layers.items():
        if not r.replaced:
            continue
        conv, ranks, dense = convs[name], r.ranks, r.params_before
        for mode, rank, c in (("in", ranks.rank_in, r.c_in), ("out", ranks.rank_out, r.c_out)):
            if rank is None or rank == c:
                continue
            up = LayerRanks(min(rank + multiple, c), ranks.rank_out) if mode == "in" else \
                LayerRanks(ranks.rank_in, min(rank + multiple, c))
            spatial = shapes[name][2:]
            smaller = tucker_params(conv, up) < dense and conv_macs(conv, up, spatial) < conv_macs(conv, None, spatial)
            steps.append((tucker_params(conv, up) if smaller else dense) - r.params_after)
    return max(steps)


@pytest.mark.parametrize("budget, rank_min, multiple", [(0.1, 1, 1), (0.3, 1, 1), (0.2, 4, 8)])
def test_params_budget_is_met_within_one_rank_step(net, input_shape, budget, rank_min, multiple):
    _, rec = decompose_network(net, get_rank_policy("budget", budget=budget), input_shape=input_shape,
                               rank_min=rank_min, rank_multiple=multiple)
    dense = sum(r.params_before for r in rec.layers.values())
    achieved = params_after(rec)
    assert achieved <= budget * dense
    assert achieved > budget * dense - largest_step(net, rec, multiple, input_shape)
    assert rec.ranks and not any(r.reason.startswith("guard") for r in rec.layers.values())
    for r in rec.layers.values():
        for rank, c in ((r.ranks.rank_in, r.c_in), (r.ranks.rank_out, r.c_out)):
            assert rank is None or (min(rank_min, c) <= rank <= c and (rank % multiple == 0 or rank == c))
    assert "latency_device" not in rec.settings  # nothing was timed
    assert all(r.seconds_dense is None for r in rec.layers.values())


def test_flops_budget_is_met_as_torch_counts_flops(net, input_shape):
    budget = 0.25
    new, rec = decompose_network(net, get_rank_policy("budget", budget=budget, target="flops"),
                                 input_shape=input_shape)
    shapes = conv_input_shapes(net, input_shape, rec.layers)
    before, after = dict(net.named_modules()), dict(new.named_modules())
    dense = sum(count_flops(before[n], shapes[n]) for n in rec.layers)
    achieved = sum(count_flops(after[n], shapes[n]) for n in rec.layers)
    assert rec.ranks and achieved <= budget * dense
    assert achieved > 0.9 * budget * dense  # the greedy fills the budget, it does not undershoot
    # the policy's analytic count is torch's FlopCounter's, per layer
    for n in rec.layers:
        ranks = rec.layers[n].ranks if rec.layers[n].replaced else None
        assert 2 * conv_macs(before[n], ranks, shapes[n][2:]) == count_flops(after[n], shapes[n])


def test_budget_out_of_reach_and_bad_settings_are_one_clear_error(net, input_shape):
    with pytest.raises(MedslimError, match=r"params budget 0\.001 is out of reach: .* use a budget ≥ 0\.0"):
        decompose_network(net, get_rank_policy("budget", budget=0.001), input_shape=input_shape)
    with pytest.raises(MedslimError, match="input_shape"):
        decompose_network(net, get_rank_policy("budget", budget=0.5))
    with pytest.raises(MedslimError, match="all layers at once"):
        get_rank_policy("budget", budget=0.5)(torch.zeros(4, 4, 3, 3, 3))
    with pytest.raises(MedslimError, match="did you mean 'flops'"):
        get_rank_policy("budget", budget=0.5, target="flop")
    for bad in (0, 1.5, True):
        with pytest.raises(MedslimError, match="budget must be a number in"):
            get_rank_policy("budget", budget=bad)
    _, dense = decompose_network(net, get_rank_policy("budget", budget=1.0), input_shape=input_shape)
    assert not dense.ranks


@pytest.mark.parametrize("df", [0.3, 0.5])
def test_budget_discards_less_energy_than_uniform_df_at_the_same_size(net, input_shape, df):
    _, uniform = decompose_network(net, get_rank_policy("df", df=df))
    dense = sum(r.params_before for r in uniform.layers.values())
    _, planned = decompose_network(net, get_rank_policy("budget", budget=params_after(uniform) / dense),
                                   input_shape=input_shape)
    assert params_after(planned) <= params_after(uniform)

    def error(rec):  # Σ_layers ‖W − Ŵ‖²/‖W‖² (what the policy minimises) and Theorem 5.1's bound
        done = [r for r in rec.layers.values() if r.replaced]
        return sum(r.rel_error ** 2 for r in done), sum(sum(r.discarded_energy.values()) for r in done)

    (exact_b, bound_b), (exact_u, bound_u) = error(planned), error(uniform)
    assert exact_b < exact_u and bound_b < bound_u


def test_hosvd_error_grid_is_the_exact_truncation_error(net):
    conv = eligible_convs(net)["decoder.stages.1.convs.0.conv"]  # 64 → 32
    grid = hosvd_error_grid(conv.weight)
    assert grid.shape == (64, 32) and float(grid[-1, -1]) < 1e-12
    for r_in, r_out in ((5, 3), (40, 7), (64, 1)):
        f = tucker2_factors(conv.weight, r_in, r_out)
        assert float(grid[r_in - 1, r_out - 1]) == pytest.approx(f.rel_error ** 2, rel=1e-5)
