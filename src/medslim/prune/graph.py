"""Torch-Pruning dependency graph on nnU-Net, MONAI and classifier networks.

Torch-Pruning 1.6.1 fails to build the graph of a ``PlainConvUNet`` (``TypeError`` in the
concat index mapping) while its LeakyReLUs are in-place, nnU-Net's default. ``inplace=False``
is numerically identical, so the graph is always built with in-place activations switched
off; the pruned network keeps them off.

The tracer maps a module to the autograd node of the tensor it returned. An in-place operation
on a returned *view* replaces that node (``CopySlices``), and the module drops out of the graph:
ResEnc's ``out += residual`` right after an InstanceNorm (whose output is a view) left the norm
unpruned. So while tracing, a module output that is a view is returned as a copy. This covers
every residual addition written in place, whatever the block class, without patching blocks.

A ``PReLU`` with one shared slope (MONAI's default activation) reaches autograd with its weight
reshaped, and the tracer counts that reshape as a second input without channels; the concat
index mapping then fails on ``None`` channels. While tracing, such a PReLU runs as a ReLU (one
input; the graph needs only shapes); it has no per-channel parameters to prune.

GroupNorms lose whole groups only (``medslim.prune.groupnorm``). NORTON's CP blocks (``CPDConv``) are graph leaves with their own pruning function
(``medslim.prune.cp_pruner``), registered through Torch-Pruning's ``customized_pruners``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.cp import CPDConv
from medslim.errors import MedslimError
from medslim.families import family_of
from medslim.prune.cp_pruner import CPDConvPruner, opaque_cp_blocks
from medslim.prune.groupnorm import WholeGroupNormPruner

#: Torch-Pruning handlers medslim replaces or adds (``customized_pruners``)
CUSTOM_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {CPDConv: CPDConvPruner(),
                                                        nn.GroupNorm: WholeGroupNormPruner()}


def disable_inplace(net: nn.Module) -> None:
    """Set ``inplace=False`` on every activation that has the flag (in place on ``net``)."""
    for m in net.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False


def spatial_dims(net: nn.Module) -> int:
    """Spatial axes the network convolves over (2 for a ``2d`` nnU-Net configuration, 3 for
    ``3d_fullres``), read from its first convolution's weight ``[C_out, C_in, *kernel]``.

    Raises:
        MedslimError: ``net`` has no convolution.
    """
    conv = next((m for m in net.modules() if isinstance(m, _ConvNd)), None)
    if conv is None:
        raise MedslimError(f"{type(net).__name__} has no convolution; medslim compresses convolutional U-Nets")
    return conv.weight.dim() - 2


def example_input(net: nn.Module, input_channels: int, patch_size: Sequence[int] | None = None) -> torch.Tensor:
    """A small input the network accepts, ``[1, input_channels, *size]`` with
    ``spatial_dims(net)`` sizes (2D or 3D): every size = 2 x the input multiple of its family
    (the product of the downsampling strides), so the bottleneck keeps 2 voxels per axis
    (InstanceNorm rejects a single voxel). The graph only needs shapes, and a
    TotalSegmentator-sized patch would cost seconds. ``patch_size``: the sizes of a network
    whose family does not give its input multiple."""
    ndim = spatial_dims(net)
    multiple = family_of(net).input_multiple(net)
    if multiple is None:
        size = list(patch_size) if patch_size is not None else [16] * ndim
    else:
        size = [2 * int(m) for m in _as_list(multiple, ndim)]
    param = next(net.parameters())
    return torch.zeros(1, input_channels, *size, dtype=param.dtype, device=param.device)


def _copy_view(module: nn.Module, args: tuple, out: object) -> torch.Tensor | None:
    return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else None


@contextlib.contextmanager
def _view_outputs_copied(net: nn.Module) -> Iterator[None]:
    """Leaf modules of ``net`` return a copy instead of a view (see the module docstring);
    registered before the tracer's hooks, so the tracer sees the copy."""
    handles = [m.register_forward_hook(_copy_view) for m in net.modules() if next(m.children(), None) is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _shared_prelu_as_relu(net: nn.Module) -> Iterator[None]:
    """Single-slope PReLUs of ``net`` run as ReLUs within the block (see the module docstring)."""
    shared = [m for m in net.modules() if isinstance(m, nn.PReLU) and m.num_parameters == 1]
    for m in shared:
        m.forward = torch.relu
    try:
        yield
    finally:
        for m in shared:
            del m.forward


def build_graph(net: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Dependency graph of ``net`` (eval mode, in-place activations off; ``CPDConv`` blocks are
    leaves pruned by ``CPDConvPruner``)."""
    disable_inplace(net)
    was_training = net.training
    net.eval()
    try:
        # Every head runs (deep supervision on), so the auxiliary heads' inputs follow pruned
        # channels (unused heads are invisible to the tracer). Tracing needs autograd, also when
        # nnU-Net builds the network under no_grad/inference_mode.
        with family_of(net).all_heads_active(net), torch.inference_mode(False), torch.enable_grad(), \
                _view_outputs_copied(net), _shared_prelu_as_relu(net), opaque_cp_blocks(net):
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example.clone(),
                                                          customized_pruners=CUSTOM_PRUNERS)
    finally:
        net.train(was_training)
    return graph


def _as_list(s, ndim: int) -> list[int]:
    return list(s) if isinstance(s, (list, tuple)) else [int(s)] * ndim
