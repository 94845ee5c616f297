"""LOBSTER and SeReNe (``medslim.finetune.sparsify``) as the fine-tune of a 2D classifier.

The regulariser shrinks insensitive weights (LOBSTER) or channels (SeReNe) after every update
of :func:`medslim.classify.fit`; when the validation loss has not improved for ``patience``
epochs, and at the end, it zeroes what lies below the threshold that keeps the validation loss
within ``tolerance`` (relative) and pins it. SeReNe then removes the zeroed channels physically
(the stem and the head stay whole, as in ``prune_classifier``); LOBSTER leaves a dense network
with zeros, so its sparsity does not make it faster. The same reading of the papers as the
nnU-Net trainers (see ``medslim.finetune.sparsify``); SeReNe's sensitivity is refreshed at every
epoch on ``calibration`` training images.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medslim.classify.train import FitHooks, TrainConfig, fit
from medslim.errors import MedslimError
from medslim.prune.classifier import ClassifierPruneReport, classifier_layers, stem_name

REGULARIZERS = ("lobster", "serene")


@dataclass(frozen=True)
class SparsifyResult:
    """``model``: the fine-tuned network (SeReNe: without the zeroed channels); ``kept``: group
    root → kept output channels (SeReNe; empty for LOBSTER); ``report``: the regulariser's
    report plus the fit history; ``prune_report``: sizes and per-layer densities as
    ``prune_classifier`` reports them (``ratio``: the fraction of candidate channels removed)."""

    model: nn.Module
    kept: dict[str, list[int]]
    report: dict[str, Any]
    prune_report: ClassifierPruneReport


@torch.no_grad()
def validation_loss(model: nn.Module, ds: Dataset, batch_size: int = 256) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on ``ds``."""
    model.eval()
    total, n = 0.0, 0
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / max(n, 1)


def sparsify_classifier(model: nn.Module, kind: str, train: Dataset, val: Dataset, config: TrainConfig,
                        input_shape: Sequence[int], calibration: Tensor | None = None, lam: float = 1e-3,
                        tolerance: float = 0.05, patience: int = 2) -> SparsifyResult:
    """Fine-tune a copy of ``model`` under ``kind`` (``lobster`` | ``serene``).

    Args:
        model: classifier ``[B, C, H, W]`` → ``[B, K]``; not modified.
        val: the split whose loss bounds each threshold step (not the test split).
        input_shape: ``[1, C, H, W]`` to trace the channel groups (SeReNe).
        calibration: ``[N, C, H, W]`` training images for SeReNe's sensitivity (required for it).
        lam, tolerance, patience: λ, the relative validation-loss tolerance, the plateau length.

    Raises:
        MedslimError: unknown ``kind``, SeReNe without calibration images, a model without
            prunable layers.
    """
    from medslim.finetune.regularize import plateaued
    from medslim.finetune.sparsify import LobsterRegularizer, SereneRegularizer, attach

    if kind not in REGULARIZERS:
        raise MedslimError(f"unknown regularizer '{kind}'; choose one of {', '.join(REGULARIZERS)}")
    if kind == "serene" and calibration is None:
        raise MedslimError("SeReNe needs calibration images for its channel sensitivity")
    net = copy.deepcopy(model)
    layers, stem = classifier_layers(net), stem_name(net)
    if not layers or stem is None:
        raise MedslimError(f"the {type(net).__name__} has no prunable layer (the stem and the head stay whole)")
    if kind == "lobster":
        reg: Any = LobsterRegularizer(net, lam)
    else:
        example = torch.zeros(tuple(input_shape), dtype=next(net.parameters()).dtype)
        reg = SereneRegularizer(net, layers, example, protect=[stem], lam=lam)
    losses: list[float] = []
    last = config.epochs - 1

    def epoch_start(m: nn.Module, epoch: int) -> None:
        if kind == "serene":
            reg.refresh(m, calibration)

    def epoch_end(m: nn.Module, epoch: int) -> None:
        losses.append(validation_loss(m, val))
        if epoch < last and plateaued(losses, patience):
            reg.threshold(lambda: validation_loss(m, val), tolerance)
            losses.clear()

    history = fit(net, train, config, hooks=FitHooks(optimizer=lambda opt: attach(opt, reg),
                                                      epoch_start=epoch_start, epoch_end=epoch_end))
    reg.threshold(lambda: validation_loss(net, val), tolerance)
    kept: dict[str, list[int]] = {}
    if kind == "serene":
        net, spec = reg.remove(net)
        kept = {k: list(v) for k, v in spec.kept.items()}
    report = reg.report()
    channels = report.get("channels", 0)
    sizes = ClassifierPruneReport.measure(
        model, net, layers, input_shape, ratio=report.get("channels_zeroed", 0) / channels if channels else 0.0,
        criterion=kind, scope="layer", seed=config.seed, kept={k: tuple(v) for k, v in kept.items()},
        members=dict(getattr(reg, "groups", {})))
    return SparsifyResult(model=net.eval(), kept=kept, report={**report, "fit": history}, prune_report=sizes)
