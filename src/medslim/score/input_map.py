"""HVS importance of the input pixels (thesis §4.5.3.1, Fig. 4.4).

The HVS recursion (SPEC §2) run on the ``spatial`` engine all the way to the network input.
The map is weight-only: it depends on the network and the input *size*, not on an image, so it
is the same for every image of that size (the thesis overlays it on images).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from medslim.errors import MedslimError
from medslim.score.propagate import propagate
from medslim.score.registry import ScoreContext

MAP_REDUCTIONS = ("sum", "mean", "none")


def hvs_input_map(model: nn.Module, input_shape: Sequence[int], *, channels: str = "sum",
                  rule: str = "hvs", seed_classes: Sequence[int] | None = None,
                  head: str | None = None) -> Tensor:
    """Score of every input pixel: ``[H, W]`` (``[*spatial]`` in general) or ``[C, H, W]``.

    Args:
        model: classifier or segmentation network (not modified).
        input_shape: ``(B, C, *spatial)``; the batch is summed out.
        channels: ``"sum"`` over input channels (with rule ``hvs`` the map's total then equals
            the number of seeded outputs: B × seeded classes for a classifier), ``"mean"``, or
            ``"none"`` (keep ``[C, *spatial]``).
        rule: ``"hvs"`` or ``"nisp"``.
        seed_classes: logits seeded with δ = 1 (``None`` = all).
        head: output layer (``None`` = found automatically).
    Returns:
        float32 tensor on the CPU.
    Raises:
        MedslimError: bad ``channels``/``rule``, or a network the engine cannot linearise.
    """
    if channels not in MAP_REDUCTIONS:
        raise MedslimError(f"channels must be one of {', '.join(MAP_REDUCTIONS)}, got '{channels}'")
    if rule not in ("hvs", "nisp"):
        raise MedslimError(f"input maps support rule 'hvs' or 'nisp', got '{rule}'")
    ctx = ScoreContext(input_shape=tuple(input_shape), engine="spatial", reduce="sum",
                       seed_classes=tuple(seed_classes) if seed_classes is not None else None,
                       head=head, normalize=False)
    p = propagate(model, ctx, rule=rule)  # type: ignore[arg-type]
    scores = p.input_scores.sum(0)  # [C, *spatial]
    if channels == "sum":
        scores = scores.sum(0)
    elif channels == "mean":
        scores = scores.mean(0)
    return scores.float().cpu()
