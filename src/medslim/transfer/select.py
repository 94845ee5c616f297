"""Turn a per-layer divergence table into the set of layers to fine-tune (SPEC §5 step 4),
plus the layer sets of the last-k and random-k baselines.

Selections are returned highest divergence first; layers with NaN divergence rank last.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from medslim.errors import MedslimError, did_you_mean

RULES = ("top_k", "percentile")
SCOPES = ("global", "blockwise")


def _table(div: pd.DataFrame | Mapping[str, float]) -> pd.DataFrame:
    if isinstance(div, pd.DataFrame):
        table = div
    else:
        table = pd.DataFrame({"layer": list(div), "divergence": [float(v) for v in div.values()]})
    if len(table) == 0:
        raise MedslimError("no candidate layers to select from (the model has no conv/linear layer besides its head)")
    return table


def _ranked(table: pd.DataFrame) -> list[str]:
    order = table.assign(_nan=table["divergence"].isna()).sort_values(
        ["_nan", "divergence"], ascending=[True, False], kind="stable")
    return list(order["layer"])


def check_k(k: int, n: int, what: str = "candidate layers") -> None:
    """Raise MedslimError unless 1 ≤ k ≤ n."""
    if k < 1:
        raise MedslimError(f"k must be ≥ 1, got {k}")
    if k > n:
        raise MedslimError(f"k = {k} exceeds the {n} {what} of the model; choose k in 1..{n}")


def top_k(div: pd.DataFrame | Mapping[str, float], k: int) -> list[str]:
    """The ``k`` layers with the highest divergence."""
    table = _table(div)
    check_k(k, len(table))
    return _ranked(table)[:k]


def percentile(div: pd.DataFrame | Mapping[str, float], q: float) -> list[str]:
    """Layers whose divergence is ≥ the ``q``-th percentile (``q`` in [0, 100]) of all layers."""
    table = _table(div)
    if not 0 <= q <= 100:
        raise MedslimError(f"percentile must be in [0, 100], got {q}")
    values = table["divergence"].to_numpy(dtype=float)
    if np.isnan(values).all():
        raise MedslimError("every layer's divergence is undefined (all-zero weights)")
    threshold = np.nanpercentile(values, q)
    by_layer = dict(zip(table["layer"], values))
    return [n for n in _ranked(table) if by_layer[n] >= threshold]


def select_layers(div: pd.DataFrame | Mapping[str, float], rule: str = "top_k", k: int = 3, q: float = 90.0,
                  scope: str = "global") -> list[str]:
    """Apply ``rule`` (``top_k`` | ``percentile``) over all layers (``global``) or within each stage
    (``blockwise``: top-k per stage, capped at the stage's size, or the percentile per stage).

    Raises:
        MedslimError: unknown rule/scope, no layers, ``k`` out of range, blockwise without stages.
    """
    if rule not in RULES:
        raise MedslimError(f"unknown selection rule '{rule}'; use {' | '.join(RULES)}{did_you_mean(rule, RULES)}")
    if scope not in SCOPES:
        raise MedslimError(f"unknown scope '{scope}'; use {' | '.join(SCOPES)}{did_you_mean(scope, SCOPES)}")
    table = _table(div)
    if scope == "global":
        return top_k(table, k) if rule == "top_k" else percentile(table, q)
    if "stage" not in table.columns:
        raise MedslimError("blockwise selection needs a 'stage' column (use layer_divergences)")
    groups = [g for _, g in table.groupby("stage", sort=False)]
    if rule == "top_k":
        check_k(k, max(len(g) for g in groups), "layers of the largest stage")
        chosen = {n for g in groups for n in _ranked(g)[:k]}
    else:
        chosen = {n for g in groups if not g["divergence"].isna().all() for n in percentile(g, q)}
    return [n for n in _ranked(table) if n in chosen]


def last_k(layers: Sequence[str], k: int) -> list[str]:
    """The last ``k`` of ``layers`` (module order), last first."""
    check_k(k, len(layers))
    return list(reversed(layers[-k:]))


def random_k(layers: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` of ``layers`` drawn without replacement by ``numpy.random.default_rng(seed)``."""
    check_k(k, len(layers))
    idx = np.random.default_rng(seed).choice(len(layers), size=k, replace=False)
    return [layers[i] for i in idx]


def check_layers(model: nn.Module, layers: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """``layers`` unchanged if every one is a candidate layer of ``model``.

    Raises:
        MedslimError: naming the first requested layer the model does not have.
    """
    if not layers:
        raise MedslimError("no layers requested")
    for n in layers:
        if n not in candidates:
            raise MedslimError(f"{type(model).__name__} has no candidate layer '{n}'{did_you_mean(n, candidates)} "
                               f"({len(candidates)} conv/linear layers besides the head)")
    return list(layers)
