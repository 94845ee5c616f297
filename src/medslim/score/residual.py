"""Residual additions for HVS, found in the forward pass rather than by block class names.

A residual addition is an addition of two *feature maps*: tensors that depend on the network
input, i.e. that require grad while the linearised network (whose parameters are frozen) runs
on a grad-requiring input. Constants, buffers, parameters and Python numbers never qualify, so
``x + 1``, ``x + bias`` or a positional embedding are left alone.

:class:`ResidualAdditions` is a ``TorchFunctionMode``: while it is active every such addition
— ``a + b``, ``torch.add(a, b)``, ``a.add(b)``, and ``a += b`` / ``a.add_(b)`` (which reach the
mode as the same in-place ``add_``, so they stay in place) — is seen whatever module or library
wrote it: dynamic-network-architectures' ``BasicBlockD``/``BottleneckD``, torchvision's and
timm's ``BasicBlock``/``Bottleneck``, a hand-written ``x + f(x)``, also inside data-dependent
Python control flow that ``torch.fx`` cannot trace. It

- multiplies the sum by ``weight``: ½ gives each addend half of the score the sum receives
  (SPEC §2's residual rule), so score mass is conserved through the block;
- with ``skip_gates``, replaces a broadcasting product of two feature maps (a
  squeeze-excitation gate, ``x * gate``) by the larger map alone: scores pass through the map
  unchanged and none reach the gate branch, whose values are data, not weights.

Sums of more than two maps written as one reduction (``torch.stack(maps).sum(0)``) and
products of equally shaped maps are not recognised; ``propagate``'s mass check reports them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_ADD = frozenset({torch.add, Tensor.add, Tensor.__add__})
_ADD_IN_PLACE = frozenset({Tensor.add_, Tensor.__iadd__})  # `a += b` arrives as Tensor.add_
_MUL = frozenset({torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__imul__, Tensor.mul_})


def _two_feature_maps(args: tuple) -> bool:
    """Are the first two arguments tensors (not scalars) that depend on the network input?"""
    return (len(args) >= 2 and all(isinstance(t, Tensor) and t.requires_grad and t.dim() > 0
                                   for t in args[:2]))


class ResidualAdditions(TorchFunctionMode):
    """While active, an addition of two feature maps ``a``, ``b`` gives ``weight · (a + b)``
    (in place for ``add_``/``+=``); with ``skip_gates`` a product of a feature map and a
    broadcast gate gives the map.

    Attributes:
        additions: number of residual additions seen.
    """

    def __init__(self, weight: float = 0.5, skip_gates: bool = False):
        super().__init__()
        self.weight, self.skip_gates, self.additions = float(weight), skip_gates, 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in _ADD and _two_feature_maps(args):
            self.additions += 1
            return func(*args, **kwargs) * self.weight
        if func in _ADD_IN_PLACE and _two_feature_maps(args):
            self.additions += 1
            a, b = args[:2]
            return a.mul_(self.weight).add_(b, alpha=self.weight * kwargs.get("alpha", 1))
        if self.skip_gates and func in _MUL and _two_feature_maps(args) and args[0].numel() != args[1].numel():
            a, b = args[:2]
            return (a if a.numel() > b.numel() else b).clone()
        return func(*args, **kwargs)
