"""Rank policies: how many components each channel mode of a conv keeps (SPEC §1).

A policy is a small frozen dataclass, built by name with ``get_rank_policy(name, **params)``
(parameters are validated there, before any layer is touched) and called per layer::

    policy(weight, *, transposed=False, modes=("in", "out")) -> LayerRanks

``weight`` is the conv weight (``[C_out, C_in, k…]``, or ``[C_in, C_out, k…]`` when
``transposed``); a mode not in ``modes`` gets rank ``None`` (left dense). Policies return
ranks in ``[1, C]``; ``decompose_network`` then applies ``rank_min``. ``vbmf`` and
``budget`` (SPEC §1) are not implemented yet; register them here with
``@register_rank_policy``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from medslim.decompose.tucker import mode_axis, mode_spectrum
from medslim.errors import MedslimError, did_you_mean
from medslim.spec import LayerRanks

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
