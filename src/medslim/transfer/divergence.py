"""Per-layer divergence between source and fine-tuned weights (SPEC §5, thesis Algorithm 1).

A layer's weight ``[F, ...]`` is reshaped to ``[F, D]`` (one row per output filter). Each row
becomes a distribution over its ``D`` entries, ``P(i) = (|w_i| + ε) / Σ_j (|w_j| + ε)`` in
float64 with ``ε = 1e-12·max|w|`` over the layer; rows that are all zero in either tensor are
skipped. A measure maps two such ``[F, D]`` arrays to ``[F]`` per-filter values; the layer's
divergence is their mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from medslim.classify.models import head_name
from medslim.errors import MedslimError, did_you_mean

MeasureFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # ([F, D], [F, D]) -> [F]
DIRECTIONS = ("t||s", "s||t")
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Measure:
    """``fn(p, q)`` gives per-filter values of ``D(p ‖ q)``; ``symmetric`` measures ignore direction."""

    name: str
    fn: MeasureFn
    symmetric: bool
    doc: str


MEASURES: dict[str, Measure] = {}


def register_measure(name: str, symmetric: bool) -> Callable[[MeasureFn], MeasureFn]:
    """Decorator: add ``fn`` to :data:`MEASURES` under ``name``."""
    def wrap(fn: MeasureFn) -> MeasureFn:
        MEASURES[name] = Measure(name, fn, symmetric, (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def get_measure(name: str) -> Measure:
    if name not in MEASURES:
        raise MedslimError(f"unknown divergence measure '{name}'; use {' | '.join(MEASURES)}"
                           f"{did_you_mean(name, list(MEASURES))}")
    return MEASURES[name]


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    # 0·log(0/q) = 0; with ε > 0 every entry is positive, so this only guards ε = 0 cases
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=1)


@register_measure("kl", symmetric=False)
def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Kullback–Leibler KL(p‖q) = Σ p log(p/q) in nats, per row."""
    return _kl_rows(p, q)


@register_measure("js", symmetric=True)
def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2, in nats, per row."""
    m = 0.5 * (p + q)
    return 0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)


@register_measure("w1", symmetric=True)
def w1(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Wasserstein-1 between the values of p and of q as 1-D samples, per row.

    Equals ``scipy.stats.wasserstein_distance(p[f], q[f])``: for two samples of equal size the
    optimal coupling matches sorted values, so W1 = mean |sort(p) − sort(q)| (vectorised here
    because scipy loops one filter at a time).
    """
    return np.abs(np.sort(p, axis=1) - np.sort(q, axis=1)).mean(axis=1)


@register_measure("frobenius", symmetric=True)
def frobenius(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Euclidean distance ‖p − q‖₂ per row (the thesis' "Frobenius" measure)."""
    return np.sqrt(((p - q) ** 2).sum(axis=1))


def filter_distributions(w: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[F, ...]`` weights → (``[F, D]`` float64 row distributions, ``[F]`` bool "row not all zero")."""
    a = np.abs(np.asarray(w.detach().cpu().double() if isinstance(w, torch.Tensor) else w, dtype=np.float64))
    a = a.reshape(a.shape[0], -1)
    nonzero = (a > 0).any(axis=1)
    a = a + 1e-12 * (a.max() if a.size else 0.0)
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0), nonzero


def per_filter(w_source: torch.Tensor | np.ndarray, w_tuned: torch.Tensor | np.ndarray, measure: str = "kl",
               direction: str = "t||s") -> np.ndarray:
    """Per-filter divergence ``[F']`` over the filters that are non-zero in both tensors.

    ``direction`` ``"t||s"`` gives ``D(P_t ‖ P_s)`` (SPEC default), ``"s||t"`` gives ``D(P_s ‖ P_t)``.

    Raises:
        MedslimError: unknown measure or direction, shapes that differ.
    """
    m = get_measure(measure)
    if direction not in DIRECTIONS:
        raise MedslimError(f"unknown direction '{direction}'; use {' | '.join(DIRECTIONS)}")
    if tuple(w_source.shape) != tuple(w_tuned.shape):
        raise MedslimError(f"weight shapes differ: source {tuple(w_source.shape)}, tuned {tuple(w_tuned.shape)}")
    ps, nz_s = filter_distributions(w_source)
    pt, nz_t = filter_distributions(w_tuned)
    keep = nz_s & nz_t
    ps, pt = ps[keep], pt[keep]
    return m.fn(pt, ps) if direction == "t||s" else m.fn(ps, pt)


def layer_divergence(w_source: torch.Tensor | np.ndarray, w_tuned: torch.Tensor | np.ndarray,
                     measure: str = "kl", direction: str = "t||s") -> float:
    """Mean per-filter divergence of one layer; NaN when every filter is all-zero in one of the two."""
    values = per_filter(w_source, w_tuned, measure, direction)
    return float(values.mean()) if values.size else float("nan")


def candidate_layers(model: nn.Module, head: str | None = None) -> list[str]:
    """Conv/Linear module names in module order, without the classifier head."""
    head = head if head is not None else head_name(model)
    return [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and n != head
            and getattr(m, "weight", None) is not None]


def stages(model: nn.Module, layers: list[str]) -> dict[str, str]:
    """Stage of each layer: its top-level child (``conv1``, ``layer1`` … for ResNets); inside a
    top-level ``nn.Sequential`` with pooling children (VGG ``features``), the pooling-separated
    block, e.g. ``features/2``."""
    out = {}
    for name in layers:
        top, _, rest = name.partition(".")
        child = getattr(model, top, None)
        if isinstance(child, nn.Sequential) and rest:
            idx = int(rest.split(".")[0]) if rest.split(".")[0].isdigit() else None
            pools = [i for i, m in enumerate(child) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
            if idx is not None and pools:
                out[name] = f"{top}/{sum(1 for p in pools if p < idx)}"
                continue
        out[name] = top
    return out


def layer_divergences(source_model: nn.Module, tuned_model: nn.Module, measure: str = "kl",
                      direction: str = "t||s") -> pd.DataFrame:
    """One row per candidate layer (module order) with columns ``layer, index, stage, type,
    filters, filters_used, params, divergence``.

    Raises:
        MedslimError: unknown measure/direction, a model without candidate layers, layers or
            shapes that differ between the two models.
    """
    get_measure(measure)
    layers = candidate_layers(source_model)
    if not layers:
        raise MedslimError(f"{type(source_model).__name__} has no convolution or linear layer besides its head")
    tuned = dict(tuned_model.named_modules())
    src = dict(source_model.named_modules())
    missing = [n for n in layers if n not in tuned]
    if missing:
        raise MedslimError(f"the fine-tuned model lacks layer '{missing[0]}' of the source model")
    stage = stages(source_model, layers)
    rows = []
    for i, n in enumerate(layers):
        ws, wt = src[n].weight, tuned[n].weight
        values = per_filter(ws, wt, measure, direction)
        rows.append({"layer": n, "index": i, "stage": stage[n], "type": type(src[n]).__name__,
                     "filters": int(ws.shape[0]), "filters_used": int(values.size), "params": int(ws.numel()),
                     "divergence": float(values.mean()) if values.size else float("nan")})
    return pd.DataFrame(rows)
