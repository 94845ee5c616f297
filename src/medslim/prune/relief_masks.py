"""NN-Relief in the paper's own mode (Dekhovich et al. 2024, Algorithms 1–2): unstructured keep
masks on the connections of a classifier's Linear layers and the kernels of its convolutions,
applied with ``torch.nn.utils.prune`` so that they persist through retraining; iterate
prune → retrain. For physical channel removal use the ``relief`` criterion with ``alpha``."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import prune as torch_prune

from medslim.score.relief import Norm, alpha_mask, layer_scores

Masks = dict[str, tuple[Tensor, Tensor | None]]  # name -> (weight mask like weight, bias mask [O] or None)


def relief_masks(model: nn.Module, batch: Tensor, alpha_fc: float = 0.95, alpha_conv: float = 0.9,
                 names: Sequence[str] | None = None, norm: Norm = "fro") -> Masks:
    """One pruning pass: per output unit of each Linear (``alpha_fc``) and convolution
    (``alpha_conv``; whole kernels ``K_oc``) keep the fewest incoming connections and bias whose
    scores (Eq. 1–3 over ``batch`` ``[N, …]``) reach α (``alpha_mask``). Paper defaults for
    LeNet-5 (α_conv 0.9, α_fc 0.95). Masks are float 0/1 of the weight's shape and ``[O]``.
    Already masked connections score 0 and stay out."""
    modules = dict(model.named_modules())
    masks: Masks = {}
    for name, s in layer_scores(model, batch, norm, names).items():
        m = modules[name]
        alpha = alpha_fc if isinstance(m, nn.Linear) else alpha_conv
        keep, keep_bias = alpha_mask(s.weights, alpha, s.bias if m.bias is not None else None)
        w = keep.float()  # [O, C]
        if isinstance(m, _ConvTransposeNd):
            w = w.T
        w = w.reshape(*w.shape, *[1] * (m.weight.dim() - 2)).expand_as(m.weight).contiguous()
        masks[name] = (w, None if keep_bias is None else keep_bias.float())
    return masks


def drop_dead_units(chain: Sequence[str], masks: Masks) -> Masks:
    """For a chain of Linear layers (each feeding the next), also mask the incoming weights and
    bias of units none of whose outgoing connections survive (the authors' backward pass):
    they no longer reach the output. Walks from the output back. Returns new masks."""
    out = {name: (w.clone(), None if b is None else b.clone()) for name, (w, b) in masks.items()}
    for upstream, downstream in zip(chain[-2::-1], chain[:0:-1]):
        dead = out[downstream][0].sum(0) == 0  # [C_in of downstream] = units of upstream
        w, b = out[upstream]
        w[dead] = 0
        if b is not None:
            b[dead] = 0
    return out


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Apply ``masks`` in place with ``torch.nn.utils.prune.custom_from_mask`` (combined with
    earlier masks by product). Returns ``model``."""
    modules = dict(model.named_modules())
    for name, (w, b) in masks.items():
        torch_prune.custom_from_mask(modules[name], "weight", w.to(modules[name].weight.device))
        if b is not None:
            torch_prune.custom_from_mask(modules[name], "bias", b.to(modules[name].bias.device))
    return model


def kept_fraction(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) weights and biases over every Linear and convolution."""
    kept = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, _ConvNd)):
            for p in (m.weight, m.bias):
                if p is not None:
                    kept += int((p != 0).sum())
                    total += p.numel()
    return kept, total


def iterative_relief(model: nn.Module, batch: Tensor, retrain: Callable[[nn.Module], None], iterations: int,
                     alpha_fc: float = 0.95, alpha_conv: float = 0.9, chain: Sequence[str] = (),
                     on_iteration: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """``iterations`` × (prune one pass on ``batch`` → ``drop_dead_units`` along ``chain`` →
    ``retrain(model)``), in place; ``on_iteration(i, model)`` after each pruning (before retrain)."""
    for i in range(iterations):
        masks = relief_masks(model, batch, alpha_fc, alpha_conv)
        apply_masks(model, drop_dead_units(chain, masks) if chain else masks)
        if on_iteration is not None:
            on_iteration(i, model)
        retrain(model)
    return model
