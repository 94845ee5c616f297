"""Smaller ranks for an existing ``TuckerConv`` (one stage of iterative compression).

The core ``G`` (``[R_out, R_in, k…]``; transposed ``[R_in, R_out, k…]``) is itself Tucker-2
decomposed to the new ranks, ``G ≈ G' ×_out V_out ×_in V_in``, and the factors are merged into
the neighbouring 1×1 projections (two 1×1 convolutions in a row are one):
``reduce' = V_inᵀ · reduce`` and ``restore' = restore · V_out``. The layer keeps its
structure (``reduce → core → restore``), so the compression spec only records the new ranks.
"""
from __future__ import annotations

import copy

import torch

from medslim.decompose.tucker import TuckerConv, tucker2_factors
from medslim.errors import MedslimError


def shrink_tucker(module: TuckerConv, rank_in: int | None, rank_out: int | None) -> TuckerConv:
    """A copy of ``module`` with ranks ``(rank_in, rank_out)`` ≤ its current ranks.

    A ``None`` rank keeps that mode as it is (a mode without projection stays without).
    Input ``[B, C_in, *S]`` → output ``[B, C_out, *S']`` as before.

    Raises:
        MedslimError: a rank above the current one, or for a mode that has no projection.
    """
    current = dict(zip(("in", "out"), module.ranks))
    wanted = {"in": rank_in, "out": rank_out}
    for m, r in wanted.items():
        if r is None:
            continue
        if current[m] is None:
            raise MedslimError(f"the {m}put mode of this TuckerConv is not decomposed; it has no rank to shrink")
        if not 1 <= r <= current[m]:
            raise MedslimError(f"rank_{m} {r} is outside [1, {current[m]}] (the current rank)")
    ranks = {m: (wanted[m] if wanted[m] is not None and wanted[m] < current[m] else None) for m in wanted}
    new = copy.deepcopy(module)
    if ranks["in"] is None and ranks["out"] is None:
        return new
    core = module.core
    f = tucker2_factors(core.weight, ranks["in"], ranks["out"], transposed=bool(core.transposed))
    r_in = ranks["in"] or core.in_channels
    r_out = ranks["out"] or core.out_channels
    core_kw = dict(stride=core.stride, padding=core.padding, dilation=core.dilation, padding_mode=core.padding_mode,
                   bias=core.bias is not None, device=core.weight.device, dtype=core.weight.dtype)
    if core.transposed:
        core_kw["output_padding"] = core.output_padding
    new.core = type(core)(r_in, r_out, core.kernel_size, **core_kw)
    with torch.no_grad():
        new.core.weight.copy_(f.core)
        if core.bias is not None:  # only without ``restore``, so the out-mode is never shrunk here
            new.core.bias.copy_(core.bias)
        if f.u_in is not None:
            w = module.reduce.weight  # [R_in, C_in, 1…]
            merged = f.u_in.T @ w.reshape(w.shape[0], -1)  # [r_in, C_in]
            new.reduce = _pointwise_like(module.reduce, merged.shape[1], merged.shape[0], bias=False)
            new.reduce.weight.copy_(merged.reshape(*merged.shape, *w.shape[2:]))
        if f.u_out is not None:
            w = module.restore.weight  # [C_out, R_out, 1…]
            merged = w.reshape(w.shape[0], -1) @ f.u_out  # [C_out, r_out]
            new.restore = _pointwise_like(module.restore, merged.shape[1], merged.shape[0],
                                          bias=module.restore.bias is not None)
            new.restore.weight.copy_(merged.reshape(*merged.shape, *w.shape[2:]))
            if module.restore.bias is not None:
                new.restore.bias.copy_(module.restore.bias)
    return new


def _pointwise_like(conv: torch.nn.Module, c_in: int, c_out: int, bias: bool) -> torch.nn.Module:
    return type(conv)(c_in, c_out, 1, bias=bias, device=conv.weight.device, dtype=conv.weight.dtype)
