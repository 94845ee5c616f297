"""Channel pruning of 2D classifiers (thesis chapter 4, SPEC §6): score, choose, remove.

Works on any ``nn.Module`` built from convolutions, BatchNorm, ReLU/LeakyReLU, pooling (max
pooling is scored as average pooling), residual additions (any addition of two feature maps,
see :mod:`medslim.score.residual`) and Linear layers — torchvision ResNets and VGGs, timm ResNets,
plain ``nn.Sequential`` CNNs.

- Candidates (:func:`classifier_layers`): every convolution except the stem (the first
  convolution, which reads the image) and the head; optionally hidden Linear layers.
- Scores: any registered criterion (``hvs``, ``nisp``, ``l1``, ``norton``, ``random``, …). HVS/NISP
  use the exact ``spatial`` engine on ``input_shape`` and average neuron scores per channel
  (thesis §4.5.3.2), L2-normalised per layer. Data-aware criteria (``hvs_data``, ``relief``,
  ``taylor``) score with a calibration batch (``taylor``: with its labels, one per image).
- Coupled layers (residual additions) form one group scored by the sum of its members; a group
  coupled to the stem is left whole (``prune_network``'s ``protect``).
- ``scope="layer"``: each group keeps ``ceil((1-ρ)·C)``. ``scope="global"``: group scores are
  L2-normalised and ranked together; ``ceil((1-ρ)·N)`` of all ``N`` candidate channels survive,
  at least one per group (thesis §4.5.2: "pruning is applied globally").
- Removal is physical (Torch-Pruning); the kept indices replay on a fresh model with
  ``apply_kept``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.errors import MedslimError, did_you_mean
from medslim.measure import count_flops, count_parameters
from medslim.prune.graph import build_graph
from medslim.prune.pruner import channel_groups, prune_network
from medslim.prune.select import SELECTIONS, global_keep_counts, top_k
from medslim.score import ScoreContext, check_criterion, find_head, get_criterion

SCOPES = SELECTIONS  # "layer" | "global"
_PROPAGATED = ("hvs", "nisp", "consumer_l1")


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and Linear layers in module order (aliases listed once)."""
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, nn.Linear)) and id(m) not in seen:
            seen.add(id(m))
            out.append((name, m))
    return out


def stem_name(model: nn.Module) -> str | None:
    """The first convolution (reads the image), or ``None``."""
    return next((n for n, m in prunable_modules(model) if isinstance(m, _ConvNd)), None)


def classifier_layers(model: nn.Module, *, include_linear: bool = False, head: str | None = None) -> list[str]:
    """Names of the pruning candidates: convolutions except the stem and the head, plus hidden
    Linear layers if ``include_linear``."""
    head = head if head is not None else find_head(model)
    stem = stem_name(model)
    return [n for n, m in prunable_modules(model)
            if n not in (head, stem) and (isinstance(m, _ConvNd) or include_linear)]


@dataclass
class LayerDensity:
    """One convolution/Linear before and after pruning (``density = kept / original``)."""

    layer: str
    kind: str
    original: int
    kept: int
    candidate: bool

    @property
    def density(self) -> float:
        return self.kept / self.original


@dataclass
class ClassifierPruneReport:
    """What :func:`prune_classifier` did; ``kept`` replays with ``apply_kept``."""

    ratio: float
    criterion: str
    scope: str
    seed: int
    input_shape: tuple[int, ...]
    kept: dict[str, tuple[int, ...]]
    members: dict[str, list[str]]
    layers: list[LayerDensity]
    params: tuple[int, int]
    flops: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def measure(cls, before: nn.Module, after: nn.Module, candidates: Sequence[str], input_shape: Sequence[int],
                **fields: Any) -> "ClassifierPruneReport":
        """The report of ``before`` → ``after``: per-layer densities, parameters and FLOPs at
        ``input_shape``; ``fields`` give the rest (ratio, criterion, scope, seed, kept, members)."""
        shape = tuple(int(s) for s in input_shape)
        return cls(input_shape=shape, layers=densities(before, after, candidates),
                   params=(count_parameters(before), count_parameters(after)),
                   flops=(count_flops(before, shape), count_flops(after, shape)), **fields)

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params[1] / self.params[0]

    @property
    def flop_reduction(self) -> float:
        return 1.0 - self.flops[1] / self.flops[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept"] = {k: list(v) for k, v in self.kept.items()}
        d["layers"] = [{**asdict(r), "density": r.density} for r in self.layers]
        d["param_reduction"], d["flop_reduction"] = self.param_reduction, self.flop_reduction
        d["mean_candidate_density"] = (sum(r.density for r in self.layers if r.candidate)
                                       / max(1, sum(r.candidate for r in self.layers)))
        return d


def score_layers(model: nn.Module, layers: Sequence[str], criterion: str, input_shape: Sequence[int],
                 seed: int = 0, calibration: Tensor | None = None,
                 calibration_target: Tensor | None = None) -> dict[str, Tensor]:
    """``{layer: [C_out]}`` L2-normalised scores; propagation criteria use the spatial engine with
    per-channel mean (``hvs_data`` uses the channel engine). Data-aware criteria read
    ``calibration`` ``[B, C, H, W]``; ``taylor`` its labels ``calibration_target`` ``[B]``
    (``None``: the model's own argmax)."""
    engine = "channel" if criterion == "hvs_data" else "spatial"
    ctx = ScoreContext(input_shape=tuple(input_shape), engine=engine, reduce="mean", seed=seed,
                       calibration=calibration, calibration_target=calibration_target)
    return get_criterion(criterion)(model, list(layers), ctx)


def coupled_groups(model: nn.Module, layers: Sequence[str], example: Tensor,
                   protect: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{root: members}``: candidates whose output channels are removed together (residual
    streams), in ``layers`` order; groups coupled to a ``protect``-ed layer are dropped."""
    net = copy.deepcopy(model)
    return channel_groups(build_graph(net, example), dict(net.named_modules()), layers, protect)


def global_keep(group_scores: dict[str, Tensor], ratio: float) -> dict[str, tuple[int, ...]]:
    """Global top-k over L2-normalised group scores: ``ceil((1-ratio)·N)`` channels survive
    (ties: lower group order, then lower index), at least one per group (its best); see
    ``medslim.prune.select.global_keep_counts``."""
    counts = global_keep_counts(group_scores, ratio)
    return {r: tuple(top_k(s, counts[r]).tolist()) for r, s in group_scores.items()}


def densities(before: nn.Module, after: nn.Module, candidates: Sequence[str]) -> list[LayerDensity]:
    """Output channels of every convolution/Linear of ``before`` vs the pruned ``after``."""
    pruned = dict(after.named_modules())
    rows = []
    for name, m in prunable_modules(before):
        width = (lambda x: x.out_features if isinstance(x, nn.Linear) else x.out_channels)
        rows.append(LayerDensity(name, type(m).__name__, width(m), width(pruned[name]), name in candidates))
    return rows


def prune_classifier(model: nn.Module, ratio: float, criterion: str = "hvs",
                     input_shape: Sequence[int] = (1, 3, 28, 28), scope: str = "layer", seed: int = 0, *,
                     include_linear: bool = False, calibration: Tensor | None = None,
                     calibration_target: Tensor | None = None) -> tuple[nn.Module, ClassifierPruneReport]:
    """Remove a fraction ``ratio`` of the candidate channels of a classifier.

    Args:
        model: classifier taking ``input_shape`` ``[B, C, H, W]`` → logits ``[B, K]``; not modified.
        ratio: fraction of channels removed, in ``[0, 1)`` (per group, or of all candidate
            channels with ``scope="global"``).
        criterion: a registered criterion (see ``medslim.score.list_criteria()``).
        scope: ``"layer"`` or ``"global"``.
        seed: seed of the ``random`` criterion.
        include_linear: also prune hidden Linear layers (e.g. VGG's classifier).
        calibration: input batch ``[B, C, H, W]`` for the data-aware criteria (``hvs_data``,
            ``relief``, ``taylor``).
        calibration_target: class labels ``[B]`` of ``calibration`` (``taylor``'s loss).
    Returns:
        the pruned copy (same output shape) and its report.
    Raises:
        MedslimError: bad ratio/scope/criterion, a data-aware criterion without ``calibration``,
            or no prunable layer.
    """
    if not 0.0 <= ratio < 1.0:
        raise MedslimError(f"pruning ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise MedslimError(f"unknown scope '{scope}' (expected one of {', '.join(SCOPES)})"
                           f"{did_you_mean(scope, SCOPES)}")
    check_criterion(criterion, calibration=calibration is not None, option="criterion",
                    hint="and no calibration batch was given")  # fail before any work
    input_shape = tuple(int(s) for s in input_shape)
    times: dict[str, float] = {}
    stem = stem_name(model)
    layers = classifier_layers(model, include_linear=include_linear)
    if not layers or stem is None:
        raise MedslimError(f"the {type(model).__name__} has no prunable layer (the stem convolution and the "
                           f"head are never pruned; it needs at least one other convolution)")
    param = next(model.parameters())
    example = torch.zeros(input_shape, dtype=param.dtype, device=param.device)
    t = time.perf_counter()
    scores = score_layers(model, layers, criterion, input_shape, seed, calibration, calibration_target)
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    pruned, record = prune_network(model, layers, scores, ratio, example, protect=[stem], selection=scope)
    times["prune"] = time.perf_counter() - t
    was_training = model.training
    try:
        model.eval(), pruned.eval()
        with torch.no_grad():
            out_a, out_b = model(example), pruned(example)
    finally:
        model.train(was_training), pruned.train(was_training)
    if out_a.shape != out_b.shape:  # would be a Torch-Pruning bug
        raise RuntimeError(f"pruning changed the output shape {tuple(out_a.shape)} → {tuple(out_b.shape)}")
    report = ClassifierPruneReport.measure(model, pruned, layers, input_shape, ratio=ratio, criterion=criterion,
                                           scope=scope, seed=seed, kept=dict(record.kept),
                                           members=dict(record.members), seconds=times)
    return pruned, report
