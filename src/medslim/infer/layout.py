"""Channels-last execution for PyTorch on CPU.

PyTorch's CPU convolutions are faster on channels-last tensors, but ``InstanceNorm`` has no
channels-last kernel: every norm converts to NCDHW and back, and after Tucker-2 those copies
around the cheap 1×…×1 projections cost more than the convolutions. ``F.group_norm`` with one
group per channel computes the same normalisation and keeps the layout.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNormAsGroupNorm(nn.Module):
    """An ``InstanceNorm{1,2,3}d`` without running statistics, as ``group_norm`` with
    ``groups = C``: input ``[B, C, *S]`` → the same values, memory format kept."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1], self.norm.weight, self.norm.bias, self.norm.eps)


def channels_last(net: nn.Module) -> tuple[nn.Module, torch.memory_format | None]:
    """A copy of ``net`` in channels-last memory format with its instance norms replaced, and
    the input memory format to use; ``(net, None)`` unchanged when ``net`` is neither 2D nor
    3D or holds an instance norm with running statistics."""
    convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    dims = {m.weight.dim() for m in convs}
    norms = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    if dims not in ({4}, {5}) or any(n.track_running_stats for n in norms):
        return net, None
    out = copy.deepcopy(net)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm):
                setattr(parent, name, InstanceNormAsGroupNorm(child))
    fmt = torch.channels_last_3d if dims == {5} else torch.channels_last
    return out.to(memory_format=fmt), fmt
