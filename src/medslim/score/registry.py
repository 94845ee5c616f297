"""Criterion registry and the context every criterion receives.

A criterion is one callable ``criterion(model, layers, ctx) -> {layer name: scores}``: ``layers``
are module names (as ``model.named_modules()`` yields them) whose *output* channels are pruning
candidates; each score tensor is 1-D float32 of length ``C_out`` (higher = more important).
Criteria never modify the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from medslim.errors import MedslimError, did_you_mean

Criterion = Callable[[nn.Module, Sequence[str], "ScoreContext"], dict[str, Tensor]]

ENGINES = ("channel", "spatial")
REDUCTIONS = ("rms", "mean", "sum")

CRITERIA: dict[str, Criterion] = {}
NEEDS_CALIBRATION: set[str] = set()  # criteria that score with data (ScoreContext.calibration)


@dataclass(frozen=True)
class ScoreContext:
    """Everything a criterion may need besides the model and the candidate layers.

    Attributes:
        input_shape: network input ``(B, C, *spatial)``, e.g. the nnU-Net patch
            ``(1, 1, 40, 56, 40)``. Needed by the ``spatial`` engine; the ``channel`` engine only
            uses ``C`` and the number of spatial dims, and infers both from the first
            convolution when this is ``None``.
        engine: ``"channel"`` (fast, channel-level recursion on a 1-voxel input) or
            ``"spatial"`` (exact voxel-level recursion on ``input_shape``).
        reduce: voxels → channel score: ``"rms"`` (thesis ch. 5), ``"mean"``, or ``"sum"``
            (the channel's score mass; use with ``normalize=False`` to check conservation).
        seed_classes: classes (head output channels) seeded with δ = 1; ``None`` = all.
        seed: seed of the ``random`` criterion.
        head: name of the module whose output is seeded; ``None`` = ``find_head`` (the
            family's main output: nnU-Net's last ``decoder.seg_layers.<i>``, a MONAI network
            itself, a classifier's last Linear).
        normalize: divide each layer's scores by their L2 norm.
        calibration: input batch ``(B, C, *spatial)`` for data-aware criteria (``hvs_data``,
            ``taylor``).
        calibration_target: integer labels ``(B, *spatial)`` of ``calibration`` for criteria
            with a loss (``taylor``); ``None`` = the model's own argmax.
        cp_rank: rank of the per-filter CP decomposition the ``norton`` criterion compares
            (unused for layers that already are CP blocks: their own factors are compared).
    """

    input_shape: tuple[int, ...] | None = None
    engine: str = "channel"
    reduce: str = "rms"
    seed_classes: tuple[int, ...] | None = None
    seed: int = 0
    head: str | None = None
    normalize: bool = True
    calibration: Tensor | None = field(default=None, compare=False, repr=False)
    calibration_target: Tensor | None = field(default=None, compare=False, repr=False)
    cp_rank: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.cp_rank, bool) or not isinstance(self.cp_rank, int) or self.cp_rank < 1:
            raise MedslimError(f"cp_rank must be an integer ≥ 1, got {self.cp_rank!r}")
        if self.engine not in ENGINES:
            raise MedslimError(f"unknown scoring engine '{self.engine}' (expected one of "
                               f"{', '.join(ENGINES)}){did_you_mean(self.engine, ENGINES)}")
        if self.reduce not in REDUCTIONS:
            raise MedslimError(f"unknown channel reduction '{self.reduce}' (expected one of "
                               f"{', '.join(REDUCTIONS)}){did_you_mean(self.reduce, REDUCTIONS)}")
        if self.input_shape is not None:
            shape = tuple(int(s) for s in self.input_shape)
            if len(shape) < 2 or min(shape) < 1:
                raise MedslimError(f"input_shape must be (batch, channels, *spatial) with positive "
                                   f"sizes, got {self.input_shape}")
            object.__setattr__(self, "input_shape", shape)
        if self.seed_classes is not None:
            classes = tuple(int(c) for c in self.seed_classes)
            if not classes or min(classes) < 0:
                raise MedslimError(f"seed_classes must be a non-empty list of class indices >= 0, "
                                   f"got {self.seed_classes}")
            object.__setattr__(self, "seed_classes", classes)


def register_criterion(name: str, *, needs_calibration: bool = False) -> Callable[[Criterion], Criterion]:
    """Decorator registering ``fn`` under ``name`` in :data:`CRITERIA` (``needs_calibration``:
    it scores with ``ScoreContext.calibration`` and fails without)."""

    def wrap(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise ValueError(f"criterion '{name}' is already registered")
        CRITERIA[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``.

    Raises:
        MedslimError: unknown name (with the closest registered name).
    """
    try:
        return CRITERIA[name]
    except KeyError:
        raise MedslimError(f"unknown criterion '{name}' (available: {', '.join(list_criteria())})"
                           f"{did_you_mean(name, list(CRITERIA))}") from None


def check_criterion(name: str, calibration: bool = False, option: str = "--criterion",
                    hint: str = "which this command does not take") -> Criterion:
    """The criterion ``name``, checked before any work for a caller that has calibration data
    (``calibration=True``) or not. ``hint`` says where data would come from.

    Raises:
        MedslimError: unknown name, or a data-aware criterion (``hvs_data``, ``taylor``) without
            calibration data.
    """
    fn = get_criterion(name)
    if name in NEEDS_CALIBRATION and not calibration:
        weight_only = [c for c in list_criteria() if c not in NEEDS_CALIBRATION]
        raise MedslimError(f"{option} {name} needs calibration data, {hint}; "
                           f"choose a weight-only criterion: {', '.join(weight_only)}")
    return fn


def list_criteria() -> list[str]:
    return sorted(CRITERIA)


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for the requested layers.

    Raises:
        MedslimError: a name is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        if name not in modules:
            raise MedslimError(f"'{name}' is not a module of the {type(model).__name__}"
                               f"{did_you_mean(name, list(modules))}")
        out[name] = modules[name]
    return out


def l2_normalize(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's scores divided by their L2 norm (all-zero layers stay zero)."""
    out = {}
    for name, s in scores.items():
        norm = s.norm()
        out[name] = s / norm if norm > 0 else s
    return out


def finish(scores: dict[str, Tensor], ctx: ScoreContext) -> dict[str, Tensor]:
    """Common tail of every criterion: 1-D float32 on CPU, L2-normalised if ``ctx.normalize``."""
    scores = {k: v.detach().to("cpu", torch.float64).reshape(-1) for k, v in scores.items()}
    if ctx.normalize:  # in float64: raw NISP scores of deep networks exceed float32's range
        scores = l2_normalize(scores)
    return {k: v.float() for k, v in scores.items()}
