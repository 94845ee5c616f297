"""Latency-aware compression: the per-device latency cache, the ``latency`` rank guard, the
``latency`` budget rank policy and ``rank_multiple``. Timings that assertions depend on are
injected (deterministic); speed itself is measured in benchmarks, not here."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from medslim import LayerRanks, MedslimError
from medslim.compress import CompressConfig, compress_network
from medslim.decompose import TuckerConv, decompose_network, eligible_convs, get_rank_policy
from medslim.cache import CACHE_ENV
from medslim.decompose.latency import (LatencyCache, LayerTimer, _hooked_shapes, build_layer,
                                       conv_input_shapes, device_key, layer_signature, measure_seconds)
from medslim.decompose.budget_ranks import LatencyBudgetRanks, greedy_budget
from medslim.decompose.ranks import LayerSite, round_rank


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(reference) -> nn.Module:
    return reference.build_network().eval()


@pytest.fixture(scope="module")
def input_shape(reference) -> tuple[int, ...]:
    return (1, reference.num_input_channels, *reference.patch_size)  # [1, 1, 40, 56, 40]


class FakeClock:
    """A deterministic ``measure``: seconds = (weights × input voxels) / 1e9, scaled by
    ``tucker_factor`` for a ``TuckerConv``; counts its calls."""

    def __init__(self, tucker_factor=lambda module: 1.0) -> None:
        self.calls = 0
        self.tucker_factor = tucker_factor

    def __call__(self, module: nn.Module, input_shape, *, threads: int) -> float:
        self.calls += 1
        work = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight")) * math.prod(input_shape[2:])
        scale = self.tucker_factor(module) if isinstance(module, TuckerConv) else 1.0
        return work * scale / 1e9


def timer_at(path, clock) -> LayerTimer:
    return LayerTimer(LatencyCache(path, device="test"), threads=1, measure=clock)


# --- measurement, signatures, shapes -------------------------------------------------------

def test_measure_seconds_times_a_real_conv_and_restores_threads():
    before = torch.get_num_threads()
    s = measure_seconds(nn.Conv3d(2, 3, 3, padding=1), (1, 2, 8, 8, 8), threads=2, repeats=2)
    assert 0 < s < 5 and torch.get_num_threads() == before


def test_signature_tells_dense_tucker_and_input_shapes_apart():
    conv = nn.Conv3d(8, 16, 3, stride=2, padding=1)
    keys = {layer_signature(conv, (8, 8, 8)).key(), layer_signature(conv, (8, 8, 16)).key(),
            layer_signature(conv, (8, 8, 8), LayerRanks(4, 4)).key(),
            layer_signature(conv, (8, 8, 8), LayerRanks(None, 4)).key()}
    assert len(keys) == 4
    sig = layer_signature(conv, (8, 8, 8), LayerRanks(4, 5))
    module = build_layer(sig)
    assert isinstance(module, TuckerConv) and module.ranks == (4, 5) and module.stride == (2, 2, 2)
    assert sig.input_shape == (1, 8, 8, 8, 8)


def test_device_key_names_cpu_torch_and_threads():
    key = device_key(3)
    assert torch.__version__.split("+")[0] in key and key.endswith("cpu__3t") and "/" not in key


def test_conv_input_shapes_match_a_real_forward_pass(net, input_shape):
    convs = eligible_convs(net)
    shapes = conv_input_shapes(net, input_shape, convs)
    assert shapes == _hooked_shapes(net, input_shape, list(convs), "cpu")
    assert shapes[next(iter(convs))] == input_shape
    assert all(s[1] == convs[n].in_channels for n, s in shapes.items())


# --- the cache ------------------------------------------------------------------------------

def test_latency_cache_is_reused_not_re_measured(net, input_shape, tmp_path):
    path = tmp_path / "cache.json"
    clock = FakeClock()
    first = timer_at(path, clock)
    _, rec1 = decompose_network(net, get_rank_policy("df", df=0.5), guard="latency", input_shape=input_shape,
                                timer=first)
    n_layers = len(rec1.layers)
    assert first.measured == clock.calls > 0 and clock.calls <= 2 * n_layers
    again = FakeClock()
    second = timer_at(path, again)  # a new process: only the file carries the measurements
    _, rec2 = decompose_network(net, get_rank_policy("df", df=0.5), guard="latency", input_shape=input_shape,
                                timer=second)
    assert again.calls == 0 and second.measured == 0
    assert rec1.layers == rec2.layers


def test_default_cache_lives_under_medslim_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    clock = FakeClock()
    timer = LayerTimer(threads=2, measure=clock)
    assert timer.cache.path == tmp_path / "latency" / f"{device_key(2)}.json"
    timer.layer_seconds(nn.Conv3d(2, 2, 3, padding=1), (4, 4, 4))
    assert LayerTimer(threads=2, measure=clock).layer_seconds(nn.Conv3d(2, 2, 3, padding=1), (4, 4, 4)) > 0
    assert clock.calls == 1


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "seconds": {"x": -1}}',
                                     '{"format": 99, "seconds": {}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, content):
    path = tmp_path / "cache.json"
    path.write_text(content)
    clock = FakeClock()
    with pytest.warns(RuntimeWarning, match="unreadable latency cache"):
        timer = timer_at(path, clock)
    conv = nn.Conv3d(2, 2, 3, padding=1)
    seconds = timer.layer_seconds(conv, (4, 4, 4))
    assert clock.calls == 1
    data = json.loads(path.read_text())
    assert data["seconds"] == {layer_signature(conv, (4, 4, 4)).key(): seconds}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert timer_at(path, clock).layer_seconds(conv, (4, 4, 4)) == seconds
    assert clock.calls == 1 and not list(tmp_path.glob(".*tmp*"))


# --- the latency guard ----------------------------------------------------------------------

def test_latency_guard_keeps_slower_layers_dense_and_replaces_faster_ones(net, input_shape, tmp_path):
    # Tucker is measured slower than dense exactly for the convs reading 16 channels
    clock = FakeClock(lambda m: 1e6 if m.in_channels == 16 else 1e-6)
    new, rec = decompose_network(net, get_rank_policy("df", df=0.5), guard="latency", input_shape=input_shape,
                                 timer=timer_at(tmp_path / "c.json", clock))
    convs = eligible_convs(net)
    slow = {n for n, c in convs.items() if c.in_channels == 16}
    assert slow and set(rec.skipped) == slow and len(rec.ranks) == len(convs) - len(slow)
    for name in slow:
        r = rec.layers[name]
        assert r.reason.startswith("guard: Tucker ") and " ≥ dense " in r.reason, r.reason
        assert r.seconds_tucker >= r.seconds_dense
    modules = dict(new.named_modules())
    assert all(isinstance(modules[n], TuckerConv) == (n not in slow) for n in convs)
    before, after = rec.conv_seconds()
    assert after < before
    with torch.no_grad():
        assert new(torch.zeros(input_shape)).shape == net(torch.zeros(input_shape)).shape


def test_latency_needs_an_input_shape(net, tmp_path):
    with pytest.raises(MedslimError, match="input_shape"):
        decompose_network(net, get_rank_policy("df", df=0.5), guard="latency")
    with pytest.raises(MedslimError, match="input_shape"):
        decompose_network(net, get_rank_policy("latency", budget=0.5))
    with pytest.raises(MedslimError, match="does not run on input shape"):  # too small for its strides
        decompose_network(net, get_rank_policy("df", df=0.5), guard="latency", input_shape=(1, 1, 4, 4, 4),
                          timer=timer_at(tmp_path / "c.json", FakeClock()))


# --- the latency budget policy ------------------------------------------------------------

def test_budget_policy_meets_its_budget(net, input_shape, tmp_path):
    timer = timer_at(tmp_path / "c.json", FakeClock())
    for budget in (0.5, 0.25):
        new, rec = decompose_network(net, get_rank_policy("latency", budget=budget), input_shape=input_shape,
                                     timer=timer)
        before, after = rec.conv_seconds()
        assert after <= budget * before and rec.ranks
        assert all(r.seconds_tucker < r.seconds_dense for r in rec.layers.values() if r.replaced)
    _, dense = decompose_network(net, get_rank_policy("latency", budget=1.0), input_shape=input_shape, timer=timer)
    assert not dense.ranks and {r.reason for r in dense.layers.values()} == {"rank policy: kept dense"}
    with pytest.raises(MedslimError, match="out of reach"):
        decompose_network(net, get_rank_policy("latency", budget=0.01), input_shape=input_shape, timer=timer)


def low_rank_conv(c: int, rank: int, seed: int) -> nn.Conv3d:
    """A ``c → c`` 3³ conv whose weight has rank ``rank`` in both channel modes."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(c, c, 3, padding=1)
    a, b, k = (torch.randn(rank, c, generator=g), torch.randn(rank, c, generator=g),
               torch.randn(rank, 3, 3, 3, generator=g))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("jo,jc,jxyz->ocxyz", a, b, k))
    return conv


def test_budget_policy_cuts_the_layer_that_loses_less_energy(tmp_path):
    # same shapes and injected times; cutting either one alone meets the budget
    full = low_rank_conv(8, 8, seed=0)
    low = low_rank_conv(8, 2, seed=1)
    sites = {n: LayerSite(c, ("in", "out"), (1, 8, 4, 4, 4)) for n, c in (("full", full), ("low", low))}

    def clock(module, input_shape, *, threads):  # dense 1 s; Tucker 0.1 s + 1 s × mean rank / C
        return 1.0 if not isinstance(module, TuckerConv) else 0.1 + sum(module.ranks) / 16

    plan = LatencyBudgetRanks(0.85).plan(sites, timer=timer_at(tmp_path / "c.json", clock))
    assert plan["full"] is None and plan["low"] is not None
    assert plan["low"].rank_in >= 2 and plan["low"].rank_out >= 2  # rank 2 keeps all its energy


def test_greedy_budget_takes_the_cheapest_energy_per_second_first():
    options = {"a": [(1.0, 0.0), (0.5, 0.10)], "b": [(1.0, 0.0), (0.5, 0.01), (0.2, 0.5)]}
    assert greedy_budget(options, 1.5) == {"a": 0, "b": 1}
    assert greedy_budget(options, 1.0) == {"a": 1, "b": 1}
    assert greedy_budget(options, 2.0) == {"a": 0, "b": 0}
    assert greedy_budget(options, 0.1) == {"a": 1, "b": 2}  # unreachable: fastest everywhere


def test_latency_policy_is_network_level_only():
    with pytest.raises(MedslimError, match="all layers at once"):
        get_rank_policy("latency", budget=0.5)(torch.zeros(4, 4, 3, 3, 3))
    for bad in (0, 1.5, True):
        with pytest.raises(MedslimError, match="latency budget"):
            get_rank_policy("latency", budget=bad)


# --- rank_multiple --------------------------------------------------------------------------

@pytest.mark.parametrize("rank, channels, rank_min, multiple, expected", [
    (10, 32, 1, 8, 16), (16, 32, 1, 8, 16), (20, 64, 1, 16, 32), (39, 128, 1, 8, 40), (9, 12, 1, 8, 12), (7, 12, 1, 8, 8),
    (1, 32, 3, 4, 4), (30, 32, 1, 16, 32), (5, 5, 1, 8, 5), (5, 32, 1, 1, 5), (None, 32, 1, 8, None)])
def test_round_rank(rank, channels, rank_min, multiple, expected):
    assert round_rank(rank, channels, rank_min=rank_min, multiple=multiple) == expected


def test_rank_multiple_rounds_every_rank_and_never_exceeds_c(net):
    _, rec = decompose_network(net, get_rank_policy("df", df=0.3), rank_multiple=8)
    assert rec.ranks and rec.settings["rank_multiple"] == 8
    for r in rec.layers.values():
        for rank, c in ((r.ranks.rank_in, r.c_in), (r.ranks.rank_out, r.c_out)):
            assert rank is None or (rank <= c and (rank % 8 == 0 or rank == c))
            if rank is not None:
                assert rank >= min(math.ceil(0.3 * c), c)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank_multiple": 0}, "rank_multiple"), ({"rank_multiple": 2.5}, "rank_multiple"),
    ({"rank_multiple": True}, "rank_multiple"), ({"latency_budget": 0}, "latency-budget"),
    ({"latency_budget": 1.2}, "latency-budget"), ({"guard": "speed"}, "guard"), ({"rank_min": 0}, "rank-min")])
def test_bad_latency_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(MedslimError, match=match):
        CompressConfig(**kwargs)


def test_compress_network_uses_the_latency_settings(net, input_shape, tmp_path):
    config = CompressConfig(rank_policy="latency", latency_budget=0.4, rank_multiple=4, guard="latency",
                            prune_ratio=0.0)
    assert config.rank_policy_fn() == LatencyBudgetRanks(0.4)
    out = compress_network(net, config, input_shape, timer=timer_at(tmp_path / "c.json", FakeClock()))
    before, after = out.decomposition.conv_seconds()
    assert after <= 0.4 * before
    assert out.spec.ranks and all(r is None or r % 4 == 0 or r in (16, 32, 64, 128)  # C itself is allowed
                                  for lr in out.spec.ranks.values() for r in lr.to_list())


def test_budget_policy_rounds_ranks_up_where_that_is_faster(tmp_path):
    conv = nn.Conv3d(32, 32, 3, padding=1)
    sites = {"conv": LayerSite(conv, ("in", "out"), (1, 32, 4, 4, 4))}

    def clock(module, input_shape, *, threads):  # ranks that are not multiples of 8 pay 0.5 s
        if not isinstance(module, TuckerConv):
            return 1.0
        return 0.2 + 0.8 * max(module.ranks) / 32 + (0.5 if any(r % 8 for r in module.ranks) else 0.0)

    timer = timer_at(tmp_path / "c.json", clock)
    plan = LatencyBudgetRanks(0.9, candidates=(0.3,)).plan(sites, timer=timer)  # DF 0.3: rank 10 → 16
    assert plan["conv"] == LayerRanks(16, 16)
    with pytest.raises(MedslimError, match="out of reach"):  # rank 10 alone: 0.95 s
        LatencyBudgetRanks(0.9, candidates=(0.3,), try_multiples=()).plan(sites, timer=timer)
    assert LatencyBudgetRanks(0.9, candidates=(0.3,)).plan(sites, timer=timer, rank_multiple=3) == {
        "conv": LayerRanks(24, 24)}  # lcm(3, 8)
