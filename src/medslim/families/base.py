"""What the compression stages need to know about an architecture family, in one place.

A ``Family`` answers, for one network: which convolutions are its heads (their output channels
are the network's outputs, never pruned or decomposed), which module's output seeds HVS, how
large an input it needs to trace, and how to make every head run while tracing (deep
supervision). Decomposing, scoring and pruning ask ``family_of(net)`` instead of testing class
or module names themselves. The stem needs no adapter: it is the first convolution in
registration order in every family supported.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import ClassVar

from torch import nn
from torch.nn.modules.conv import _ConvNd

_LAYERS = (_ConvNd, nn.Linear)


class Family:
    """The generic answers (a plain CNN whose last convolution/Linear is its output); families
    override what differs."""

    name: ClassVar[str] = "generic"

    def matches(self, net: nn.Module) -> bool:
        return True

    def heads(self, net: nn.Module) -> list[str]:
        """Names of the convolutions/Linear layers whose outputs are the network's outputs."""
        last = [n for n, m in net.named_modules() if isinstance(m, _LAYERS)][-1:]
        return last

    def output_module(self, net: nn.Module) -> str:
        """The module whose output is the network's (main) output: HVS seeds δ = 1 there
        (``""`` = the network itself)."""
        return self.heads(net)[-1]

    def input_multiple(self, net: nn.Module) -> int | list[int] | None:
        """Each spatial size must be a multiple of this (the product of the downsampling
        strides); ``None`` when the family does not say."""
        return None

    @contextlib.contextmanager
    def all_heads_active(self, net: nn.Module) -> Iterator[None]:
        """Within the block, ``net`` (in eval mode) runs every head, deep supervision included,
        so that a trace sees the heads' inputs."""
        yield


def strides_product(net: nn.Module, strides: Sequence[int | Sequence[int]]) -> list[int]:
    """Per spatial axis, the product of downsampling ``strides`` (each an int or one per axis;
    the axes are those of ``net``'s first convolution)."""
    ndim = next(m for m in net.modules() if isinstance(m, _ConvNd)).weight.dim() - 2
    per_axis = [list(s) if isinstance(s, (list, tuple)) else [int(s)] * ndim for s in strides]
    return [math.prod(int(s[d]) for s in per_axis) for d in range(ndim)]


def under(name: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
