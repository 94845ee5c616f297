"""Tucker-2 decomposition of a convolution along its two channel modes (SPEC §1).

Weight layouts: ``Conv{1,2,3}d.weight = W[C_out, C_in, k…]``;
``ConvTranspose{1,2,3}d.weight = W[C_in, C_out, k…]`` (``transposed=True``). The spatial
modes are never decomposed: ``W ≈ G ×_out U_out ×_in U_in`` with ``U_in ∈ R^{C_in×R_in}``,
``U_out ∈ R^{C_out×R_out}`` and the core ``G`` in the layer's own layout
(``[R_out, R_in, k…]``, or ``[R_in, R_out, k…]`` when transposed).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.errors import MedslimError

METHODS = ("hosvd", "hooi")
# tensorly 0.10's partial_tucker uses a full SVD in every iteration (its ``svd`` argument
# only reaches the initialisation), so iterations cost ~0.1 s for a 320-channel layer.
_HOOI_ITERS = 50
_HOOI_TOL = 1e-7  # on the change of the relative error between iterations


@dataclass(frozen=True)
class Tucker2Factors:
    """Factors of one layer, in the dtype of the input weight.

    ``core``: ``[R_out, R_in, k…]`` (``[R_in, R_out, k…]`` when transposed), with ``R = C``
    for a mode that is not decomposed. ``u_in``: ``[C_in, R_in]`` or ``None``; ``u_out``:
    ``[C_out, R_out]`` or ``None``. ``rel_error = ‖W − Ŵ‖_F / ‖W‖_F`` (0 for a zero
    weight). ``discarded_energy``: per mode (``"in"``, ``"out"``), the fraction of the squared
    singular values of that mode's unfolding that the rank drops (0 if not decomposed).
    """

    core: Tensor
    u_in: Tensor | None
    u_out: Tensor | None
    rel_error: float
    discarded_energy: dict[str, float]

    @property
    def rank_in(self) -> int | None:
        return None if self.u_in is None else self.u_in.shape[1]

    @property
    def rank_out(self) -> int | None:
        return None if self.u_out is None else self.u_out.shape[1]


def mode_axis(mode: str, *, transposed: bool) -> int:
    """Weight axis of a channel mode: ``"out"`` → 0 (1 if transposed), ``"in"`` → 1 (0)."""
    if mode not in ("in", "out"):
        raise ValueError(f"mode must be 'in' or 'out', got {mode!r}")
    return int((mode == "in") != transposed)


def unfold(weight: Tensor, mode: str, *, transposed: bool = False) -> Tensor:
    """Mode unfolding ``[C_mode, numel / C_mode]`` of a conv weight."""
    axis = mode_axis(mode, transposed=transposed)
    return weight.movedim(axis, 0).reshape(weight.shape[axis], -1)


def mode_svd(weight: Tensor, mode: str, *, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """Singular values ``[C]`` (descending) and left singular vectors ``[C, C]`` of the mode
    unfolding, in float64; ``C`` = channels of that mode (zeros pad a short unfolding)."""
    # eigh of the C×C Gram matrix: ~15x faster than an SVD of the C×(C'·k) unfolding (0.05 s
    # vs 0.7 s at 320×8640). Squaring the condition number only blurs singular values below
    # ~1e-8·σ_max, far below any truncation, and the eigenvectors stay orthonormal, so a
    # full-rank decomposition is still exact.
    m = unfold(weight.detach().double(), mode, transposed=transposed)
    eigvals, vecs = torch.linalg.eigh(m @ m.T)
    return eigvals.flip(0).clamp_min(0).sqrt(), vecs.flip(1)


def mode_spectrum(weight: Tensor, mode: str, *, transposed: bool = False) -> Tensor:
    """Singular values ``[C]`` (float64, descending) of the mode unfolding."""
    m = unfold(weight.detach().double(), mode, transposed=transposed)
    return torch.linalg.eigvalsh(m @ m.T).flip(0).clamp_min(0).sqrt()


def discarded_fraction(spectrum: Tensor, rank: int) -> float:
    """Fraction of ``Σσ²`` carried by the singular values beyond ``rank`` (0 for a zero weight)."""
    energy = spectrum.square()
    total = float(energy.sum())
    return float(energy[rank:].sum()) / total if total > 0 else 0.0


def hosvd_error_grid(weight: Tensor, modes: Sequence[str] = ("in", "out"), *, transposed: bool = False) -> Tensor:
    """Squared relative error ``‖W − Ŵ‖² / ‖W‖²`` of the truncated HOSVD at every rank
    combination of ``modes``: float64 ``[C_m1, C_m2]`` (or ``[C_m]``), entry ``[R₁−1, R₂−1]``.

    Exact, not Theorem 5.1's bound ``Σ_n`` (discarded fraction of mode n): the HOSVD factors at
    rank R are the first R columns of the full ones, so the truncated core is a corner of the
    full-rank core ``G = W ×_out U_outᵀ ×_in U_inᵀ`` and ``‖W − Ŵ‖² = ‖W‖² − ‖G[:R_1, :R_2]‖²``.
    All zeros for a zero weight."""
    w = weight.detach().double()
    core = _project(w, {m: mode_svd(w, m, transposed=transposed)[1] for m in modes}, transposed=transposed)
    axes = [mode_axis(m, transposed=transposed) for m in modes]
    energy = core.square().movedim(axes, list(range(len(axes)))).reshape(*(core.shape[a] for a in axes), -1).sum(-1)
    kept = energy
    for axis in range(len(axes)):
        kept = kept.cumsum(axis)
    total = float(energy.sum())
    return (1 - kept / total).clamp_min(0) if total > 0 else torch.zeros_like(kept)


def tucker2_factors(weight: Tensor, rank_in: int | None, rank_out: int | None, *,
                    transposed: bool = False, method: str = "hosvd") -> Tucker2Factors:
    """Tucker-2 factors of a conv weight (computed in float64, returned in ``weight.dtype``).

    ``method="hosvd"``: truncated HOSVD, ``U_n`` = top-``R_n`` left singular vectors of the
    mode-n unfolding and ``G = W ×_out U_outᵀ ×_in U_inᵀ``; then
    ``‖W − Ŵ‖² ≤ Σ_n Σ_{i>R_n} σ_{n,i}²`` (thesis Theorem 5.1). ``method="hooi"``: tensorly's
    ``partial_tucker`` (HOOI initialised with the HOSVD), never worse than HOSVD in Frobenius
    error. A ``None`` rank leaves that mode alone (identity factor, core not rotated).

    Raises:
        MedslimError: unknown method, both ranks ``None``, or a rank outside ``[1, C]``.
    """
    if method not in METHODS:
        raise MedslimError(f"unknown decomposition method '{method}'; choose one of {', '.join(METHODS)}")
    if weight.dim() < 3:
        raise MedslimError(f"expected a conv weight [C, C, k…], got shape {tuple(weight.shape)}")
    w = weight.detach().double()
    ranks = {"in": rank_in, "out": rank_out}
    channels = {m: w.shape[mode_axis(m, transposed=transposed)] for m in ranks}
    modes = [m for m, r in ranks.items() if r is not None]
    if not modes:
        raise MedslimError("Tucker-2 needs at least one rank; both rank_in and rank_out are None")
    for m in modes:
        if not isinstance(ranks[m], int) or not 1 <= ranks[m] <= channels[m]:
            raise MedslimError(f"rank_{m}={ranks[m]!r} is outside [1, {channels[m]}], the layer's "
                               f"number of {m}put channels; choose a rank in that range or None")
    svds = {m: mode_svd(w, m, transposed=transposed) for m in modes}
    discarded = {m: (discarded_fraction(svds[m][0], ranks[m]) if m in modes else 0.0) for m in ranks}
    if method == "hosvd" or not _hooi_can_improve(w, ranks, modes, transposed=transposed):
        factors = {m: svds[m][1][:, :ranks[m]].contiguous() for m in modes}
        core = _project(w, factors, transposed=transposed)
    else:
        core, factors = _hooi(w, ranks, modes, transposed=transposed)
    approx = _expand(core, factors, transposed=transposed)
    norm = float(torch.linalg.vector_norm(w))
    rel = float(torch.linalg.vector_norm(w - approx)) / norm if norm > 0 else 0.0
    out = weight.dtype
    return Tucker2Factors(
        core=core.to(out),
        u_in=factors["in"].to(out) if "in" in factors else None,
        u_out=factors["out"].to(out) if "out" in factors else None,
        rel_error=rel, discarded_energy=discarded)


def _mode_product(t: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """``t ×_axis matrix``: contracts axis of ``t`` (size ``matrix.shape[1]``) with ``matrix``."""
    return torch.tensordot(matrix, t.movedim(axis, 0), dims=([1], [0])).movedim(0, axis)


def _project(w: Tensor, factors: dict[str, Tensor], *, transposed: bool) -> Tensor:
    for m, u in factors.items():
        w = _mode_product(w, u.T, mode_axis(m, transposed=transposed))
    return w


def _expand(core: Tensor, factors: dict[str, Tensor], *, transposed: bool) -> Tensor:
    for m, u in factors.items():
        core = _mode_product(core, u, mode_axis(m, transposed=transposed))
    return core


def _hooi_can_improve(w: Tensor, ranks: dict[str, int | None], modes: list[str], *, transposed: bool) -> bool:
    """HOSVD is already optimal with one truncated mode (Eckart–Young) or when a rank reaches
    its unfolding's rank bound (that projection is then the identity on W)."""
    bounds = {m: min(unfold(w, m, transposed=transposed).shape) for m in modes}
    return len(modes) == 2 and all(ranks[m] < bounds[m] for m in modes)


def _hooi(w: Tensor, ranks: dict[str, int | None], modes: list[str], *,
          transposed: bool) -> tuple[Tensor, dict[str, Tensor]]:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    modes = sorted(modes, key=lambda m: mode_axis(m, transposed=transposed))  # tensorly wants ascending modes
    axes = [mode_axis(m, transposed=transposed) for m in modes]
    with tl.backend_context("pytorch"):
        (core, us), _ = partial_tucker(w, rank=[ranks[m] for m in modes], modes=axes, init="svd",
                                       n_iter_max=_HOOI_ITERS, tol=_HOOI_TOL, svd=_gram_svd)
    return core, dict(zip(modes, us))


def _gram_svd(matrix: Tensor, n_eigenvecs: int | None = None, **_: object) -> tuple[Tensor, Tensor, Tensor]:
    """tensorly-compatible truncated SVD ``U [C, R], S [R], Vᵀ [R, N]`` via the C×C Gram
    matrix (see ``mode_svd``); used for HOOI's HOSVD initialisation."""
    eigvals, vecs = torch.linalg.eigh(matrix @ matrix.T)
    r = matrix.shape[0] if n_eigenvecs is None else n_eigenvecs
    u = vecs.flip(1)[:, :r]
    s = eigvals.flip(0)[:r].clamp_min(0).sqrt()
    vt = (u.T @ matrix) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return u, s, vt


class TuckerConv(nn.Sequential):
    """A convolution replaced by ``reduce → core → restore`` (SPEC §1).

    - ``reduce``: ``ConvNd(C_in → R_in, 1, bias=False)``, weight ``U_inᵀ``; absent if ``rank_in is None``.
    - ``core``: same type as the original (``ConvNd`` or ``ConvTransposeNd``) ``R_in → R_out``
      with the original kernel/stride/padding/dilation/output_padding, ``groups=1``, no bias.
    - ``restore``: ``ConvNd(R_out → C_out, 1)``, weight ``U_out``, the original bias; absent if
      ``rank_out is None`` (then ``core`` carries the bias).

    The projections are ordinary convolutions even for a transposed layer. ``in_channels``
    and ``out_channels`` follow the children (so stay right after pruning); ``stride``,
    ``kernel_size``, ``padding``, ``dilation`` are the original conv's.
    """

    def __init__(self, conv: _ConvNd, rank_in: int | None, rank_out: int | None) -> None:
        _check_conv(conv)
        c_in, c_out = conv.in_channels, conv.out_channels
        for what, r, c in (("input", rank_in, c_in), ("output", rank_out, c_out)):
            if r is not None and (not isinstance(r, int) or not 1 <= r <= c):
                raise MedslimError(f"rank {r!r} is outside [1, {c}] for the {c} {what} channels of a "
                                   f"{type(conv).__name__}")
        if rank_in is None and rank_out is None:
            raise MedslimError("Tucker-2 needs at least one rank; both rank_in and rank_out are None")
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        point = _pointwise_type(conv)
        r_in, r_out = rank_in or c_in, rank_out or c_out
        has_bias = conv.bias is not None
        core_kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       padding_mode=conv.padding_mode, bias=has_bias and rank_out is None, **kw)
        if conv.transposed:
            core_kw["output_padding"] = conv.output_padding
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if rank_in is not None:
            layers["reduce"] = point(c_in, rank_in, 1, bias=False, **kw)
        layers["core"] = type(conv)(r_in, r_out, conv.kernel_size, **core_kw)
        if rank_out is not None:
            layers["restore"] = point(rank_out, c_out, 1, bias=has_bias, **kw)
        super().__init__(layers)
        self.transposed = bool(conv.transposed)
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.train(conv.training)

    @property
    def in_channels(self) -> int:
        return (self.reduce if "reduce" in self._modules else self.core).in_channels

    @property
    def out_channels(self) -> int:
        return (self.restore if "restore" in self._modules else self.core).out_channels

    @property
    def ranks(self) -> tuple[int | None, int | None]:
        """Current ``(rank_in, rank_out)``; ``None`` for a mode without projection."""
        return (self.reduce.out_channels if "reduce" in self._modules else None,
                self.restore.in_channels if "restore" in self._modules else None)

    @classmethod
    def empty_like(cls, conv: _ConvNd, rank_in: int | None, rank_out: int | None) -> "TuckerConv":
        """Structure only (default-initialised weights), to be filled by ``load_state_dict``."""
        return cls(conv, rank_in, rank_out)

    @classmethod
    def from_conv(cls, conv: _ConvNd, rank_in: int | None, rank_out: int | None,
                  method: str = "hosvd") -> tuple["TuckerConv", Tucker2Factors]:
        """Decompose ``conv``; returns the module and its factors (see ``tucker2_factors``)."""
        module = cls(conv, rank_in, rank_out)
        f = tucker2_factors(conv.weight, rank_in, rank_out, transposed=bool(conv.transposed), method=method)
        spatial = (1,) * (conv.weight.dim() - 2)
        with torch.no_grad():
            module.core.weight.copy_(f.core)
            if f.u_in is not None:
                module.reduce.weight.copy_(f.u_in.T.reshape(*f.u_in.T.shape, *spatial))
            if f.u_out is not None:
                module.restore.weight.copy_(f.u_out.reshape(*f.u_out.shape, *spatial))
            if conv.bias is not None:
                (module.restore if f.u_out is not None else module.core).bias.copy_(conv.bias)
        return module, f


def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, _ConvNd) or isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise MedslimError(f"Tucker-2 needs an initialised Conv/ConvTranspose layer, got {type(conv).__name__}")
    if conv.groups != 1:
        raise MedslimError(f"Tucker-2 of grouped convolutions is not supported (groups={conv.groups})")


def _pointwise_type(conv: _ConvNd) -> type[_ConvNd]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[conv.weight.dim() - 3]
