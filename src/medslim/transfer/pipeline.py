"""Algorithm 1 (thesis ch. 3) and its baselines on one training loop.

Divergence methods (``kl``, ``js``, ``w1``, ``frobenius``): (1) fine-tune a copy of the source
with a new head for ``initial_epochs`` → ``W_t``; (2) per-layer divergence source vs ``W_t``;
(3) select layers; (4) restart from the source weights with a new head; (5) train the selected
layers (+ their BatchNorm, + the head) with everything else frozen. Baselines use steps 4–5 with
their own layer set: ``feature`` (head only), ``full`` (everything), ``last-k``, ``random-k``,
``l2sp`` (everything, L2-SP penalty, no weight decay), ``layers`` (a given list).
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from medslim.classify.models import head_name, replace_head
from medslim.classify.train import TrainConfig, count_trainable, evaluate, fit
from medslim.errors import MedslimError, did_you_mean
from medslim.transfer.divergence import DIRECTIONS, MEASURES, candidate_layers, layer_divergences, stages
from medslim.transfer.select import RULES, SCOPES, check_k, check_layers, last_k, random_k, select_layers

BASELINES = ("feature", "full", "last-k", "random-k", "l2sp", "layers")
NO_SELECTION = ("feature", "full", "l2sp")  # head only or every layer: no layers to choose
PipelineProgress = Callable[[str, int, int, int, float], None]  # (phase, epoch, batch, batches, loss);
# phase is "initial" (step 1 of Algorithm 1) or the method name (the final fine-tune)


def methods() -> tuple[str, ...]:
    """Every method name: the baselines, then one per registered divergence measure."""
    return BASELINES + tuple(MEASURES)


@dataclass(frozen=True)
class TransferConfig:
    """Settings of one transfer run. ``train`` is the final fine-tune; the initial fine-tune of the
    divergence methods reuses it with ``initial_epochs`` epochs and no lr decay."""

    method: str = "kl"
    k: int = 3
    rule: str = "top_k"
    percentile: float = 90.0
    scope: str = "global"
    direction: str = "t||s"
    initial_epochs: int = 3
    layers: tuple[str, ...] = ()
    train_bn: bool = True
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method not in methods():
            raise MedslimError(f"unknown method '{self.method}'; use {' | '.join(methods())}"
                               f"{did_you_mean(self.method, methods())}")
        if self.rule not in RULES or self.scope not in SCOPES or self.direction not in DIRECTIONS:
            raise MedslimError(f"rule must be {' | '.join(RULES)}, scope {' | '.join(SCOPES)}, "
                               f"direction {' | '.join(DIRECTIONS)}")
        if self.initial_epochs < 1 and self.method in MEASURES:
            raise MedslimError("the divergence methods need initial_epochs ≥ 1")
        if self.method == "layers" and not self.layers:
            raise MedslimError("method 'layers' needs the layers to train (--layers a,b,c)")
        object.__setattr__(self, "layers", tuple(self.layers))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransferResult:
    """Outcome of :func:`run_transfer`. ``layers`` are the selected conv/linear layers (selection
    order), ``trainable`` the parameter prefixes actually trained (``None`` = all)."""

    method: str
    layers: list[str]
    trainable: list[str] | None
    trainable_params: int
    total_params: int
    test: dict
    history: dict
    initial: dict | None
    divergences: pd.DataFrame | None
    seconds: float
    model: nn.Module = field(repr=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("model", "divergences")}
        out["divergences"] = None if self.divergences is None else self.divergences.to_dict(orient="records")
        return out


def target_model(source: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``source`` with a new head for ``num_classes`` (initialised from ``seed``)."""
    model = copy.deepcopy(source)
    torch.manual_seed(seed)
    return replace_head(model, num_classes).eval()


def bn_partners(model: nn.Module) -> dict[str, str]:
    """Conv layer → the BatchNorm that directly follows it in module order with matching width
    (torchvision/timm ResNets: ``conv1→bn1``, ``downsample.0→downsample.1``)."""
    mods = list(model.named_modules())
    out = {}
    for (n, m), (n2, m2) in zip(mods, mods[1:]):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(m2, nn.modules.batchnorm._BatchNorm) \
                and m2.num_features == m.out_channels:
            out[n] = n2
    return out


def trainable_set(model: nn.Module, layers: list[str], train_bn: bool = True) -> set[str]:
    """Prefixes to train: ``layers``, their BatchNorm partners (``train_bn``) and the head."""
    partners = bn_partners(model) if train_bn else {}
    return set(layers) | {partners[n] for n in layers if n in partners} | {head_name(model)}


def _phase(progress: PipelineProgress | None, name: str):
    return None if progress is None else (lambda e, b, nb, loss: progress(name, e, b, nb, loss))


def initial_finetune(source: nn.Module, train_ds: Dataset, config: TransferConfig, num_classes: int,
                     progress: PipelineProgress | None = None) -> tuple[nn.Module, dict]:
    """Step 1: the whole source model (new head) fine-tuned for ``initial_epochs``, no lr decay."""
    tuned = target_model(source, num_classes, config.train.seed)
    history = fit(tuned, train_ds, replace(config.train, epochs=config.initial_epochs, milestones=()),
                  progress=_phase(progress, "initial"))
    return tuned, history


def validate(source: nn.Module, config: TransferConfig) -> None:
    """Check ``config`` against ``source`` before any training (k in range, layers present).

    Raises:
        MedslimError: no candidate layers, ``k`` out of range, requested layers missing.
    """
    layers = candidate_layers(source)
    if config.method in NO_SELECTION:
        return
    if not layers:
        raise MedslimError(f"{type(source).__name__} has no conv/linear layers besides its head")
    if config.method == "layers":
        check_layers(source, list(config.layers), layers)
    elif config.method in MEASURES and config.rule == "top_k" and config.scope == "blockwise":
        check_k(config.k, max(Counter(stages(source, layers).values()).values()), "layers of the largest stage")
    elif config.method in ("last-k", "random-k") or config.rule == "top_k":
        check_k(config.k, len(layers))


def choose_layers(source: nn.Module, config: TransferConfig, tuned: nn.Module | None = None,
                  ) -> tuple[list[str], pd.DataFrame | None]:
    """The layer set of ``config.method`` (``tuned`` is required for the divergence methods)."""
    layers = candidate_layers(source)
    if not layers and config.method not in NO_SELECTION:
        raise MedslimError(f"{type(source).__name__} has no conv/linear layers besides its head")
    if config.method in MEASURES:
        assert tuned is not None, "divergence methods need the initially fine-tuned model"
        div = layer_divergences(source, tuned, config.method, config.direction)
        chosen = select_layers(div, config.rule, config.k, config.percentile, config.scope)
        div["selected"] = div["layer"].isin(chosen)
        return chosen, div
    if config.method == "last-k":
        return last_k(layers, config.k), None
    if config.method == "random-k":
        return random_k(layers, config.k, config.train.seed), None
    if config.method == "layers":
        return check_layers(source, list(config.layers), layers), None
    if config.method == "full" or config.method == "l2sp":
        return layers, None
    return [], None  # feature extractor


def run_transfer(source: nn.Module, train_ds: Dataset, test_ds: Dataset, config: TransferConfig,
                 num_classes: int | None = None, tuned: tuple[nn.Module, dict] | None = None,
                 progress: PipelineProgress | None = None) -> TransferResult:
    """Run ``config.method`` from ``source`` (never modified) on ``train_ds``; score on ``test_ds``.

    Args:
        num_classes: target classes (default ``train_ds.num_classes``).
        tuned: a precomputed ``initial_finetune`` result (model, history) to share between
            divergence measures with the same seed and budget.
    """
    start = time.perf_counter()
    validate(source, config)
    num_classes = num_classes or int(getattr(train_ds, "num_classes"))
    initial = None
    if config.method in MEASURES:
        if tuned is None:
            tuned = initial_finetune(source, train_ds, config, num_classes, progress)
        initial = tuned[1]
        layers, div = choose_layers(source, config, tuned[0])
    else:
        layers, div = choose_layers(source, config)
    model = target_model(source, num_classes, config.train.seed)
    train_cfg = config.train
    source_state = None
    if config.method in ("full", "l2sp"):
        trainable = None
        if config.method == "l2sp":
            train_cfg = replace(train_cfg, l2sp_alpha=config.l2sp_alpha, l2sp_beta=config.l2sp_beta, weight_decay=0.0)
            source_state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    else:
        trainable = trainable_set(model, layers, config.train_bn)
    history = fit(model, train_ds, train_cfg, trainable, source_state, progress=_phase(progress, config.method))
    return TransferResult(
        method=config.method, layers=layers, trainable=None if trainable is None else sorted(trainable),
        trainable_params=count_trainable(model, trainable), total_params=sum(p.numel() for p in model.parameters()),
        test=evaluate(model, test_ds), history=history, initial=initial, divergences=div,
        seconds=time.perf_counter() - start, model=model)
