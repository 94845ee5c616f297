"""LOBSTER and SeReNe as fine-tune regularisers (Tartaglione, HDR 2024, §2.2.2.1, §2.3;
SPEC §8): the update rules, SeReNe's channel sensitivity and the threshold search bounded by a
validation-loss tolerance. Pure functions on tensors; ``medslim.finetune.sparsify`` applies
them to a network.

Readings of the source text:

- LOBSTER, eq. (2.12)–(2.13): ``θ ← θ − λΓ − g[η − sign(g)λΓ]`` with ``Γ = θ·Θ(1 − |g|)``.
  Since ``g·sign(g) = |g|`` this expands to ``θ − ηg − λθ·(1 − |g|)·Θ(1 − |g|)`` =
  ``θ − ηg − λθ·max(0, 1 − |g|)`` (SPEC §8): ``|g|`` is the raw loss gradient, not normalised.
  With Adam/SGD the ``ηg`` part is the optimizer's own step; the shrinkage is applied decoupled
  (as AdamW's weight decay), on ``θᵗ`` with the gradient ``gᵗ`` of the same step.
- SeReNe, eq. (2.3): ``S = (1/C)·Σ_k |∂y_k/∂p|`` for a neuron's post-synaptic potential ``p``.
  In a segmentation network a channel is a neuron replicated over voxels and every output
  voxel has ``K`` class outputs; we take ``y_k`` = the softmax probability of class ``k``
  summed over the output voxels of a patch (the exact per-output-voxel sum of |·| would take
  one backward pass per voxel; summing first is its lower bound, as (2.5) is for classes),
  and ``S_c`` = the mean of ``(1/K)·Σ_k |∂y_k/∂p_c(x)|`` over the positions ``x`` and patches.
  The update (2.8) shrinks every parameter of an insensitive channel by ``λθ·max(0, 1 − S)``.
- Thresholding (§2.2.2.1, Fig. 2.3): bisection on the threshold ``T`` (over the sorted
  scores, our choice: the text does not say how ``T`` is searched) so that the validation
  loss worsens by at most the relative tolerance TWT: ``L(T) ≤ L̂ + TWT·|L̂|`` (``|L̂|``
  because nnU-Net's DC+CE loss is negative), assuming ``L`` is monotone in ``T``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medslim.errors import MedslimError

REGULARIZERS = ("none", "lobster", "serene")


def insensitivity(sensitivity: Tensor) -> Tensor:
    """``max(0, 1 − S)``, elementwise (LOBSTER: ``S = |g|``; SeReNe: eq. 2.7)."""
    return (1.0 - sensitivity).clamp_min(0.0)


def lobster_update(theta: Tensor, grad: Tensor, lr: float, lam: float) -> Tensor:
    """One LOBSTER step with plain SGD, ``θ − ηg − λθ·max(0, 1 − |g|)`` (any shape; returns a new tensor)."""
    return theta - lr * grad - lam * theta * insensitivity(grad.abs())


@torch.no_grad()
def lobster_shrink_(params: Sequence[Tensor], lam: float) -> None:
    """In place, ``θ ← θ − λθ·max(0, 1 − |θ.grad|)`` for every tensor with a gradient: the
    regulariser part of ``lobster_update``, run just before the optimizer step."""
    for p in params:
        if p.grad is not None:
            p.sub_(lam * p * insensitivity(p.grad.abs()))


@torch.no_grad()
def channel_shrink_(slices: Sequence[tuple[Tensor, int]], insens: Tensor, lam: float) -> None:
    """In place, SeReNe's (2.8) regulariser on one group's channels: each ``(tensor, dim)``
    holds the ``C`` channels along ``dim``; ``insens`` ``[C]``."""
    for p, dim in slices:
        shape = [1] * p.dim()
        shape[dim] = -1
        p.sub_(lam * p * insens.to(p).reshape(shape))


def channel_sensitivity(model: nn.Module, layers: Sequence[str], batch: Tensor) -> dict[str, Tensor]:
    """SeReNe's sensitivity of each output channel of ``layers`` (module outputs = post-synaptic
    potentials), read as in the module docstring.

    Args:
        model: the network; run in eval mode (restored after); weights get no gradient.
        layers: module names whose output ``[B, C, *spatial]`` holds the channels.
        batch: input ``[B, C_in, *spatial]``; patches run one at a time.
    Returns:
        ``name -> [C]`` float32, ``S_c ≥ 0``.
    Raises:
        MedslimError: a layer whose module runs other than once per forward pass.
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured[name].append(out))
               for name in layers]
    sums: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(batch.shape[0]):
            for c in captured.values():
                c.clear()
            with torch.enable_grad():
                out = model(batch[i:i + 1].to(device, torch.float32))
                out = out[0] if isinstance(out, (list, tuple)) else out  # full resolution of deep supervision
                bad = next((n for n, c in captured.items() if len(c) != 1), None)
                if bad is not None:
                    raise MedslimError(f"'{bad}' runs {len(captured[bad])} times per forward pass; "
                                       "SeReNe's sensitivity needs exactly one")
                taps = [captured[name][0] for name in layers]
                probs = F.softmax(out.float(), dim=1)
                k = probs.shape[1]
                for cls in range(k):
                    grads = torch.autograd.grad(probs[:, cls].sum(), taps, retain_graph=cls < k - 1, allow_unused=True)
                    for name, tap, g in zip(layers, taps, grads):
                        g = torch.zeros_like(tap) if g is None else g
                        per_channel = g.abs().movedim(1, 0).reshape(g.shape[1], -1).mean(1, dtype=torch.float64)
                        sums[name] = sums.get(name, 0) + per_channel.detach().cpu() / k
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: (sums[name] / batch.shape[0]).float() for name in layers}


@dataclass(frozen=True)
class ThresholdResult:
    """Outcome of ``threshold_search``: prune scores below ``threshold``; ``loss`` is the
    validation loss there, ``base_loss`` before any pruning, ``evaluations`` loss calls made."""

    threshold: float
    loss: float
    base_loss: float
    budget: float
    evaluations: int


def threshold_search(scores: Tensor, loss_at: Callable[[float], float], tolerance: float) -> ThresholdResult:
    """The largest threshold ``T`` among ``scores``' distinct values whose validation loss stays
    within ``L(T) ≤ L̂ + tolerance·|L̂|``, ``L̂ = L(0)``, by bisection on the sorted values.

    Bisecting on ranks, not on ``[0, max]`` at a fixed resolution, matters: after a few uniform
    shrinkage steps the scores cluster within far less than any fixed resolution, and a
    continuous bisection then jumps from zeroing nothing to zeroing almost everything.

    Args:
        scores: every candidate score, any shape; ``T = max`` (all but the largest zeroed) is
            taken to be over budget and never tried.
        loss_at: validation loss with every score ``< T`` zeroed (the caller restores the weights).
        tolerance: TWT ``≥ 0``.
    Returns:
        ``threshold`` 0.0 when nothing fits the budget; ``evaluations`` ≈ ``1 + log2(#distinct)``.
    """
    if tolerance < 0:
        raise MedslimError(f"the threshold tolerance must be >= 0, got {tolerance}")
    values = torch.unique(scores.detach().flatten().double().cpu())  # sorted ascending
    base = float(loss_at(0.0))
    budget = base + tolerance * abs(base)
    lo, hi, loss_lo, evaluations = 0, values.numel() - 1, base, 1  # values[lo] fits; values[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        loss = float(loss_at(float(values[mid])))
        evaluations += 1
        if loss <= budget:
            lo, loss_lo = mid, loss
        else:
            hi = mid
    threshold = float(values[lo]) if lo > 0 else 0.0
    return ThresholdResult(threshold=threshold, loss=loss_lo, base_loss=base, budget=budget, evaluations=evaluations)


def plateaued(losses: Sequence[float], patience: int, min_delta: float = 1e-3) -> bool:
    """Whether the last ``patience`` epoch losses did not improve on the best before them by more
    than ``min_delta·|best|`` (False while fewer than ``patience + 1`` losses exist)."""
    if len(losses) <= patience:
        return False
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) > best_before - min_delta * abs(best_before)


def group_sensitivity(sens: Mapping[str, Tensor], members: Sequence[str]) -> Tensor:
    """A coupled group's channel sensitivity: the largest of its members' (``[C]``); a channel is
    insensitive only where it is at every member."""
    return torch.stack([sens[m] for m in members]).amax(0)
