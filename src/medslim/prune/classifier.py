"""Channel pruning of 2D classifiers (thesis chapter 4, SPEC §6): score, choose, remove.

Works on any ``nn.Module`` built from convolutions, BatchNorm, ReLU/LeakyReLU, pooling (max
pooling is scored as average pooling), residual additions of torchvision/nnU-Net blocks and
Linear layers — torchvision ResNets and VGGs, timm ResNets, plain ``nn.Sequential`` CNNs.

- Candidates (:func:`classifier_layers`): every convolution except the stem (the first
  convolution, which reads the image) and the head; optionally hidden Linear layers.
- Scores: any registered criterion (``hvs``, ``nisp``, ``l1``, ``random``, …). HVS/NISP use the
  exact ``spatial`` engine on ``input_shape`` and average neuron scores per channel
  (thesis §4.5.3.2), L2-normalised per layer.
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
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.errors import MedslimError, did_you_mean
from medslim.measure import count_flops, count_parameters
from medslim.prune.graph import build_graph
from medslim.prune.pruner import PruneRecord, coupled_members, apply_kept, prune_network
from medslim.score import ScoreContext, find_head, get_criterion

SCOPES = ("layer", "global")
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
                 seed: int = 0, calibration: Tensor | None = None) -> dict[str, Tensor]:
    """``{layer: [C_out]}`` L2-normalised scores; propagation criteria use the spatial engine with
    per-channel mean (``hvs_data`` needs ``calibration`` and uses the channel engine)."""
    engine = "channel" if criterion == "hvs_data" else "spatial"
    ctx = ScoreContext(input_shape=tuple(input_shape), engine=engine, reduce="mean", seed=seed,
                       calibration=calibration)
    return get_criterion(criterion)(model, list(layers), ctx)


def coupled_groups(model: nn.Module, layers: Sequence[str], example: Tensor,
                   protect: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{root: members}``: candidates whose output channels are removed together (residual
    streams), in ``layers`` order; groups coupled to a ``protect``-ed layer are dropped."""
    net = copy.deepcopy(model)
    graph = build_graph(net, example)
    modules = dict(net.named_modules())
    names = {modules[n]: n for n in [*layers, *protect]}
    done: set[str] = set(protect)
    groups: dict[str, list[str]] = {}
    for name in layers:
        if name in done:
            continue
        coupled = coupled_members(graph, modules[name], names)
        done.update(coupled)
        if not any(m in protect for m in coupled):
            groups[name] = [m for m in coupled if m in layers]
    return groups


def global_keep(group_scores: dict[str, Tensor], ratio: float) -> dict[str, tuple[int, ...]]:
    """Global top-k over L2-normalised group scores: ``ceil((1-ratio)·N)`` channels survive
    (ties: lower group order, then lower index), at least one per group (its best)."""
    entries = []  # (-score, group order, channel)
    for g, (root, s) in enumerate(group_scores.items()):
        s = s.detach().double().cpu()
        s = s / s.norm() if s.norm() > 0 else s
        entries.extend((-float(v), g, c) for c, v in enumerate(s))
    total = len(entries)
    budget = max(len(group_scores), math.ceil(round((1.0 - ratio) * total, 9)))
    entries.sort()
    roots = list(group_scores)
    kept: dict[str, set[int]] = {r: set() for r in roots}
    for _, g, c in entries:  # each group's best channel first
        if not kept[roots[g]]:
            kept[roots[g]].add(c)
    count = len(roots)
    for _, g, c in entries:
        if count >= budget:
            break
        if c not in kept[roots[g]]:
            kept[roots[g]].add(c)
            count += 1
    return {r: tuple(sorted(kept[r])) for r in roots}


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
                     ) -> tuple[nn.Module, ClassifierPruneReport]:
    """Remove a fraction ``ratio`` of the candidate channels of a classifier.

    Args:
        model: classifier taking ``input_shape`` ``[B, C, H, W]`` → logits ``[B, K]``; not modified.
        ratio: fraction of channels removed, in ``[0, 1)`` (per group, or of all candidate
            channels with ``scope="global"``).
        criterion: a registered criterion (see ``medslim.score.list_criteria()``).
        scope: ``"layer"`` or ``"global"``.
        seed: seed of the ``random`` criterion.
        include_linear: also prune hidden Linear layers (e.g. VGG's classifier).
        calibration: input batch for ``hvs_data``.
    Returns:
        the pruned copy (same output shape) and its report.
    Raises:
        MedslimError: bad ratio/scope/criterion, or no prunable layer.
    """
    if not 0.0 <= ratio < 1.0:
        raise MedslimError(f"pruning ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise MedslimError(f"unknown scope '{scope}' (expected one of {', '.join(SCOPES)})"
                           f"{did_you_mean(scope, SCOPES)}")
    get_criterion(criterion)  # fail before any work
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
    scores = score_layers(model, layers, criterion, input_shape, seed, calibration)
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    if scope == "layer":
        pruned, record = prune_network(model, layers, scores, ratio, example, protect=[stem])
    else:
        pruned, record = _prune_global(model, layers, scores, ratio, example, stem)
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
    report = ClassifierPruneReport(
        ratio=ratio, criterion=criterion, scope=scope, seed=seed, input_shape=input_shape,
        kept=dict(record.kept), members=dict(record.members), layers=densities(model, pruned, layers),
        params=(count_parameters(model), count_parameters(pruned)),
        flops=(count_flops(model, input_shape), count_flops(pruned, input_shape)), seconds=times)
    return pruned, report


def _prune_global(model: nn.Module, layers: Sequence[str], scores: dict[str, Tensor], ratio: float,
                  example: Tensor, stem: str) -> tuple[nn.Module, PruneRecord]:
    """Global scope: rank all groups together, then replay the kept indices (``apply_kept``)."""
    net = copy.deepcopy(model)
    record = PruneRecord()
    if ratio == 0.0:
        return net, record
    groups = coupled_groups(model, layers, example, protect=[stem])
    totals = {root: sum(scores[m].detach().double().cpu() for m in members) for root, members in groups.items()}
    kept = global_keep(totals, ratio)
    apply_kept(net, kept, example)
    for root, members in groups.items():
        record.kept[root], record.members[root] = kept[root], members
        record.channels[root] = (totals[root].numel(), len(kept[root]))
    return net, record

