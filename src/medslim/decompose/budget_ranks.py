"""Network-level rank policies that meet a global budget (SPEC §1; beyond the thesis):
``latency`` (measured time, ``LatencyBudgetRanks``) and ``budget`` (parameters or FLOPs,
``BudgetRanks``), both choosing per-layer ranks with ``greedy_budget``. They implement the
``plan`` protocol described in ``medslim.decompose.ranks``.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from torch import Tensor

from medslim.decompose.apply import conv_macs, tucker_params
from medslim.decompose.latency import LayerTimer
from medslim.decompose.ranks import (MODES, DFRanks, LayerSite, check_fraction, check_rank_multiple, finalize_ranks,
                                     mode_channels, register_rank_policy, round_rank)
from medslim.decompose.tucker import discarded_fraction, hosvd_error_grid, mode_spectrum
from medslim.errors import MedslimError, did_you_mean
from medslim.spec import LayerRanks


DF_CANDIDATES = (1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1)


@register_rank_policy
@dataclass(frozen=True)
class LatencyBudgetRanks:
    """Per-layer ranks that bring the measured time of the eligible convs down to ``budget``
    × their dense time, discarding as little spectral energy as possible (beyond the thesis).

    Per layer the options are: dense (time ``t_dense``, energy 0) and the Tucker form at each
    ``DF`` of ``candidates`` (ranks as the ``df`` policy, then ``rank_min``/``rank_multiple``),
    and the same ranks rounded up to each of ``try_multiples`` (oneDNN runs e.g. rank 40 up to
    4x faster than rank 39 on CPU; rounding up never discards more energy, so a rounded
    option is kept exactly where it measures faster), each with its measured time
    (``LayerTimer``, cached per device) and its discarded energy
    ``e = Σ_modes discarded fraction of Σσ²`` (the HOSVD bound on the squared relative error,
    Theorem 5.1). Choice: greedy (``greedy_budget``) — start dense everywhere, then repeatedly
    take the single-layer switch to a faster option with the least added energy per second
    saved, until the total is within the budget. Not optimal (a knapsack), but a layer only
    moves to options that save time, so the result never contains a Tucker form slower than
    its dense conv. ``budget = 1`` decomposes nothing. Ranks whose Tucker form has no fewer
    parameters than the conv (e.g. DF 0.7 on the 1-channel stem) are not options: the default
    ``params`` guard would refuse them and break the budget.

    Raises (in ``plan``):
        MedslimError: the budget is below what the fastest options reach.
    """

    name: ClassVar[str] = "latency"
    measures_latency: ClassVar[bool] = True
    budget: float
    candidates: tuple[float, ...] = DF_CANDIDATES
    try_multiples: tuple[int, ...] = (8,)

    def __post_init__(self) -> None:
        check_fraction("the latency budget", self.budget, "the fraction of the dense convs' measured time to reach")
        if isinstance(self.candidates, (str, bytes)) or not isinstance(self.candidates, Sequence) or not self.candidates:
            raise MedslimError(f"candidates must be a non-empty sequence of DFs in (0, 1], got {self.candidates!r}")
        for df in self.candidates:
            check_fraction("a candidate DF", df, "a rank ratio R/C")
        if isinstance(self.try_multiples, (str, bytes)) or not isinstance(self.try_multiples, Sequence):
            raise MedslimError(f"try_multiples must be a sequence of integers ≥ 1, got {self.try_multiples!r}")
        for m in self.try_multiples:
            check_rank_multiple(m)
        object.__setattr__(self, "candidates", tuple(float(d) for d in self.candidates))
        object.__setattr__(self, "try_multiples", tuple(self.try_multiples))

    def __call__(self, weight: Tensor, *, transposed: bool = False, modes: Collection[str] = MODES) -> LayerRanks:
        raise MedslimError("the 'latency' rank policy chooses the ranks of all layers at once; use it through "
                           "decompose_network(..., input_shape=...) or compress_network")

    def plan(self, sites: Mapping[str, LayerSite], *, timer: LayerTimer, rank_min: int = 1,
             rank_multiple: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, LayerRanks | None]:
        options: dict[str, list[tuple[float, float]]] = {}
        choices: dict[str, list[LayerRanks | None]] = {}
        for name, site in sites.items():
            if progress is not None:
                progress(name)
            choices[name], options[name] = self._layer_options(site, timer, rank_min, rank_multiple)
        dense = sum(opts[0][0] for opts in options.values())
        fastest = sum(min(t for t, _ in opts) for opts in options.values())
        target = self.budget * dense
        if fastest > target:
            raise MedslimError(f"latency budget {self.budget:g} is out of reach: the dense convs take {dense:.3g} s "
                               f"and the fastest candidate ranks {fastest:.3g} s ({fastest / dense:.2f} of dense); "
                               f"use a budget ≥ {math.ceil(fastest / dense * 100) / 100:.2f} or smaller candidate DFs")
        picked = greedy_budget(options, target)
        return {name: choices[name][i] for name, i in picked.items()}

    def _layer_options(self, site: LayerSite, timer: LayerTimer, rank_min: int,
                       rank_multiple: int) -> tuple[list[LayerRanks | None], list[tuple[float, float]]]:
        """Option 0 is dense; then one per distinct candidate rank pair: ``(seconds, energy)``."""
        conv = site.conv
        dense_params = sum(p.numel() for p in conv.parameters())
        w, transposed = conv.weight.detach(), bool(conv.transposed)
        spectra = {m: mode_spectrum(w, m, transposed=transposed) for m in site.modes}
        # lcm: a rounded rank must stay a multiple of the user's rank_multiple
        multiples = dict.fromkeys((rank_multiple, *(math.lcm(rank_multiple, m) for m in self.try_multiples)))
        ranks: list[LayerRanks | None] = [None]
        opts = [(timer.layer_seconds(conv, site.spatial), 0.0)]
        for df, multiple in ((df, m) for df in self.candidates for m in multiples):
            r = finalize_ranks(DFRanks(df)(w, transposed=transposed, modes=site.modes), conv.in_channels,
                               conv.out_channels, rank_min=rank_min, rank_multiple=multiple)
            if r in ranks or tucker_params(conv, r) >= dense_params:
                continue
            energy = sum(discarded_fraction(spectra[m], rank) for m, rank in (("in", r.rank_in), ("out", r.rank_out))
                         if rank is not None)
            ranks.append(r)
            opts.append((timer.layer_seconds(conv, site.spatial, r), energy))
        return ranks, opts


def greedy_budget(options: Mapping[str, Sequence[tuple[float, float]]], budget: float) -> dict[str, int]:
    """Index of one option per layer with ``Σ cost ≤ budget``, greedily.

    ``options[name]`` = ``[(cost, energy), …]`` (cost: seconds, parameters or FLOPs), option 0
    the starting point. Each step switches one layer to a cheaper option, the one with the
    least ``Δenergy / Δcost`` (ties: more cost saved, then network order), until the budget
    holds or nothing is cheaper. Each step lowers the total, so this ends after at most
    ``Σ len(options)`` steps.
    """
    picked = {name: 0 for name in options}
    total = sum(opts[0][0] for opts in options.values())
    while total > budget:
        best: tuple[float, float, str, int] | None = None
        for name, opts in options.items():
            t0, e0 = opts[picked[name]]
            for i, (t, e) in enumerate(opts):
                if t < t0:
                    cand = ((e - e0) / (t0 - t), -(t0 - t), name, i)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
        if best is None:
            break
        _, _, name, i = best
        total += options[name][i][0] - options[name][picked[name]][0]
        picked[name] = i
    return picked


BUDGET_TARGETS = ("params", "flops")


@register_rank_policy
@dataclass(frozen=True)
class BudgetRanks:
    """Per-layer ranks that bring the eligible convs' parameters (``target="params"``) or
    FLOPs at the model's patch (``"flops"``) down to ``budget`` × their dense total with the
    least total discarded spectral energy (SPEC §1; beyond the thesis).

    Options per layer: dense (energy 0) and every rank pair ``finalize_ranks`` can give (each
    mode from ``rank_min`` up in steps of ``rank_multiple``, capped at C) whose Tucker form has
    fewer parameters and fewer MACs than the conv, so the ``params`` and ``params+flops`` guards
    keep it; of those, only pairs that no other pair beats on both cost and energy. Energy:
    the discarded spectral energy of the HOSVD, exactly (``hosvd_error_grid``: the squared
    relative error ``‖W − Ŵ‖²/‖W‖²``), not ``latency``'s sum of per-mode discarded fractions:
    that bound exceeds 1 at small ranks and made the greedy pick lopsided pairs such as
    ``[64, 1]`` at a 10 % budget. With one truncated mode both are the discarded fraction.
    Choice: ``greedy_budget`` down from dense until the total fits, then single rank steps
    back up, most energy regained per unit of cost first, while they still fit. So the
    result is within one rank step of the budget: one more rank step on any decomposed layer
    (to dense where the stepped pair would be refused) would exceed it. FLOPs are ``conv_macs`` at
    each layer's input shape: conv arithmetic, exact for these layers and cheap on every rank
    pair (torch's ``FlopCounterMode`` needs one forward pass per pair).

    Raises (in ``plan``):
        MedslimError: the budget is below what the smallest ranks reach.
    """

    name: ClassVar[str] = "budget"
    measures_latency: ClassVar[bool] = False
    budget: float
    target: str = "params"

    def __post_init__(self) -> None:
        check_fraction("the budget", self.budget, f"the fraction of the dense convs' {self.target} to keep")
        if self.target not in BUDGET_TARGETS:
            raise MedslimError(f"unknown budget target {self.target!r}"
                               f"{did_you_mean(str(self.target), BUDGET_TARGETS)}; choose one of {', '.join(BUDGET_TARGETS)}")

    def __call__(self, weight: Tensor, *, transposed: bool = False, modes: Collection[str] = MODES) -> LayerRanks:
        raise MedslimError("the 'budget' rank policy chooses the ranks of all layers at once; use it through "
                           "decompose_network(..., input_shape=...) or compress_network")

    def plan(self, sites: Mapping[str, LayerSite], *, timer: LayerTimer | None = None, rank_min: int = 1,
             rank_multiple: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, LayerRanks | None]:
        layers: dict[str, _LayerGrid] = {}
        for name, site in sites.items():
            if progress is not None:
                progress(name)
            layers[name] = _LayerGrid(site, self.target, rank_min, rank_multiple)
        options = {name: layer.frontier() for name, layer in layers.items()}
        dense = sum(layer.dense_cost for layer in layers.values())
        smallest = sum(min(c for c, _, _ in opts) for opts in options.values())
        target = self.budget * dense
        if smallest > target:
            need = math.ceil(smallest / dense * 1000) / 1000
            raise MedslimError(f"{self.target} budget {self.budget:g} is out of reach: the smallest ranks (rank_min "
                               f"{rank_min}) keep {smallest / dense:.3f} of the eligible convs' dense {self.target}; "
                               f"use a budget ≥ {need:.3f} or a smaller rank_min")
        picked = greedy_budget({n: [(c, e) for c, e, _ in opts] for n, opts in options.items()}, target)
        state = {name: options[name][i][2] for name, i in picked.items()}
        state = _fill_budget(layers, state, target)
        return {name: layers[name].ranks(idx) for name, idx in state.items()}


class _LayerGrid:
    """One layer's rank grid for ``BudgetRanks``. A state is ``None`` (dense) or one grid
    index per mode; cost, discarded energy and validity are evaluated on index arrays."""

    def __init__(self, site: LayerSite, target: str, rank_min: int, rank_multiple: int) -> None:
        conv = site.conv
        w, transposed = conv.weight.detach(), bool(conv.transposed)
        self.site, self.target = site, target
        self.grids = {m: np.array(rank_grid(mode_channels(w, m, transposed), rank_min=rank_min, multiple=rank_multiple))
                      for m in site.modes}
        self.error = hosvd_error_grid(w, site.modes, transposed=transposed).numpy()  # [C_m…], index R − 1
        self.dense_params = sum(p.numel() for p in conv.parameters())
        self.dense_macs = self._macs(None)
        self.dense_cost = float(self.dense_params if target == "params" else self.dense_macs)

    def ranks(self, idx: Mapping[str, Any] | None) -> LayerRanks | None:
        if idx is None:
            return None
        r = {m: self.grids[m][idx[m]] for m in self.site.modes}
        return LayerRanks(*(None if r.get(m) is None else (int(r[m]) if np.ndim(r[m]) == 0 else r[m])
                            for m in ("in", "out")))

    def evaluate(self, idx: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cost, energy, valid)`` of the rank pairs at grid indices ``idx`` (arrays, one per mode)."""
        ranks = self.ranks(idx)
        params, macs = np.asarray(tucker_params(self.site.conv, ranks)), np.asarray(self._macs(ranks))
        energy = self.error[tuple(self.grids[m][idx[m]] - 1 for m in self.site.modes)]
        cost = params if self.target == "params" else macs
        return cost.astype(float), np.asarray(energy, float), (params < self.dense_params) & (macs < self.dense_macs)

    def frontier(self) -> list[tuple[float, float, dict[str, int] | None]]:
        """Dense first, then the valid pairs no other pair beats on both cost and energy:
        ``[(cost, energy, state)]``."""
        axes = np.meshgrid(*(np.arange(len(self.grids[m])) for m in self.site.modes), indexing="ij")
        idx = {m: a.ravel() for m, a in zip(self.site.modes, axes)}
        cost, energy, valid = self.evaluate(idx)
        keep = np.flatnonzero(valid)
        order = keep[np.lexsort((energy[keep], cost[keep]))]
        best = np.minimum.accumulate(energy[order]) if len(order) else order
        better = np.ones(len(order), bool)
        better[1:] = energy[order][1:] < best[:-1]
        out: list[tuple[float, float, dict[str, int] | None]] = [(self.dense_cost, 0.0, None)]
        for i in order[better]:
            out.append((float(cost[i]), float(energy[i]), {m: int(idx[m][i]) for m in self.site.modes}))
        return out

    def steps_up(self, state: dict[str, int] | None) -> list[tuple[float, float, dict[str, int] | None]]:
        """``[(Δcost, Δenergy, new state)]`` of one rank step up in each mode that is below C
        (to dense where the stepped pair would be refused: dense then costs no more)."""
        if state is None:
            return []
        cost, energy, _ = self.evaluate({m: np.array([i]) for m, i in state.items()})
        out = []
        for m in self.site.modes:
            if state[m] + 1 >= len(self.grids[m]):
                continue
            new = {**state, m: state[m] + 1}
            c, e, ok = self.evaluate({k: np.array([i]) for k, i in new.items()})
            c1, e1, s1 = (float(c[0]), float(e[0]), new) if ok[0] else (self.dense_cost, 0.0, None)
            out.append((c1 - float(cost[0]), e1 - float(energy[0]), s1))
        return out

    def _macs(self, ranks: LayerRanks | None):
        return conv_macs(self.site.conv, ranks, self.site.spatial)


def _fill_budget(layers: Mapping[str, _LayerGrid], state: dict[str, dict[str, int] | None],
                 target: float) -> dict[str, dict[str, int] | None]:
    """Single rank steps up while the total cost stays ≤ ``target``: the step regaining the
    most energy per unit of cost first (ties: network order)."""
    total = sum(layers[n].dense_cost if s is None else float(layers[n].evaluate(
        {m: np.array([i]) for m, i in s.items()})[0][0]) for n, s in state.items())
    while True:
        best: tuple[float, str, float, dict[str, int] | None] | None = None
        for name, layer in layers.items():
            for d_cost, d_energy, new in layer.steps_up(state[name]):
                if d_cost <= 0 or total + d_cost > target:
                    continue
                gain = -d_energy / d_cost
                if best is None or gain > best[0]:
                    best = (gain, name, d_cost, new)
        if best is None:
            return state
        _, name, d_cost, new = best
        state[name] = new
        total += d_cost


def rank_grid(channels: int, *, rank_min: int = 1, multiple: int = 1) -> list[int]:
    """Every rank ``round_rank`` can return for ``channels`` channels, ascending: one rank
    step apart (``multiple``), from ``max(rank_min, …)`` up to ``channels``."""
    return sorted({round_rank(r, channels, rank_min=rank_min, multiple=multiple) for r in range(1, channels + 1)})
