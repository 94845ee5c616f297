"""Iterative compression: a second stage on a compressed reference model rebuilds exactly
from the base architecture + the composed spec, and shrinking a Tucker layer is exact where
it should be."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medslim.compress import CompressConfig, compress_network
from medslim.decompose.truncate import shrink_tucker
from medslim.decompose.tucker import TuckerConv
from medslim.errors import MedslimError
from medslim.network import CompressedUNet, compressed_arch
from medslim.recompress import compose_kept, compress_further, shrink_rank


def test_shrink_tucker_keeps_the_function_at_full_rank_and_matches_a_direct_decomposition():
    torch.manual_seed(0)
    conv = nn.Conv3d(12, 10, 3, padding=1)
    x = torch.randn(2, 12, 5, 6, 5)
    module, _ = TuckerConv.from_conv(conv, None, 8)
    same = shrink_tucker(module, None, 8)
    assert torch.allclose(same(x), module(x), atol=1e-6)
    # only the output mode decomposed: the core is W projected on U_out, so shrinking it is
    # the direct HOSVD at the smaller rank (the same subspace, up to rotation)
    direct, _ = TuckerConv.from_conv(conv, None, 4)
    shrunk = shrink_tucker(module, None, 4)
    assert shrunk.ranks == (None, 4)
    assert torch.allclose(shrunk(x), direct(x), atol=1e-5)
    both, _ = TuckerConv.from_conv(conv, 9, 8)
    small = shrink_tucker(both, 5, 4)
    assert small.ranks == (5, 4) and small(x).shape == both(x).shape
    with pytest.raises(MedslimError, match="outside"):
        shrink_tucker(both, 10, 4)
    with pytest.raises(MedslimError, match="not decomposed"):
        shrink_tucker(module, 3, 4)


def test_compose_kept_and_shrink_rank_by_hand():
    assert compose_kept({"a": (1, 3, 4, 7)}, {"a": (0, 2), "b": (5,)}) == {"a": (1, 4), "b": (5,)}
    assert compose_kept({"a": (2, 3)}, {}) == {"a": (2, 3)}
    assert [shrink_rank(r, 0.5, 2) for r in (None, 1, 3, 8)] == [None, 1, 2, 4]


def test_second_stage_rebuilds_exactly_from_the_base_architecture(reference, hippo_patch):
    net = reference.build_network()
    shape = [1, 1, *reference.patch_size]
    first = compress_network(net, CompressConfig(df=0.5, prune_ratio=0.3), shape)
    stage1 = CompressedUNet.wrap(first.network, first.spec)
    stage2 = compress_further(stage1, CompressConfig(df=0.5, prune_ratio=0.3), 0.5, shape)
    params = [sum(p.numel() for p in m.parameters()) for m in (net, stage1, stage2)]
    assert params[0] > params[1] > params[2]
    assert stage2.spec.ranks.keys() == first.spec.ranks.keys()
    assert all(r2.rank_out <= r1.rank_out for r1, r2 in zip(first.spec.ranks.values(), stage2.spec.ranks.values()))
    arch = compressed_arch(reference.architecture, stage2.spec)["arch_kwargs"]
    rebuilt = CompressedUNet(1, reference.num_classes, **arch)
    rebuilt.load_state_dict(stage2.state_dict())  # strict: same tensors, same shapes
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(hippo_patch), stage2(hippo_patch), atol=1e-5)
    assert len(stage2.spec.provenance["stages"]) == 2
    with pytest.raises(MedslimError, match="outer"):
        compress_further(stage1, CompressConfig(prune_site="rank"), 0.5, shape)
