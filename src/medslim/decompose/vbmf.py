"""The ``vbmf`` rank policy: empirical variational Bayesian matrix factorisation (EVBMF) of
each mode unfolding (SPEC §1; Kim et al. 2016, tucker-cnn)."""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from medslim.decompose.ranks import MODES, check_modes, mode_channels, register_rank_policy
from medslim.decompose.tucker import mode_spectrum, unfold
from medslim.spec import LayerRanks


@register_rank_policy
@dataclass(frozen=True)
class VBMFRanks:
    """Per mode, the rank that empirical variational Bayesian matrix factorisation (EVBMF)
    estimates for the mode unfolding ``[C, numel / C]`` (``evbmf_rank``), clamped to
    ``[1, C]``: the rank selection of Kim et al. 2016 (ICLR, "Compression of deep
    convolutional neural networks for fast and low power mobile applications") and the
    tucker-cnn code. No parameter: the noise level is estimated from the spectrum itself.
    On the reference Hippocampus model it keeps 0–7 components per mode (1 after clamping;
    0.7 % of the convs' parameters): those spectra decay without a gap, which EVBMF reads as
    noise, so expect to fine-tune."""

    name: ClassVar[str] = "vbmf"

    def __call__(self, weight: Tensor, *, transposed: bool = False,
                 modes: Collection[str] = MODES) -> LayerRanks:
        check_modes(modes)
        r = {}
        for m in modes:
            c = mode_channels(weight, m, transposed)
            shape = tuple(unfold(weight, m, transposed=transposed).shape)
            r[m] = min(max(evbmf_rank_from_spectrum(mode_spectrum(weight, m, transposed=transposed), shape), 1), c)
        return LayerRanks(r.get("in"), r.get("out"))


def evbmf_rank(matrix: Tensor) -> int:
    """Rank of ``matrix`` ``[L, M]`` estimated by EVBMF: the number of components the
    global analytic EVB solution keeps, with the noise variance estimated as well
    (``evbmf_rank_from_spectrum`` on the singular values). 0 for a zero or pure-noise matrix.

    Written here because no maintained pip package offers EVBMF (the public ports are
    unpackaged scripts)."""
    m = matrix.detach().double()
    if m.dim() != 2:
        raise ValueError(f"evbmf_rank needs a matrix, got shape {tuple(m.shape)}")
    return evbmf_rank_from_spectrum(torch.linalg.svdvals(m), tuple(m.shape))


def evbmf_rank_from_spectrum(spectrum: Tensor, shape: Sequence[int]) -> int:
    """EVBMF rank from the singular values ``spectrum`` (descending) of an ``[L, M]`` matrix.

    Nakajima, Sugiyama, Babacan & Tomioka 2013, "Global analytic solution of fully-observed
    variational Bayesian matrix factorization", JMLR 14:1–37 (the EVB solution), and
    Nakajima, Tomioka, Sugiyama & Babacan 2015, "Condition for perfect dimensionality
    recovery by variational Bayesian PCA", JMLR 16 (the noise-variance objective and its
    bounds). With ``L ≤ M`` (else transposed), ``α = L/M``:

    - component ``h`` is kept iff ``γ_h² > M σ² x̄``, ``x̄ = (1 + τ̄)(1 + α/τ̄)``, ``τ̄`` the
      zero of ``Φ(τ) + Φ(τ/α)``, ``Φ(z) = log(1 + z)/z − 1/2`` (``τ̄ ≈ 2.5129 √α``);
    - ``σ²`` minimises ``Ω(σ²) = Σ_h ψ(γ_h²/(M σ²))``, ``ψ(x) = x − log x + [x > x̄] ψ₁(x)``,
      ``ψ₁(x) = log(τ + 1) + α log(τ/α + 1) − τ``,
      ``τ = τ(x) = (x − 1 − α + √((x − 1 − α)² − 4α)) / 2``, over
      ``[max(γ_{H̄+1}²/(M x̄), Σ_{h>H̄} γ_h²/(M(L − H̄))), Σ_h γ_h²/(LM)]``, ``H̄ = ⌈L/(1+α)⌉ − 1``
      (the largest rank EVB can return). Minimised on a log grid, then refined by bounded
      Brent around the best grid point (Ω need not be convex).
    """
    from scipy.optimize import brentq, minimize_scalar

    L, M = sorted(int(n) for n in shape)
    g2 = np.square(spectrum.detach().double().cpu().numpy()[:L])
    if L == 0 or not g2.sum() > 0:
        return 0
    alpha = L / M
    tau_bar = brentq(lambda t: _phi(t) + _phi(t / alpha), 1e-9, 1e9, xtol=1e-12)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_bar = math.ceil(L / (1 + alpha)) - 1
    upper = g2.sum() / (L * M)
    lower = max(g2[h_bar] / (M * x_bar), g2[h_bar:].sum() / (M * (L - h_bar))) if h_bar < L else 0.0
    if lower >= upper:
        sigma2 = upper
    else:
        grid = np.geomspace(lower, upper, 257)
        values = np.array([_evb_objective(s2, g2, M, alpha, x_bar) for s2 in grid])
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = minimize_scalar(lambda s2: _evb_objective(s2, g2, M, alpha, x_bar), bounds=(lo, hi), method="bounded",
                              options={"xatol": lo * 1e-10})
        sigma2 = float(res.x) if res.fun <= values[i] else float(grid[i])
    return int(np.count_nonzero(g2 > M * sigma2 * x_bar))


def _phi(z: float) -> float:
    return math.log1p(z) / z - 0.5


def _evb_objective(sigma2: float, g2: np.ndarray, m: int, alpha: float, x_bar: float) -> float:
    """``Ω(σ²)`` up to a constant: ``x − log x`` with ``log γ²`` dropped (zero singular values
    stay finite), plus ``ψ₁`` on the kept components."""
    x = g2 / (m * sigma2)
    value = float(x.sum() + len(g2) * math.log(sigma2))
    kept = x[x > x_bar]
    if kept.size:
        tau = 0.5 * (kept - 1 - alpha + np.sqrt(np.maximum((kept - 1 - alpha) ** 2 - 4 * alpha, 0.0)))
        value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return value
