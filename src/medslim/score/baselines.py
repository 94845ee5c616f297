"""Baseline criteria on the same interface: filter norms, consumer-side L1, random."""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from medslim.decompose.cp import CPDConv, cp_weight
from medslim.errors import MedslimError
from medslim.score.propagate import propagate
from medslim.score.registry import ScoreContext, finish, register_criterion, resolve_layers


def producer(name: str, module: nn.Module) -> nn.Module:
    """The convolution/Linear computing ``module``'s output: itself (also a ``CPDConv``, whose
    filters are its CP reconstruction), or for a container (e.g. a ``TuckerConv``) its last
    such leaf (``restore``, else ``core``).

    Raises:
        MedslimError: the module contains no convolution or Linear.
    """
    if isinstance(module, CPDConv):
        return module
    found = [m for m in module.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    if not found:
        raise MedslimError(f"'{name}' ({type(module).__name__}) is not a convolution or Linear")
    return found[-1]


def filters(m: nn.Module) -> Tensor:
    """Output filters as rows ``[C_out, -1]``: conv ``W[o, c, k…]``, Linear ``W[o, f]``;
    transposed conv ``W[c, o/g, k…]`` (input channels first, per group); ``CPDConv``: the
    reconstructed ``Ŵ[o, c, k…] = Σ_r c_{o,c,r} Π_d a_{d,o,k_d,r}``."""
    if isinstance(m, CPDConv):
        return cp_weight(*m.factors()).reshape(m.out_channels, -1)
    w = m.weight.detach()
    if isinstance(m, _ConvTransposeNd):  # [g, C/g, O/g, k] → [g, O/g, C/g, k]
        w = w.reshape(m.groups, w.shape[0] // m.groups, w.shape[1], -1).transpose(1, 2)
    return w.reshape(_out_channels(m), -1)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _norms(layers: Sequence[str], model: nn.Module, p: int) -> dict[str, Tensor]:
    return {name: filters(producer(name, m)).norm(p=p, dim=1)
            for name, m in resolve_layers(model, layers).items()}


@register_criterion("l1")
def l1(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """‖W[o]‖₁ of each output filter of the producing convolution (Li et al. 2017)."""
    return finish(_norms(layers, model, 1), ctx)


@register_criterion("l2")
def l2(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """‖W[o]‖₂ of each output filter of the producing convolution."""
    return finish(_norms(layers, model, 2), ctx)


@register_criterion("consumer_l1")
def consumer_l1(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """Σ over every consumer convolution/Linear of the layer's output of ``‖W_next[:, c]‖₁``
    (through norms/activations/pooling, at its offset in decoder concatenations, across
    residual additions). Conv → InstanceNorm is scale invariant, so the consumer side is the
    meaningful magnitude (SPEC §3).

    Consumers are found by one step of the linearised backward pass (channel engine, whatever
    ``ctx.engine``): the same paths HVS sees, and no Torch-Pruning graph (whose concat index
    mapping fails on nnU-Net's in-place activations).
    """
    channel = dataclasses.replace(ctx, engine="channel", reduce="sum")
    return finish(propagate(model, channel, outputs_of=layers, rule="consumer").outputs, ctx)


@register_criterion("random")
def random(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """Uniform [0, 1) scores from ``ctx.seed`` and the layer name (independent of layer order)."""
    out = {}
    for name, m in resolve_layers(model, layers).items():
        gen = torch.Generator().manual_seed((ctx.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        out[name] = torch.rand(_out_channels(producer(name, m)), generator=gen)
    return finish(out, ctx)
