"""GroupNorm pruned by whole groups, so that removing channels equals zeroing them.

Torch-Pruning's own GroupNorm handler keeps ``num_groups`` and shrinks each group, which
changes the mean and variance every remaining channel is normalised with: the pruned network
then computes something the original never did. Removing whole groups instead leaves every
remaining group's statistics as they were (a group of zeroed channels does not touch the
others), and ``num_groups`` drops by the groups removed. The price: channels coupled with a
GroupNorm are kept or removed ``C / num_groups`` at a time (``channel_granule``), and a
GroupNorm with one group (LayerNorm-like) is never pruned.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from medslim.errors import MedslimError
from medslim.prune.select import top_k


class WholeGroupNormPruner(tp.pruner.function.GroupNormPruner):
    """Removes channels of an ``nn.GroupNorm`` only as whole groups (in place); input and output
    channels are the same channels (intra-layer coupling, as for every norm)."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: Sequence[int]) -> nn.Module:
        size = layer.num_channels // layer.num_groups
        gone = sorted({int(i) // size for i in idxs})
        if len(set(int(i) for i in idxs)) != len(gone) * size:
            raise MedslimError(f"GroupNorm({layer.num_groups}, {layer.num_channels}) can only lose whole groups of "
                               f"{size} channels; {len(idxs)} channels were asked for")
        keep = [i for i in range(layer.num_channels) if i // size not in gone]
        layer.num_groups -= len(gone)
        layer.num_channels = len(keep)
        if layer.affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels


def channel_granule(graph: tp.DependencyGraph, module: nn.Module, out_channel_fn) -> int:
    """How many consecutive channels of ``module``'s output are kept or removed together: the
    least common multiple of the group sizes of the GroupNorms coupled with it (1 without)."""
    group = graph.get_pruning_group(module, out_channel_fn, idxs=[0])
    sizes = [dep.target.module.num_channels // dep.target.module.num_groups
             for dep, _ in group if isinstance(dep.target.module, nn.GroupNorm)]
    return math.lcm(*sizes) if sizes else 1


def granule_top_k(scores: torch.Tensor, k: int, granule: int) -> torch.Tensor:
    """Indices (ascending, ``[k']`` int64) of the ``ceil(k / granule)`` blocks of ``granule``
    consecutive channels with the highest summed ``scores`` ``[C]`` (``C`` a multiple of
    ``granule``); ``granule`` 1 is plain ``top_k``."""
    if granule == 1:
        return top_k(scores, k)
    blocks = scores.detach().double().cpu().reshape(-1, granule).sum(1)
    chosen = top_k(blocks, min(blocks.numel(), -(-k // granule)))
    return (chosen[:, None] * granule + torch.arange(granule)).flatten()
