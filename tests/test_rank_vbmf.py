"""The ``vbmf`` rank policy (SPEC §1): EVBMF ranks of the mode unfoldings (Kim et al. 2016)."""
from __future__ import annotations

import pytest
import torch

from medslim.decompose import decompose_network, eligible_convs, get_rank_policy
from medslim.decompose.vbmf import evbmf_rank
from medslim.decompose.tucker import unfold


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g,
                                                                                      dtype=torch.float64)
    return signal + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_evbmf_finds_the_rank_of_low_rank_plus_noise(seed):
    x = low_rank_plus_noise(64, 200, rank=5, noise=0.1, seed=seed)
    assert evbmf_rank(x) == 5
    assert evbmf_rank(x.T) == 5  # L > M is transposed
    assert evbmf_rank(x.float()) == 5


def test_evbmf_keeps_nothing_of_pure_noise_and_of_zeros():
    g = torch.Generator().manual_seed(3)
    assert evbmf_rank(torch.randn(64, 200, generator=g)) == 0
    assert evbmf_rank(torch.zeros(8, 27)) == 0


def test_evbmf_drops_components_that_sink_into_the_noise():
    # signal singular values ~80…140; the EVB threshold is about 24·σ, so σ = 6 hides some
    ranks = [evbmf_rank(low_rank_plus_noise(64, 200, rank=5, noise=s, seed=0)) for s in (0.1, 3.0, 6.0)]
    assert ranks[0] == ranks[1] == 5 and 1 <= ranks[2] < 5


def test_vbmf_policy_gives_ranks_in_range_on_the_reference_model(reference):
    net = reference.build_network().eval()
    policy = get_rank_policy("vbmf")
    convs = eligible_convs(net)
    stem = next(iter(convs))
    for name, conv in convs.items():
        modes = ("out",) if name == stem else ("in", "out")
        r = policy(conv.weight.detach(), transposed=bool(conv.transposed), modes=modes)
        for mode, rank, c in (("in", r.rank_in, conv.in_channels), ("out", r.rank_out, conv.out_channels)):
            if mode not in modes:
                assert rank is None
                continue
            assert isinstance(rank, int) and 1 <= rank <= c, (name, mode, rank, c)
            m = unfold(conv.weight.detach(), mode, transposed=bool(conv.transposed))
            assert rank == min(max(evbmf_rank(m), 1), c)  # the Gram-matrix spectrum gives the SVD's rank
    _, rec = decompose_network(net, policy)
    assert rec.ranks  # some layers are genuinely low-rank
