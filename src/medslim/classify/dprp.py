"""DPRP (``medslim.finetune.dprp``) as the fine-tune of a 2D classifier.

Every eligible conv becomes its full-rank SVD factors (same function), trained with
cross-entropy + ``w_orth·L_orth + w_sort·L_sort + w_comp·L_comp``; every ``cut_every`` epochs
and at the end each layer's rank is cut at the first singular-value ratio ≤ ε, and the cut
layers get a new optimizer (as the nnU-Net trainer does: the factor tensors change shape).
The result is written as ``TuckerConv(None, r)`` layers (dense again where that is not smaller,
``guard="params"``) whose ranks the pruned-classifier spec records.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from medslim.classify.train import FitHooks, TrainConfig, fit
from medslim.spec import LayerRanks


@dataclass(frozen=True)
class DPRPClassifier:
    """``model``: the fine-tuned classifier with factored convs; ``ranks``: its ``TuckerConv``
    layers (for ``save_pruned_classifier``); ``report``: per-layer ranks, cuts, fit histories."""

    model: nn.Module
    ranks: dict[str, LayerRanks]
    report: dict[str, Any]


def chunk_config(config: TrainConfig, start: int, epochs: int) -> TrainConfig:
    """The part of ``config``'s schedule from epoch ``start`` for ``epochs`` epochs, as a fresh
    run: its learning rate already decayed by the milestones passed, the later milestones
    shifted, and its own data order (seed + start)."""
    passed = sum(m <= start for m in config.milestones)
    return replace(config, epochs=epochs, lr=config.lr * 0.1 ** passed, seed=config.seed + start,
                   milestones=tuple(m - start for m in config.milestones if start < m < start + epochs))


def dprp_classifier(model: nn.Module, train: Dataset, config: TrainConfig, orth: float = 1000.0, sort: float = 1.0,
                    comp: float = 0.1, eps: float = 0.01, cut_every: int = 1, guard: str = "params") -> DPRPClassifier:
    """Fine-tune a factorised copy of ``model`` (``[B, C, H, W]`` → ``[B, K]``; not modified)
    with DPRP for ``config.epochs`` epochs. Defaults: the paper's loss weights and middle ε."""
    from medslim.finetune.dprp import cut_network, dprp_terms, factorize, finalize, svd_layers

    net = factorize(model)
    full = {n: m.rank for n, m in svd_layers(net).items()}

    def terms(m: nn.Module):
        t = dprp_terms(m, eps)
        return orth * t["orth"] + sort * t["sort"] + comp * t["comp"]

    cuts, histories = [], []
    for start in range(0, config.epochs, cut_every):
        epochs = min(cut_every, config.epochs - start)
        histories.append(fit(net, train, chunk_config(config, start, epochs), hooks=FitHooks(loss=terms)))
        cuts.append({"epoch": start + epochs, **{n: list(r) for n, r in cut_network(net, eps).items()}})
    final, spec, layers = finalize(net, full, guard, {"epsilon": eps, "guard": guard})
    report = {"weights": {"orth": orth, "sort": sort, "comp": comp, "eps": eps}, "cut_every": cut_every,
              "layers": {n: asdict(v) for n, v in layers.items()}, "cuts": cuts, "fit": histories}
    return DPRPClassifier(model=final.eval(), ranks=dict(spec.ranks), report=report)
