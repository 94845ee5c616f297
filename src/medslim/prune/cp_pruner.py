"""Torch-Pruning support for NORTON's CP blocks (``CPDConv``), through its extension hook:
a ``BasePruningFunc`` registered as a customized pruner for the class.

Torch-Pruning treats a customized layer as one graph node, but still traces the autograd ops
inside it; a ``CPDConv``'s channel-changing projection and its reshape-sum over the rank would
then read as element-wise and reshape nodes between the block's input and output.
``opaque_cp_blocks`` hides them while tracing: each block's output is re-attached to its input
by one autograd node, so the tracer sees a leaf (input → block → output), like a convolution.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from medslim.decompose.cp import CPDConv


class CPDConvPruner(tp.pruner.BasePruningFunc):
    """Removes filters (outputs) or input channels of a ``CPDConv``, in place.

    Output filter ``o`` owns the ``R`` channels ``o·R … o·R + R − 1`` of the projection's
    output (weight rows ``[C_out·R, C_in, 1…]``) and of every grouped axis conv (weight
    ``[C_out·R, 1, k_d…]``, ``groups = C_out·R``), and ``bias[o]``. Input channel ``c`` is the
    projection's weight column ``c``. No intra-layer coupling: outputs and inputs are
    independent, as for a convolution.
    """

    TARGET_MODULES = (CPDConv,)

    def prune_out_channels(self, layer: CPDConv, idxs: Sequence[int]) -> CPDConv:
        r = layer.rank
        rows = [o * r + t for o in sorted(set(int(i) for i in idxs)) for t in range(r)]
        tp.prune_conv_out_channels(layer.project, rows)
        for conv in layer.axes:
            tp.prune_depthwise_conv_out_channels(conv, rows)  # also in_channels and groups
        if layer.bias is not None:
            keep = sorted(set(range(layer.bias.numel())) - set(int(i) for i in idxs))
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    def prune_in_channels(self, layer: CPDConv, idxs: Sequence[int]) -> CPDConv:
        tp.prune_conv_in_channels(layer.project, list(idxs))
        return layer

    def get_out_channels(self, layer: CPDConv) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: CPDConv) -> int:
        return layer.in_channels


#: ``customized_pruners`` for ``tp.DependencyGraph.build_dependency``


class _Leaf(torch.autograd.Function):
    """``y`` (computed by the block, detached) as a function of the block input ``x`` and one of
    its weights: the single autograd node the tracer follows. Never differentiated."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight: Tensor) -> Tensor:  # noqa: D102
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:  # noqa: D102
        return None, None, None


def _as_leaf(module: CPDConv, args: tuple, out: Tensor) -> Tensor:
    # the weight gives the node an autograd parent even when x is the network input (the stem)
    return _Leaf.apply(args[0], out.detach(), module.project.weight)


@contextlib.contextmanager
def opaque_cp_blocks(net: nn.Module) -> Iterator[None]:
    """While active, every ``CPDConv`` of ``net`` is one autograd node from input to output
    (see the module docstring). Enter it before the tracer registers its own hooks, so they
    see the re-attached output."""
    handles = [m.register_forward_hook(_as_leaf) for m in net.modules() if isinstance(m, CPDConv)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
