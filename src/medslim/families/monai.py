"""MONAI's ``UNet``, ``SegResNet``, ``DynUNet`` and ``BasicUNet`` (``monai.networks.nets``).

Heads, per class: ``UNet`` — the convolutions of its top up-layer (``model.<last>``) that emit
``out_channels`` (the transposed conv and, with residual units, the last unit, whose identity
residual couples the two); ``SegResNet`` — ``conv_final``; ``DynUNet`` — ``output_block`` and
``deep_supervision_heads`` (its forward returns them only in training mode, so tracing sets
the top module's ``training`` flag alone, per call; the layers inside stay in eval mode); ``BasicUNet`` —
``final_conv``. The HVS seed is the network's own output. Input multiples: the product of the
strides (``UNet``, ``DynUNet``), ``2^(len(blocks_down) − 1)`` (``SegResNet``), 16
(``BasicUNet``'s four poolings).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from medslim.families.base import Family, strides_product, under

#: the classes this adapter knows, by ``type(net).__name__`` (checked with their module path)
CLASSES = ("UNet", "SegResNet", "DynUNet", "BasicUNet")


def _convs_under(net: nn.Module, prefixes: list[str]) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, _ConvNd) and under(n, prefixes)]


class MonaiFamily(Family):
    name = "monai"

    def matches(self, net: nn.Module) -> bool:
        cls = type(net)
        return cls.__module__.startswith("monai.networks.nets") and cls.__name__ in CLASSES

    def heads(self, net: nn.Module) -> list[str]:
        kind = type(net).__name__
        if kind == "UNet":
            top = f"model.{len(net.model) - 1}"
            return [n for n in _convs_under(net, [top]) if _out_channels(net, n) == net.out_channels]
        if kind == "SegResNet":
            return _convs_under(net, ["conv_final"])
        if kind == "DynUNet":
            return _convs_under(net, ["output_block", "deep_supervision_heads"])
        return _convs_under(net, ["final_conv"])

    def output_module(self, net: nn.Module) -> str:
        return ""

    def input_multiple(self, net: nn.Module) -> list[int] | int:
        kind = type(net).__name__
        if kind in ("UNet", "DynUNet"):
            return strides_product(net, net.strides)
        if kind == "SegResNet":
            return 2 ** (len(net.blocks_down) - 1)
        return 16

    @contextlib.contextmanager
    def all_heads_active(self, net: nn.Module) -> Iterator[None]:
        if type(net).__name__ != "DynUNet" or not net.deep_supervision:
            yield
            return

        def forward(x):  # tracers call eval(): set the flag per call, on the top module only
            before = net.training
            net.training = True
            try:
                return type(net).forward(net, x)
            finally:
                net.training = before

        net.forward = forward
        try:
            yield
        finally:
            del net.forward
            release_heads(net)


def release_heads(net: nn.Module) -> None:
    """Detach the tensors DynUNet keeps in ``heads`` (its skip layers write the deep-supervision
    outputs there on every forward pass): after a pass with autograd on they hold the graph,
    and ``copy.deepcopy`` of the network fails."""
    heads = getattr(net, "heads", None)
    if type(net).__name__ == "DynUNet" and isinstance(heads, list):
        heads[:] = [h.detach() if isinstance(h, torch.Tensor) else h for h in heads]


def _out_channels(net: nn.Module, name: str) -> int:
    return dict(net.named_modules())[name].out_channels
