"""DPRP on a whole U-Net (Sharma et al. 2025; SPEC §8): factorise the eligible convs into
trained SVD factors, regularise them, cut ranks during training, and write the result as
``TuckerConv(rank_in=None, rank_out=r)`` layers + a compression spec. The per-layer maths is
in ``medslim.decompose.svd_param``; the trainer (``nnUNetTrainerMedslimDPRP``) only calls these.

Total loss (paper eq. 8 with ``L_str = μ_orth·L_orth + μ_sort·L_sort``):
``L = L_seg + w_orth·L_orth + w_sort·L_sort + w_comp·L_comp``, each ``L_·`` the mean over the
factorised layers. Paper values: ``w_orth = λ_str·μ_orth = 1000``, ``w_sort = 1``,
``w_comp = λ_comp ∈ [0.1, 1]``, ``ε ∈ [0.001, 0.1]`` (ResNets on CIFAR/ImageNet, from scratch).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medslim.decompose.apply import eligible_convs, module_parents, replace_module, tucker_params
from medslim.decompose.svd_param import (SVDConv, compression_loss, cut_rank, orthogonality_loss, ratio_rank,
                                         sorting_loss)
from medslim.errors import MedslimError
from medslim.spec import CompressionSpec, LayerRanks

GUARDS = ("params", "none")


def factorize(net: nn.Module) -> nn.Module:
    """Deep copy of ``net`` with each eligible conv (``eligible_convs``: not the segmentation
    heads, not 1×…×1 convs) replaced by its full-rank ``SVDConv``; same function as ``net``."""
    new = copy.deepcopy(net)
    parents = module_parents(new)
    for conv in eligible_convs(new).values():
        replace_module(parents, conv, SVDConv.from_conv(conv))
    return new


def svd_layers(net: nn.Module) -> dict[str, SVDConv]:
    """Every ``SVDConv`` of ``net`` by its first name (the name of the conv it replaced)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, SVDConv)}


@dataclass(frozen=True)
class DPRPWeights:
    """Loss weights and the cut threshold ε (see the module docstring)."""

    orth: float
    sort: float
    comp: float
    eps: float


def dprp_terms(net: nn.Module, eps: float) -> dict[str, Tensor]:
    """``{"orth", "sort", "comp"}``: each loss averaged over the ``SVDConv`` layers (0 if none)."""
    layers = list(svd_layers(net).values())
    if not layers:
        zero = torch.zeros(())
        return {"orth": zero, "sort": zero, "comp": zero}
    n = len(layers)
    return {"orth": sum(orthogonality_loss(m.u, m.v) for m in layers) / n,
            "sort": sum(sorting_loss(m.s) for m in layers) / n,
            "comp": sum(compression_loss(m.s, eps) for m in layers) / n}


class DPRPLoss(nn.Module):
    """``inner(*args)`` plus the weighted DPRP terms of ``net`` while gradients are enabled
    (training steps; nnU-Net validates under ``no_grad``, so its validation loss is ``inner``).
    ``last`` holds the float terms of the latest training step."""

    def __init__(self, inner: Callable[..., Tensor], net: nn.Module, weights: DPRPWeights) -> None:
        super().__init__()
        self.inner, self.weights = inner, weights
        self._net = [net]  # a list: not registered as a submodule
        self.last: dict[str, float] = {}

    def forward(self, *args, **kwargs) -> Tensor:
        loss = self.inner(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss
        terms = dprp_terms(self._net[0], self.weights.eps)
        self.last = {k: float(v) for k, v in terms.items()}
        w = self.weights
        return loss + w.orth * terms["orth"].to(loss) + w.sort * terms["sort"].to(loss) + w.comp * terms["comp"].to(loss)


def cut_network(net: nn.Module, eps: float) -> dict[str, tuple[int, int]]:
    """Cut every ``SVDConv`` of ``net`` in place to ``ratio_rank(s, eps)``; returns
    ``{name: (rank before, rank after)}`` of the layers that shrank."""
    parents = module_parents(net)
    cut: dict[str, tuple[int, int]] = {}
    for name, m in svd_layers(net).items():
        r = ratio_rank(m.s, eps)
        if r < m.rank:
            replace_module(parents, m, cut_rank(m, r))
            cut[name] = (m.rank, r)
    return cut


@dataclass(frozen=True)
class LayerResult:
    """One factorised conv at the end: full rank, final rank, and what it was written as."""

    full_rank: int
    rank: int
    params_dense: int
    params_after: int
    written_as: str  # "tucker" or "dense"


def finalize(net: nn.Module, full_ranks: dict[str, int], guard: str = "params",
             provenance: dict | None = None) -> tuple[nn.Module, CompressionSpec, dict[str, LayerResult]]:
    """Deep copy of ``net`` with each ``SVDConv`` written as ``TuckerConv(None, r)`` (recorded in
    the spec's ``ranks``), or, with ``guard="params"``, as the dense conv ``U diag(s) Vᵀ`` when
    the factored form is not smaller. Same function as ``net``.

    Raises:
        MedslimError: unknown ``guard``.
    """
    if guard not in GUARDS:
        raise MedslimError(f"unknown DPRP guard {guard!r}; choose one of {', '.join(GUARDS)}")
    new = copy.deepcopy(net)
    parents = module_parents(new)
    ranks: dict[str, LayerRanks] = {}
    results: dict[str, LayerResult] = {}
    for name, m in svd_layers(new).items():
        like = m._like()
        dense = sum(p.numel() for p in like.parameters())
        factored = tucker_params(like, LayerRanks(None, m.rank))
        as_tucker = guard == "none" or factored < dense
        replace_module(parents, m, m.to_tucker() if as_tucker else m.to_conv())
        if as_tucker:
            ranks[name] = LayerRanks(None, m.rank)
        results[name] = LayerResult(full_ranks.get(name, m.rank), m.rank, dense, factored if as_tucker else dense,
                                    "tucker" if as_tucker else "dense")
    spec = CompressionSpec(ranks=ranks, provenance={"method": "dprp", **(provenance or {})})
    return new, spec, results
