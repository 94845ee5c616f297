"""Which channels survive: per-layer top-k (SPEC §2 'Selection')."""
from __future__ import annotations

import math

import torch


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
    c = scores.numel()
    k = max(1, math.ceil(round((1.0 - ratio) * c, 9)))
    order = torch.sort(-scores.detach().double().cpu(), stable=True).indices
    return torch.sort(order[:k]).values
