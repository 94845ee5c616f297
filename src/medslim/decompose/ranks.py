"""Rank policies: how many components each channel mode of a conv keeps (SPEC §1).

This module holds the registry, the per-layer protocol, the per-layer policies ``df`` and
``energy``, the network-level protocol (``LayerSite``, ``NetworkRankPolicy``) and the helpers
the policies share (``round_rank``, ``finalize_ranks``, ``check_rank_multiple``, …). The other
policies live in ``budget_ranks`` (``latency``, ``budget``, ``greedy_budget``) and ``vbmf``
(``vbmf``); importing ``medslim.decompose`` registers them all.

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
missing from the result are kept dense too. ``latency`` (measured time) and ``budget``
(parameters or FLOPs) are such policies; ``timer`` is a ``LayerTimer`` only for a policy whose
class attribute ``measures_latency`` is true, else ``None``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.tucker import mode_axis, mode_spectrum
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


def mode_channels(weight: Tensor, mode: str, transposed: bool) -> int:
    """Channels of ``mode`` (``"in"``/``"out"``) of a conv weight (``transposed``: ``[C_in, C_out, k…]``)."""
    return weight.shape[mode_axis(mode, transposed=transposed)]


def check_modes(modes: Collection[str]) -> None:
    """``ValueError`` unless ``modes`` is a subset of ``MODES``."""
    if not set(modes) <= set(MODES):
        raise ValueError(f"modes must be a subset of {MODES}, got {tuple(modes)}")


def check_fraction(name: str, value: Any, what: str) -> float:
    """``value`` as a float if it is a number in (0, 1], else ``MedslimError`` naming ``name`` and ``what``."""
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
        check_fraction("DF", self.df, "the rank ratio R/C; the thesis grid is 0.9 … 0.05")

    def __call__(self, weight: Tensor, *, transposed: bool = False,
                 modes: Collection[str] = MODES) -> LayerRanks:
        check_modes(modes)
        # round() first so that e.g. 0.7·30 = 21.000000000000004 does not become 22
        r = {m: min(max(math.ceil(round(self.df * mode_channels(weight, m, transposed), 9)), 1),
                    mode_channels(weight, m, transposed)) for m in modes}
        return LayerRanks(r.get("in"), r.get("out"))


@register_rank_policy
@dataclass(frozen=True)
class EnergyRanks:
    """Smallest rank per mode keeping a fraction ``energy`` of ``Σσ²`` of the mode unfolding
    (the "spectral knee" of thesis Remark 5.2). A zero weight gets rank 1."""

    name: ClassVar[str] = "energy"
    energy: float

    def __post_init__(self) -> None:
        check_fraction("energy", self.energy, "the fraction of spectral energy each mode keeps")

    def __call__(self, weight: Tensor, *, transposed: bool = False,
                 modes: Collection[str] = MODES) -> LayerRanks:
        check_modes(modes)
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
