"""Taylor channel importance (Molchanov et al. 2017, ICLR, "Pruning convolutional neural
networks for resource efficient inference"; SPEC §3): the first-order change of the loss when
a channel is removed, ``|mean(∂L/∂h_c · h_c)|`` over calibration data."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medslim.errors import MedslimError
from medslim.score.baselines import producer
from medslim.score.linearise import PASS_THROUGH
from medslim.score.registry import ScoreContext, finish, register_criterion, resolve_layers


@register_criterion("taylor", needs_calibration=True)
def taylor(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """``|mean over patches and voxels of ∂L/∂h_c · h_c|`` per output channel ``c`` of each layer,
    over ``ctx.calibration`` ``[B, C, *spatial]``.

    ``h``: what removing a channel takes from its consumers, the layer's output after the
    channel-wise modules that follow it in its ``nn.Sequential`` (``tap_module``; in nnU-Net's
    ``ConvDropoutNormReLU``: dropout, norm, nonlinearity); the producing conv's own output only
    where a conv follows directly (the ``rank`` site). Not the conv output before its norm: conv
    → InstanceNorm is scale invariant, so there ``Σ_voxels ∂L/∂h · h = 0`` for every channel
    (up to the norm's eps) and the score would be rounding noise.

    ``L``: voxel-mean cross-entropy of the output (element 0 of a deep-supervision list)
    against ``ctx.calibration_target`` ``[B, *spatial]``, or, when that is ``None``, against the
    model's own argmax on each patch (pseudo-labels: the score then measures how far removing
    a channel moves the model from its own segmentation, which compression should preserve).
    A classifier's logits ``[B, K]`` take one label per image: target ``[B]``.
    Patches run one at a time (one patch's activations and gradients in memory) on a deep copy
    in eval mode with frozen weights: no gradient reaches ``model``.

    Raises:
        MedslimError: no calibration batch, a target of the wrong shape, or a layer whose
            output module runs more than once per forward pass.
    """
    batch, target = ctx.calibration, ctx.calibration_target
    if batch is None:
        raise MedslimError("taylor needs calibration patches (ScoreContext.calibration)")
    shapes = ([batch.shape[0], *batch.shape[2:]], [batch.shape[0]])  # segmentation, classification
    if target is not None and list(target.shape) not in shapes:
        raise MedslimError(f"calibration_target must be [B, *spatial] = {shapes[0]} (integer labels of the calibration "
                           f"patches) or, for a classifier, [B] = {shapes[1]}, got {list(target.shape)}")
    net = copy.deepcopy(model).eval().requires_grad_(False)
    producers = {name: producer(name, m) for name, m in resolve_layers(net, layers).items()}
    taps = {name: tap_module(net, p) for name, p in producers.items()}
    dims = {name: -1 if isinstance(p, nn.Linear) else 1 for name, p in producers.items()}
    captured: dict[int, list[Tensor]] = {}
    handles = [tap.register_forward_hook(lambda mod, args, out: captured.setdefault(id(mod), []).append(out))
               for tap in {id(t): t for t in taps.values()}.values()]
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    device = next(net.parameters()).device
    try:
        for i in range(batch.shape[0]):
            captured.clear()
            x = batch[i:i + 1].to(device, torch.float32).requires_grad_(True)  # the graph, not weight grads
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            y = out.detach().argmax(1) if target is None else target[i:i + 1].to(device).long()
            if y.shape != out.shape[:1] + out.shape[2:]:
                raise MedslimError(f"calibration_target {list(target.shape)} does not fit the model's output "
                                   f"{list(out.shape)} (one label per output position: [B, *output spatial])")
            loss = F.cross_entropy(out, y)
            hs = {}
            for name, tap in taps.items():
                calls = captured.get(id(tap), [])
                if len(calls) != 1:
                    raise MedslimError(f"'{name}': its output module ({type(tap).__name__}) runs {len(calls)} times "
                                       f"per forward pass; the taylor criterion needs exactly one")
                hs[name] = calls[0]
            grads = torch.autograd.grad(loss, list(hs.values()), allow_unused=True)
            for (name, h), g in zip(hs.items(), grads):
                prod = torch.zeros_like(h) if g is None else g * h
                prod = prod.movedim(dims[name], 0).reshape(h.shape[dims[name]], -1)
                sums[name] = sums.get(name, 0) + prod.sum(1, dtype=torch.float64).detach()
                counts[name] = counts.get(name, 0) + prod.shape[1]
    finally:
        for h in handles:
            h.remove()
    return finish({name: (sums[name] / counts[name]).abs() for name in taps}, ctx)


def tap_module(model: nn.Module, module: nn.Module) -> nn.Module:
    """The module whose output holds ``module``'s channels as their consumers read them: from
    ``module``, past the channel-wise modules (``PASS_THROUGH``: norms, dropout, activations)
    that follow it in its ``nn.Sequential``; when those run to the end of the Sequential, the
    Sequential's own output, and on upwards (a ``TuckerConv`` is a Sequential too)."""
    parents = {id(child): parent for parent in model.modules() if isinstance(parent, nn.Sequential)
               for child in parent.children()}
    current = module
    while (parent := parents.get(id(current))) is not None:
        items = list(parent)
        after = items[next(i for i, m in enumerate(items) if m is current) + 1:]
        run = 0
        while run < len(after) and isinstance(after[run], PASS_THROUGH):
            run += 1
        if run < len(after):
            return after[run - 1] if run else current
        current = parent
    return current
