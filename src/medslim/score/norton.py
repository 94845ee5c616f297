"""NORTON filter importance (Pham et al. 2024, §III-C, Algorithm 1): weight-only.

Each filter ``W_o [C_in, k_1, …, k_n]`` is CP-decomposed at rank ``ctx.cp_rank``
(``cp_filter_factors``; a ``CPDConv`` candidate uses its own factors). Two filters are
compared mode by mode through the subspaces their factor matrices span, and the distances
are averaged over the ``1 + n`` modes with equal weights (the paper's α = β = γ = 1/3 in 2D).
Algorithm 1 then removes, again and again, one filter of the closest pair (the one whose
distances to the remaining filters sum lower: it resembles the rest most). The score of a
filter is its position in that removal order, so keeping the top ``O'`` scores keeps exactly
the filters Algorithm 1 keeps for ``O'``, whatever ``O'``.

Readings (SPEC §8; write-down required):

- Distance between the subspaces of ``A_i, A_j ∈ R^{I×R}`` = normalised *chordal* distance
  ``sqrt(Σ_k sin²θ_k / m)`` over the ``m = min(dim, dim')`` principal angles (in [0, 1]), not
  the paper's smallest angle (eq. 3), which is 0 whenever ``2R > I`` — always for 3-tap
  spatial factors at ``R ≥ 2``. For ``R ≥ k_d`` a spatial subspace is generically all of
  ``R^{k_d}``, so that mode adds the same 0 to every pair and only the channel mode ranks.
- Ties in Algorithm 1's line 4 (equal row sums, e.g. always for the last two filters) go to
  the filter whose distances to *all* filters sum lower, then to the lower index.
- A candidate that is a Tucker block's output (``restore``, or ``core`` without one) is
  scored on the block's effective filters ``U_out · G ·_in U_in`` (``[C_out, C_in, k…]``);
  other candidates on their own weight (a transposed conv's output filter is ``W[:, o]``).
- With ``selection="global"`` the scores are removal ranks ``t/O`` (L2-normalised per
  layer), so wide layers lose more, as for every other criterion.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.cp import CPDConv, cp_filter_factors
from medslim.decompose.tucker import TuckerConv
from medslim.errors import MedslimError
from medslim.score.registry import ScoreContext, finish, register_criterion, resolve_layers

_TIE = 1e-12  # relative: row sums closer than this are a tie


def subspace_distance(factors: Tensor) -> Tensor:
    """Pairwise normalised chordal distance ``[O, O]`` (float64, in [0, 1]) between the column
    spaces of ``factors`` ``[O, I, R]``: ``sqrt((m − ‖Q_iᵀQ_j‖_F²) / m)`` with ``Q`` orthonormal
    bases and ``m`` the smaller of the two dimensions (``‖Q_iᵀQ_j‖²`` = Σ cos² of the angles).
    Invariant to scaling and permuting columns (CP's ambiguities). A zero factor is at
    distance 0 from everything."""
    f = factors.detach().double()
    u, s, _ = torch.linalg.svd(f, full_matrices=False)  # u [O, I, m]
    keep = s > s[:, :1] * 1e-8
    q = u * keep[:, None, :]
    o, _, m = q.shape
    flat = q.transpose(1, 2).reshape(o * m, -1)
    overlap = (flat @ flat.T).reshape(o, m, o, m).square().sum((1, 3))
    dim = keep.sum(1).double()
    pair = torch.minimum(dim[:, None], dim[None, :])
    d = ((pair - overlap).clamp_min(0) / pair.clamp_min(1)).sqrt()
    return torch.where(pair > 0, d, torch.zeros_like(d)).fill_diagonal_(0)


def norton_distance(channel: Tensor, spatial: Sequence[Tensor]) -> Tensor:
    """Eq. 14 with equal weights: mean over the modes (channel ``[O, C_in, R]``, each spatial
    ``[O, k_d, R]``) of ``subspace_distance``: ``[O, O]``."""
    modes = [channel, *spatial]
    return sum(subspace_distance(f) for f in modes) / len(modes)


def removal_order(distance: Tensor) -> list[int]:
    """Algorithm 1 run to the end on ``distance`` ``[O, O]`` (symmetric): the order in which
    filters are removed, the last survivor last (ties: see the module docstring)."""
    d = distance.detach().double().clone()
    n = d.shape[0]
    full = d.sum(1)
    alive = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    for _ in range(n - 1):
        pairs = upper & alive[:, None] & alive[None, :]
        flat = torch.where(pairs, d, torch.full_like(d, float("inf"))).flatten().argmin()
        i, j = divmod(int(flat), n)
        si, sj = float(d[i, alive].sum()), float(d[j, alive].sum())
        scale = max(abs(si), abs(sj), 1e-300)
        if abs(si - sj) > _TIE * scale:
            drop = i if si < sj else j
        else:
            drop = i if float(full[i]) <= float(full[j]) else j
        order.append(drop)
        alive[drop] = False
    order.extend(int(k) for k in torch.nonzero(alive).flatten())
    return order


def norton_scores(channel: Tensor, spatial: Sequence[Tensor]) -> Tensor:
    """``[O]`` scores in ``(0, 1]``: ``(t + 1) / O`` for the filter Algorithm 1 removes at step ``t``."""
    order = removal_order(norton_distance(channel, spatial))
    scores = torch.empty(len(order), dtype=torch.float64)
    scores[torch.tensor(order)] = torch.arange(1, len(order) + 1, dtype=torch.float64) / len(order)
    return scores


def candidate_filters(modules: dict[str, nn.Module], name: str) -> Tensor:
    """Output filters ``[C_out, C_in, k…]`` of candidate ``name`` (see the module docstring).

    Raises:
        MedslimError: not a convolution, or a grouped one.
    """
    m = modules[name]
    parent = modules.get(name.rpartition(".")[0])
    if isinstance(parent, TuckerConv) and m is (parent.restore if "restore" in parent._modules else parent.core):
        return tucker_filters(parent)
    if not isinstance(m, _ConvNd) or m.groups != 1:
        raise MedslimError(f"the norton criterion scores ungrouped convolutions; `{name}` is a {type(m).__name__}"
                           f"{'' if not isinstance(m, _ConvNd) else f' with groups={m.groups}'}")
    w = m.weight.detach()
    return w.transpose(0, 1) if m.transposed else w


def tucker_filters(t: TuckerConv) -> Tensor:
    """Effective filters ``[C_out, C_in, k…]`` of a Tucker block (``restore ∘ core ∘ reduce``)."""
    w = t.core.weight.detach()
    w = w.transpose(0, 1) if t.transposed else w  # [R_out, R_in, k…]
    if "restore" in t._modules:
        w = torch.tensordot(t.restore.weight.detach().flatten(1), w, dims=([1], [0]))
    if "reduce" in t._modules:
        w = torch.tensordot(w, t.reduce.weight.detach().flatten(1), dims=([1], [0])).movedim(-1, 1)
    return w


@register_criterion("norton")
def norton(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """NORTON's subspace-distance redundancy (module docstring): a filter whose CP factors
    span subspaces close to another filter's scores low. CP blocks use their own factors;
    other layers are decomposed at ``ctx.cp_rank``."""
    modules = dict(model.named_modules())
    out = {}
    for name, m in resolve_layers(model, layers).items():
        if isinstance(m, CPDConv):
            channel, spatial = m.factors()
        else:
            f = cp_filter_factors(candidate_filters(modules, name), ctx.cp_rank)
            channel, spatial = f.channel, f.spatial
        out[name] = norton_scores(channel, spatial)
    return finish(out, ctx)
