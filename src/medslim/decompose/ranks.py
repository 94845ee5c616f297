"""Rank policies: how many components each channel mode of a conv keeps (SPEC §1).

A policy is a small frozen dataclass, built by name with ``get_rank_policy(name, **params)``
(parameters are validated there, before any layer is touched) and called per layer::

    policy(weight, *, transposed=False, modes=("in", "out")) -> LayerRanks

``weight`` is the conv weight (``[C_out, C_in, k…]``, or ``[C_in, C_out, k…]`` when
``transposed``); a mode not in ``modes`` gets rank ``None`` (left dense). Policies return
ranks in ``[1, C]``; ``decompose_network`` then applies ``finalize_ranks`` (``rank_min``,
then rounding up to ``rank_multiple``).

A *network-level* policy (one that must see every layer at once, e.g. to meet a global
budget) also has a ``plan`` method; ``decompose_network`` calls it once, before touching
any layer, instead of calling the policy per layer::

    policy.plan(sites, *, timer, rank_min, rank_multiple, progress=None) -> {name: LayerRanks | None}

``sites`` maps each eligible conv's name to a ``LayerSite`` (the conv, the modes it may
decompose, its input shape for the model's patch); ``None`` keeps that layer dense. Layers
missing from the result are kept dense too. ``latency`` is such a policy. ``vbmf`` and the
parameter/FLOP ``budget`` (SPEC §1) are not implemented yet; register them here with
``@register_rank_policy``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.tucker import discarded_fraction, mode_axis, mode_spectrum
from medslim.errors import MedslimError, did_you_mean
from medslim.spec import LayerRanks

if TYPE_CHECKING:
    from medslim.decompose.latency import LayerTimer

MODES = ("in", "out")
RankPolicy = Callable[..., LayerRanks]
RANK_POLICIES: dict[str, type] = {}


def register_rank_policy(cls: type) -> type:
    """Class decorator: register a policy dataclass under its ``name`` class attribute."""
    RANK_POLICIES[cls.name] = cls
    return cls


def get_rank_policy(name: str, **params: Any) -> RankPolicy:
    """Build the policy ``name`` with ``params`` (e.g. ``get_rank_policy("df", df=0.3)``).

    Raises:
        MedslimError: unknown name (with a "did you mean"), missing/unknown parameters, or an
            invalid value.
    """
    cls = RANK_POLICIES.get(name)
    if cls is None:
        raise MedslimError(f"unknown rank policy '{name}' (available: {', '.join(sorted(RANK_POLICIES))})"
                           f"{did_you_mean(str(name), list(RANK_POLICIES))}")
    sig = inspect.signature(cls)
    try:
        sig.bind(**params)
    except TypeError as e:
        raise MedslimError(f"rank policy '{name}' takes {', '.join(sig.parameters)}; got "
                           f"{', '.join(params) or 'no parameters'} ({e})") from e
    return cls(**params)


def _channels(weight: Tensor, mode: str, transposed: bool) -> int:
    return weight.shape[mode_axis(mode, transposed=transposed)]


def _check_modes(modes: Collection[str]) -> None:
    if not set(modes) <= set(MODES):
        raise ValueError(f"modes must be a subset of {MODES}, got {tuple(modes)}")


def _fraction(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise MedslimError(f"{name} must be a number in (0, 1] ({what}), got {value!r}")
    return float(value)


@register_rank_policy
@dataclass(frozen=True)
class DFRanks:
    """Uniform rank ratio (thesis "downsampling factor"): ``R_n = clamp(ceil(df·C_n), 1, C_n)``."""

    name: ClassVar[str] = "df"
    df: float

    def __post_init__(self) -> None:
        _fraction("DF", self.df, "the rank ratio R/C; the thesis grid is 0.9 … 0.05")

    def __call__(self, weight: Tensor, *, transposed: bool = False,
                 modes: Collection[str] = MODES) -> LayerRanks:
        _check_modes(modes)
        # round() first so that e.g. 0.7·30 = 21.000000000000004 does not become 22
        r = {m: min(max(math.ceil(round(self.df * _channels(weight, m, transposed), 9)), 1),
                    _channels(weight, m, transposed)) for m in modes}
        return LayerRanks(r.get("in"), r.get("out"))


@register_rank_policy
@dataclass(frozen=True)
class EnergyRanks:
    """Smallest rank per mode keeping a fraction ``energy`` of ``Σσ²`` of the mode unfolding
    (the "spectral knee" of thesis Remark 5.2). A zero weight gets rank 1."""

    name: ClassVar[str] = "energy"
    energy: float

    def __post_init__(self) -> None:
        _fraction("energy", self.energy, "the fraction of spectral energy each mode keeps")

    def __call__(self, weight: Tensor, *, transposed: bool = False,
                 modes: Collection[str] = MODES) -> LayerRanks:
        _check_modes(modes)
        r = {m: energy_rank(mode_spectrum(weight, m, transposed=transposed), self.energy) for m in modes}
        return LayerRanks(r.get("in"), r.get("out"))


def energy_rank(spectrum: Tensor, energy: float) -> int:
    """Smallest ``R ≥ 1`` with ``Σ_{i≤R} σ_i² ≥ energy · Σ σ²`` (``spectrum`` descending)."""
    cum = spectrum.double().square().cumsum(0)
    if cum[-1] <= 0:
        return 1
    # relative slack so that energy = 1 does not fail on the last ulp of the cumulative sum
    target = energy * float(cum[-1]) * (1 - 1e-12)
    return min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1, len(cum))


# --- rank post-processing ------------------------------------------------------------------

def round_rank(rank: int | None, channels: int, *, rank_min: int = 1, multiple: int = 1) -> int | None:
    """``clamp(rank, rank_min, C)``, then rounded up to a multiple of ``multiple`` and capped
    at ``C`` (so ``C`` itself is allowed when it is not a multiple). ``None`` stays ``None``."""
    if rank is None:
        return None
    r = min(max(int(rank), rank_min), channels)
    return min(math.ceil(r / multiple) * multiple, channels)


def finalize_ranks(ranks: LayerRanks, c_in: int, c_out: int, *, rank_min: int = 1,
                   rank_multiple: int = 1) -> LayerRanks:
    """A policy's ranks as ``decompose_network`` uses them (``round_rank`` per mode)."""
    return LayerRanks(round_rank(ranks.rank_in, c_in, rank_min=rank_min, multiple=rank_multiple),
                      round_rank(ranks.rank_out, c_out, rank_min=rank_min, multiple=rank_multiple))


def check_rank_multiple(value: Any) -> int:
    """``value`` if it is an integer ≥ 1, else ``MedslimError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MedslimError(f"rank_multiple must be an integer ≥ 1 (e.g. 8 rounds every rank up to a multiple of 8), "
                           f"got {value!r}")
    return value


# --- network-level policies ----------------------------------------------------------------

@dataclass(frozen=True)
class LayerSite:
    """One eligible conv as a network-level policy sees it: the conv, the channel modes it
    may decompose (``("out",)`` for the stem) and its input shape ``[1, C_in, *spatial]``
    for one patch."""

    conv: _ConvNd
    modes: tuple[str, ...]
    input_shape: tuple[int, ...]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.input_shape[2:])


@runtime_checkable
class NetworkRankPolicy(Protocol):
    """A policy that chooses all layers' ranks at once (see the module docstring)."""

    def plan(self, sites: Mapping[str, LayerSite], *, timer: "LayerTimer", rank_min: int = 1,
             rank_multiple: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, LayerRanks | None]:
        ...


def is_network_policy(policy: object) -> bool:
    return isinstance(policy, NetworkRankPolicy)


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
    budget: float
    candidates: tuple[float, ...] = DF_CANDIDATES
    try_multiples: tuple[int, ...] = (8,)

    def __post_init__(self) -> None:
        _fraction("the latency budget", self.budget, "the fraction of the dense convs' measured time to reach")
        if isinstance(self.candidates, (str, bytes)) or not isinstance(self.candidates, Sequence) or not self.candidates:
            raise MedslimError(f"candidates must be a non-empty sequence of DFs in (0, 1], got {self.candidates!r}")
        for df in self.candidates:
            _fraction("a candidate DF", df, "a rank ratio R/C")
        if isinstance(self.try_multiples, (str, bytes)) or not isinstance(self.try_multiples, Sequence):
            raise MedslimError(f"try_multiples must be a sequence of integers ≥ 1, got {self.try_multiples!r}")
        for m in self.try_multiples:
            check_rank_multiple(m)
        object.__setattr__(self, "candidates", tuple(float(d) for d in self.candidates))
        object.__setattr__(self, "try_multiples", tuple(self.try_multiples))

    def __call__(self, weight: Tensor, *, transposed: bool = False, modes: Collection[str] = MODES) -> LayerRanks:
        raise MedslimError("the 'latency' rank policy chooses the ranks of all layers at once; use it through "
                           "decompose_network(..., input_shape=...) or compress_network")

    def plan(self, sites: Mapping[str, LayerSite], *, timer: "LayerTimer", rank_min: int = 1,
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

    def _layer_options(self, site: LayerSite, timer: "LayerTimer", rank_min: int,
                       rank_multiple: int) -> tuple[list[LayerRanks | None], list[tuple[float, float]]]:
        """Option 0 is dense; then one per distinct candidate rank pair: ``(seconds, energy)``."""
        from medslim.decompose.apply import tucker_params  # apply imports this module

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
    """Index of one option per layer with ``Σ seconds ≤ budget``, greedily.

    ``options[name]`` = ``[(seconds, energy), …]``, option 0 the starting point. Each step
    switches one layer to a faster option, the one with the least ``Δenergy / Δseconds``
    (ties: more seconds saved, then network order), until the budget holds or nothing is
    faster. Each step lowers the total, so this ends after at most ``Σ len(options)`` steps.
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
