"""Size and cost of a network: physical parameters and FLOPs of one forward pass."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(net: nn.Module) -> int:
    """Physical parameter count (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())


def count_flops(net: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward pass on ``input_shape`` ``[B, C, *patch]``.

    Counted by PyTorch's ``FlopCounterMode`` on a meta-device copy, so nothing is computed
    and a TotalSegmentator patch costs no memory. Convolutions and matmuls only (norms and
    activations are a rounding error next to them).
    """
    meta = copy.deepcopy(net).to("meta").eval()
    x = torch.empty(*input_shape, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops())
