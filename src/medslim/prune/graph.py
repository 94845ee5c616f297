"""Torch-Pruning dependency graph on nnU-Net networks.

Torch-Pruning 1.6.1 fails to build the graph of a ``PlainConvUNet`` (``TypeError`` in the
concat index mapping) while its LeakyReLUs are in-place, nnU-Net's default. ``inplace=False``
is numerically identical, so the graph is always built with in-place activations switched
off; the pruned network keeps them off.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn


def disable_inplace(net: nn.Module) -> None:
    """Set ``inplace=False`` on every activation that has the flag (in place on ``net``)."""
    for m in net.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False


def example_input(net: nn.Module, input_channels: int, ndim: int = 3,
                  patch_size: Sequence[int] | None = None) -> torch.Tensor:
    """A small input the network accepts: every spatial size = 2 x the product of the encoder
    strides, so the bottleneck keeps 2 voxels per axis (InstanceNorm rejects a single voxel).
    The graph only needs shapes, and a TotalSegmentator-sized patch would cost seconds."""
    strides = getattr(getattr(net, "encoder", None), "strides", None)
    if strides is None:
        size = list(patch_size) if patch_size is not None else [16] * ndim
    else:
        size = [2 * math.prod(int(_as_list(s, ndim)[d]) for s in strides) for d in range(ndim)]
    param = next(net.parameters())
    return torch.zeros(1, input_channels, *size, dtype=param.dtype, device=param.device)


def _residual_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``BasicBlockD``/``BottleneckD.forward`` with an out-of-place residual addition."""
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    out = x
    for conv in convs:
        out = conv(out)
    if block.apply_stochastic_depth:
        out = block.drop_path(out)
    if block.apply_se:
        out = block.squeeze_excitation(out)
    out = out + block.skip(x)
    return (block.nonlin3 if hasattr(block, "conv3") else block.nonlin2)(out)


@contextlib.contextmanager
def _out_of_place_residuals(net: nn.Module) -> Iterator[None]:
    """ResEnc blocks add the skip in place (``out += residual``); the tracer then loses the
    InstanceNorm before the addition and leaves it unpruned. Trace an out-of-place twin."""
    patched = [m for m in net.modules()
               if type(m).__name__ in ("BasicBlockD", "BottleneckD") and hasattr(m, "skip")]
    for m in patched:
        m.forward = types.MethodType(_residual_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def build_graph(net: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Dependency graph of ``net`` (eval mode, in-place activations off)."""
    disable_inplace(net)
    was_training = net.training
    net.eval()
    # Trace with deep supervision on, so the auxiliary heads' inputs follow pruned channels
    # (they are unused, hence invisible to the tracer, when it is off).
    decoder = getattr(net, "decoder", None)
    deep_supervision = getattr(decoder, "deep_supervision", None)
    if deep_supervision is not None:
        decoder.deep_supervision = True
    try:
        # tracing needs autograd, also when nnU-Net builds the network under no_grad/inference_mode
        with torch.inference_mode(False), torch.enable_grad(), _out_of_place_residuals(net):
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example.clone())
    finally:
        if deep_supervision is not None:
            decoder.deep_supervision = deep_supervision
        net.train(was_training)
    return graph


def _as_list(s, ndim: int) -> list[int]:
    return list(s) if isinstance(s, (list, tuple)) else [int(s)] * ndim
