"""Which channels survive (SPEC §2 'Selection'): per-layer top-k, or a global ranking that
sets each group's count from all candidate channels at once."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from medslim.errors import MedslimError, did_you_mean

SELECTIONS = ("layer", "global")


def check_selection(selection: str) -> None:
    """``MedslimError`` (with a "did you mean") unless ``selection`` is one of ``SELECTIONS``."""
    if selection not in SELECTIONS:
        raise MedslimError(f"unknown --selection {selection!r}{did_you_mean(str(selection), SELECTIONS)}; choose "
                           "layer (top-k per layer) or global (one ranking of all candidate channels)")


def keep_count(channels: int, ratio: float) -> int:
    """``k = ceil((1 - ratio) · channels)``, at least one (``round`` first, so that e.g.
    ``(1 - 0.7) · 30 = 9.000000000000002`` does not become 10)."""
    return max(1, math.ceil(round((1.0 - ratio) * channels, 9)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest of ``scores`` ``[C]``, ascending (``[k]`` int64). Among
    equal scores the lower index wins (stable sort), which makes the choice reproducible."""
    order = torch.sort(-scores.detach().double().cpu(), stable=True).indices
    return torch.sort(order[:k]).values


def keep_top_k(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``k = ceil((1 - ratio) * C)`` highest scores (at least one), ascending.

    Top-k, not a threshold, so ties never change how many channels survive; among equal
    scores the lower index wins (stable sort), which makes the choice reproducible.

    Args:
        scores: ``[C]`` importance per channel, higher = keep.
        ratio: fraction to remove, in ``[0, 1)``.
    Returns:
        ``[k]`` sorted int64 indices.
    """
    return top_k(scores, keep_count(scores.numel(), ratio))


def global_keep_counts(group_scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, int]:
    """How many channels each group keeps when the channels of all groups are ranked together.

    Each group's scores (``[C_g]``; for coupled layers the sum of the members' scores) are
    L2-normalised, so every group carries the same score mass whatever its number of members
    (a no-op for a single layer: the criteria already L2-normalise each layer's scores, see
    ``finish`` in ``medslim.score.registry``). The ``N = Σ C_g`` candidate channels then keep
    ``K = max(G, ceil((1 - ratio) · N))`` (``G`` = number of groups): each group's best channel
    is reserved (at least one kept per group), the other ``K − G`` are the highest normalised
    scores of the concatenation (stable top-k: among equal scores the earlier group, then the
    lower index wins, so ties never change the count). So ``floor(ratio · N)`` channels go
    unless the one-per-group floor stops it. Per-layer selection removes
    ``Σ_g floor(ratio · C_g)``; this removes at least as many and fewer than ``G`` more.
    Keeping each group's top-``k_g`` (``top_k``) keeps exactly the channels ranked here.

    What the normalisation implies: a group's squared scores sum to 1, so a channel's typical
    score is ``≈ 1/√C_g``: wide layers have smaller per-channel scores and lose a larger
    fraction of their channels, narrow layers keep more (on the reference Hippocampus model at
    ratio 0.5 the 128-channel bottleneck convs keep one channel each).

    Args:
        group_scores: ``name -> [C_g]`` importance per channel (higher = keep), in network order.
        ratio: fraction of all candidate channels to remove, in ``[0, 1)``.
    Returns:
        ``name -> k_g`` with ``1 ≤ k_g ≤ C_g`` and ``Σ k_g = K``.
    """
    if not group_scores:
        return {}
    names = list(group_scores)
    ranked = []
    for n in names:
        s = group_scores[n].detach().double().cpu().reshape(-1)
        s = s / s.norm() if s.norm() > 0 else s.clone()
        s[top_k(s, 1)] = math.inf  # the group's best channel (lowest index among ties) above every other
        ranked.append(s)
    sizes = torch.tensor([len(s) for s in ranked])
    kept = top_k(torch.cat(ranked), max(len(names), keep_count(int(sizes.sum()), ratio)))
    group = torch.repeat_interleave(torch.arange(len(names)), sizes)
    counts = torch.bincount(group[kept], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}
