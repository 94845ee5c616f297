"""HVS (Heuristic for Variable Selection, Yacoub & Bennani; thesis §4.3, §5.3.0.2) and its
relatives NISP and data-aware HVS, on the shared backward engine (``propagate``)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.cp import CPDConv
from medslim.errors import MedslimError
from medslim.score.propagate import propagate
from medslim.score.registry import ScoreContext, finish, register_criterion


@register_criterion("hvs")
def hvs(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """HVS channel scores: ``S_in = Pᵀ S_out``, ``P = diag(|A|·1)⁻¹ |A|``, seeded δ = 1 on
    every voxel × (seeded) class of the head; channel score = RMS (or mean/sum) over voxels of
    the score of the layer's output tensor ``[B, C, *spatial]`` → ``[C]``."""
    return finish(propagate(model, ctx, outputs_of=layers, rule="hvs").outputs, ctx)


@register_criterion("nisp")
def nisp(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """NISP (Yu et al. 2018): the HVS recursion without fan-in normalisation,
    ``S_in = |A|ᵀ S_out``."""
    return finish(propagate(model, ctx, outputs_of=layers, rule="nisp").outputs, ctx)


@register_criterion("hvs_data", needs_calibration=True)
def hvs_data(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """Data-aware HVS (SPEC §2): ``π_ij = E|w_ij h_j| / Σ_k E|w_ik h_k|``, with ``E|h_c|`` the
    mean absolute input activation of each convolution/Linear over ``ctx.calibration``
    ``[B, C, *spatial]``. The expectation is taken per channel (position independent), so only
    the channel engine is offered.

    Raises:
        MedslimError: no calibration batch, or ``engine="spatial"``.
    """
    if ctx.calibration is None:
        raise MedslimError("hvs_data needs calibration patches (ScoreContext.calibration)")
    if ctx.engine != "channel":
        raise MedslimError("hvs_data supports engine='channel' only (per-channel activation means)")
    scale = input_magnitudes(model, ctx.calibration)
    return finish(propagate(model, ctx, outputs_of=layers, rule="hvs", input_scale=scale).outputs, ctx)


def input_magnitudes(model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
    """``{name: E|h_c|}`` (``[C_in]``) at the input of every convolution, CP block and Linear, over ``batch``
    (eval mode, on a copy so that BatchNorm statistics stay untouched)."""
    net = copy.deepcopy(model).eval()
    sums: dict[str, Tensor] = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, (_ConvNd, CPDConv, nn.Linear)):
            dim = -1 if isinstance(m, nn.Linear) else 1

            def hook(mod, args, name=name, dim=dim):
                h = args[0].detach().abs().movedim(dim, 0)
                s = h.reshape(h.shape[0], -1).mean(1, dtype=torch.float64)
                sums[name] = sums.get(name, 0) + s
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            net(batch.to(next(net.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in sums.items()}
