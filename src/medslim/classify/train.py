"""A small, deterministic training loop for 2D classifiers with partial freezing and L2-SP.

``trainable`` is a set of parameter-name prefixes (module names such as ``layer4.1.conv2`` or
``fc``); a parameter is trained when its name equals a prefix or starts with ``prefix + "."``.
Everything else is frozen (``requires_grad=False``, not given to the optimiser) and every
BatchNorm layer outside the trainable prefixes stays in eval mode, so frozen layers — including
their running statistics — are bitwise unchanged by :func:`fit`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medslim.classify.models import head_name
from medslim.errors import MedslimError, did_you_mean

Progress = Callable[[int, int, int, float], None]  # (epoch, batch, batches per epoch, loss)
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: thesis §3.5.1.2 — SGD, momentum 0.9, lr 1e-2 ×0.1 at epochs
    15 and 30, batch 32, 40 epochs). ``l2sp_alpha``/``l2sp_beta`` = 0 turn L2-SP off."""

    epochs: int = 40
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    milestones: tuple[int, ...] = (15, 30)
    optimizer: str = "sgd"
    seed: int = 0
    l2sp_alpha: float = 0.0
    l2sp_beta: float = 0.0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise MedslimError(f"epochs must be ≥ 0 and batch size ≥ 1 (got {self.epochs}, {self.batch_size})")
        if not self.lr > 0 or self.weight_decay < 0 or self.l2sp_alpha < 0 or self.l2sp_beta < 0:
            raise MedslimError("lr must be > 0; weight decay and L2-SP α, β must be ≥ 0")
        if self.optimizer not in OPTIMIZERS:
            raise MedslimError(f"unknown optimizer '{self.optimizer}'; use {' | '.join(OPTIMIZERS)}"
                               f"{did_you_mean(self.optimizer, OPTIMIZERS)}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitHooks:
    """Optional calls into :func:`fit`'s loop: ``optimizer(opt)`` once the optimizer exists (to
    register step hooks), ``epoch_start(model, epoch)`` before an epoch's first batch,
    ``epoch_end(model, epoch)`` after its last one (0-based epochs), and ``loss(model)``: a
    0-dim term added to every training step's loss (e.g. DPRP's factor losses)."""

    optimizer: Callable[[torch.optim.Optimizer], None] | None = None
    epoch_start: Callable[[nn.Module, int], None] | None = None
    epoch_end: Callable[[nn.Module, int], None] | None = None
    loss: Callable[[nn.Module], Tensor] | None = None


def _covered(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def trainable_names(model: nn.Module, trainable: set[str] | None) -> list[str]:
    """Names of the parameters selected by ``trainable`` (``None`` = all).

    Raises:
        MedslimError: a prefix that matches no parameter (e.g. a layer the model does not have).
    """
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return names
    modules = [n for n, _ in model.named_modules() if n]
    for p in sorted(trainable):
        if not any(_covered(n, [p]) for n in names):
            raise MedslimError(f"{type(model).__name__} has no layer '{p}' with parameters"
                               f"{did_you_mean(p, modules)}")
    return [n for n in names if _covered(n, trainable)]


def count_trainable(model: nn.Module, trainable: set[str] | None) -> int:
    """Number of scalar parameters ``fit`` would train with this ``trainable`` set."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in trainable_names(model, trainable))


def frozen_norms(model: nn.Module, trainable: set[str] | None) -> list[nn.Module]:
    """BatchNorm modules outside ``trainable``: kept in eval mode during training."""
    if trainable is None:
        return []
    return [m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _covered(n, trainable)]


def l2sp_penalty(model: nn.Module, source_state: dict[str, Tensor], names: Iterable[str], head: str,
                 alpha: float, beta: float) -> Tensor:
    """L2-SP (Li et al. 2018): ``α/2 Σ‖w − w⁰‖²`` over the named non-head parameters that exist in
    ``source_state`` with the same shape, plus ``β/2 Σ‖w‖²`` over the head's parameters (weight
    and bias). Returns a 0-dim tensor."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float32)
    for n in names:
        w = params[n]
        if _covered(n, [head]):
            total = total + 0.5 * beta * w.pow(2).sum()
        elif n in source_state and source_state[n].shape == w.shape:
            total = total + 0.5 * alpha * (w - source_state[n].to(w.dtype)).pow(2).sum()
    return total


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    # a last batch of 1 breaks BatchNorm in train mode (1×1 feature maps in ResNet layer4)
    drop_last = shuffle and len(ds) % batch_size == 1 and len(ds) > batch_size
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0, drop_last=drop_last)


def fit(model: nn.Module, train_ds: Dataset, config: TrainConfig, trainable: set[str] | None = None,
        source_state: dict[str, Tensor] | None = None, progress: Progress | None = None,
        val_ds: Dataset | None = None, hooks: FitHooks | None = None) -> dict:
    """Train ``model`` in place with cross-entropy on ``train_ds`` (items ``([C, H, W], label)``).

    Args:
        trainable: parameter-name prefixes to train (``None`` = all); see the module docstring.
        source_state: ``w⁰`` for L2-SP (required when ``config.l2sp_alpha > 0``).
        progress: called after every batch with ``(epoch, batch, batches, loss)``.
        val_ds: scored after every epoch; the model ends with the weights of the epoch with the
            best validation AUC (accuracy when AUC is undefined), MedMNIST v2's model selection.
        hooks: see :class:`FitHooks` (e.g. a sparsity regulariser, ``medslim.classify.sparsify``).

    Returns:
        ``{"loss": [per-epoch mean], "lr": [per-epoch], "steps", "seconds", "trainable_params"}``,
        plus ``"val"`` (per-epoch :func:`evaluate`) and ``"best_epoch"`` (0-based) with ``val_ds``.

    Raises:
        MedslimError: an unknown trainable prefix, L2-SP without ``source_state``, empty data.
    """
    names = trainable_names(model, trainable)
    if config.l2sp_alpha > 0 and source_state is None:
        raise MedslimError("L2-SP needs the source weights (source_state)")
    if len(train_ds) == 0:
        raise MedslimError("the training set is empty")
    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    params = [p for n, p in model.named_parameters() if n in keep]
    history: dict = {"loss": [], "lr": [], "steps": 0, "seconds": 0.0,
                     "trainable_params": int(sum(p.numel() for p in params))}
    if not params or config.epochs == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        torch.set_num_threads(old_threads)
        return history
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=0.1)
    hooks = hooks or FitHooks()
    if hooks.optimizer is not None:
        hooks.optimizer(opt)
    frozen_bn = frozen_norms(model, trainable)
    head = head_name(model)
    l2sp = config.l2sp_alpha > 0 or config.l2sp_beta > 0
    loader = _loader(train_ds, config.batch_size, True, config.seed)
    loss_fn = nn.CrossEntropyLoss()
    best: tuple[float, dict[str, Tensor]] | None = None
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            if hooks.epoch_start is not None:  # first: a hook may switch modes (SeReNe scores in eval)
                hooks.epoch_start(model, epoch)
            model.train()
            for m in frozen_bn:
                m.eval()
            losses = []
            history["lr"].append(opt.param_groups[0]["lr"])
            for b, (x, y) in enumerate(loader):
                loss = loss_fn(model(x), y)
                if l2sp:
                    loss = loss + l2sp_penalty(model, source_state or {}, names, head,
                                               config.l2sp_alpha, config.l2sp_beta)
                if hooks.loss is not None:
                    loss = loss + hooks.loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                history["steps"] += 1
                if progress is not None:
                    progress(epoch, b, len(loader), losses[-1])
            sched.step()
            history["loss"].append(float(np.mean(losses)))
            if hooks.epoch_end is not None:
                hooks.epoch_end(model, epoch)
            if val_ds is not None:
                scores = evaluate(model, val_ds)
                history.setdefault("val", []).append(scores)
                key = scores["auc"] if scores["auc"] is not None else scores["accuracy"]
                if best is None or key > best[0]:
                    best = (key, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    history["best_epoch"] = epoch
        if best is not None:
            model.load_state_dict(best[1])
    finally:
        history["seconds"] = time.perf_counter() - start
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        torch.set_num_threads(old_threads)
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, ds: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``[N, K]`` and labels ``[N]`` (model in eval mode)."""
    model.eval()
    probs, labels = [], []
    for x, y in _loader(ds, batch_size, False, 0):
        probs.append(torch.softmax(model(x), dim=1).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 256) -> dict:
    """``{"accuracy", "auc", "n"}``; AUC is one-vs-rest macro (sklearn), ``None`` when sklearn is
    missing or the labels hold a single class."""
    if len(ds) == 0:
        raise MedslimError("the evaluation set is empty")
    probs, labels = predict_proba(model, ds, batch_size)
    out = {"accuracy": float((probs.argmax(1) == labels).mean()), "auc": None, "n": int(labels.shape[0])}
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return out
    present = np.unique(labels)
    if len(present) < 2:
        return out
    if probs.shape[1] == 2:
        out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) == probs.shape[1]:
        out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    return out
