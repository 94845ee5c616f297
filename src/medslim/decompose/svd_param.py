"""A convolution parametrised by trained SVD factors, and DPRP's losses and rank cut
(Sharma et al. 2025, "CNN compression via Dynamic Parameter Rank Pruning", §III; SPEC §8).

The weight is matricised along its output mode, ``W_(out) = U diag(s) Vᵀ`` with
``U [C_out, r]``, ``s [r]``, ``V [C_in·prod(k), r]`` (rows of ``V`` ordered ``(c_in, k…)``, as
``weight.reshape``). This is not the paper's matricisation (eq. 1 reshapes ``K`` into
``[S·C, L₁L₂]``, so ``r ≤ k²``): ours is the one that maps onto ``TuckerConv(rank_in=None,
rank_out=r)`` — a k-conv ``C_in → r`` (weight ``diag(s)Vᵀ``) then a 1×1 conv ``r → C_out``
(weight ``U``) — so a trained model is written with the spec's existing ``ranks`` record and
costs ``r·(C_in·prod(k) + C_out)`` parameters.

Losses, as read in the paper (``σ`` = ``s``; every term is the per-layer value; the paper
averages each over the ``L`` factorised layers, see ``medslim.finetune.dprp``):

- eq. 10, orthogonality: ``(‖UᵀU − I‖_F + ‖VᵀV − I‖_F) / r²`` — Frobenius norms, not
  squared, as printed.
- eq. 11, sorting: ``χ(γ)·Σ_{j<r} max(0, σ_{j+1} − σ_j) + χ(η)·Σ_{j≤r} max(0, −σ_j)``,
  ``γ`` = number of out-of-order pairs, ``η`` = number of negative values, ``χ(a) = 1/a``
  (0 for a = 0). Reading: the printed second sum stops at ``r−1``; we sum all ``r`` values, since
  ``η`` counts every negative entry.
- rank ``τ`` (§III-C3): printed as "the highest i for which ``|σ_{i+1}| > ε|σ_i|`` ∀ i".
  Reading: the ratio chain is unbroken up to ``τ``; ``τ`` = the first ``j`` with
  ``|σ_{j+1}| ≤ ε|σ_j|`` (``r`` if there is none), on the values ordered by ``|σ|``
  descending (the sorting loss only encourages that order; a permutation of the components
  does not change the layer).
- eq. 12, compression: ``Σ_{i=τ..r} |σ_i| / ((r − τ + 1)·‖σ‖₂)``. Reading: the printed
  divisor ``r − τ`` is 0 whenever nothing lies below the threshold; ``r − τ + 1`` is the number
  of terms summed, so the smallest kept value is always pushed towards the cut.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.tucker import TuckerConv
from medslim.errors import MedslimError


class SVDConv(nn.Module):
    """``ConvNd``/``ConvTransposeNd`` with weight ``W_(out) = U diag(s) Vᵀ``.

    Parameters ``u [C_out, r]``, ``s [r]``, ``v [C_in·prod(k), r]``, ``bias [C_out]`` (if the
    conv had one). Forward: ``[B, C_in, *S]`` → k-conv (transposed if the original was) with
    weight ``diag(s)Vᵀ`` → ``[B, r, *S']`` → 1×1 conv with ``U`` + bias → ``[B, C_out, *S']``.
    """

    def __init__(self, conv: _ConvNd, rank: int) -> None:
        super().__init__()
        _check(conv)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.transposed = bool(conv.transposed)
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = conv.padding, tuple(conv.dilation)
        self.output_padding = tuple(conv.output_padding)
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        fan = self.in_channels * math.prod(self.kernel_size)
        if not 1 <= rank <= min(self.out_channels, fan):
            raise MedslimError(f"SVD rank {rank} is outside [1, {min(self.out_channels, fan)}] for a "
                               f"{self.out_channels}×{fan} weight matrix")
        self.u = nn.Parameter(torch.zeros(self.out_channels, rank, **kw))
        self.s = nn.Parameter(torch.zeros(rank, **kw))
        self.v = nn.Parameter(torch.zeros(fan, rank, **kw))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._template = type(conv)  # for to_tucker / to_conv

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @classmethod
    def from_conv(cls, conv: _ConvNd) -> "SVDConv":
        """Full-rank ``r = min(C_out, C_in·prod(k))`` SVD of ``conv`` (computed in float64)."""
        w = _unfold_out(conv.weight.detach().double(), transposed=bool(conv.transposed))
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        module = cls(conv, s.shape[0])
        with torch.no_grad():
            module.u.copy_(u)
            module.s.copy_(s)
            module.v.copy_(vt.T)
        return module

    def core_weight(self) -> Tensor:
        """``diag(s)Vᵀ`` in the conv's layout: ``[r, C_in, k…]`` (transposed: ``[C_in, r, k…]``)."""
        core = (self.v * self.s).T.reshape(self.rank, self.in_channels, *self.kernel_size)
        return core.transpose(0, 1) if self.transposed else core

    def weight(self) -> Tensor:
        """The dense weight ``U diag(s) Vᵀ`` in the conv's layout."""
        w = (self.u * self.s) @ self.v.T  # [C_out, C_in·k]
        w = w.reshape(self.out_channels, self.in_channels, *self.kernel_size)
        return w.transpose(0, 1) if self.transposed else w

    def forward(self, x: Tensor) -> Tensor:
        dim = len(self.kernel_size)
        if self.transposed:
            conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]
            h = conv_t(x, self.core_weight(), None, self.stride, self.padding, self.output_padding, 1, self.dilation)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
            h = conv(x, self.core_weight(), None, self.stride, self.padding, self.dilation)
        point = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
        return point(h, self.u.reshape(*self.u.shape, *(1,) * dim), self.bias)

    def _like(self) -> _ConvNd:
        """A conv of the original type and hyper-parameters (default weights)."""
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                  device=self.s.device, dtype=self.s.dtype)
        if self.transposed:
            kw["output_padding"] = self.output_padding
        return self._template(self.in_channels, self.out_channels, self.kernel_size, **kw)

    @torch.no_grad()
    def to_conv(self) -> _ConvNd:
        """The dense conv ``U diag(s) Vᵀ`` (for layers whose factored form is not smaller)."""
        conv = self._like()
        conv.weight.copy_(self.weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    @torch.no_grad()
    def to_tucker(self) -> TuckerConv:
        """``TuckerConv(rank_in=None, rank_out=r)``: core = ``diag(s)Vᵀ``, restore = ``U`` (+ bias)."""
        tucker = TuckerConv(self._like(), None, self.rank)
        tucker.core.weight.copy_(self.core_weight())
        tucker.restore.weight.copy_(self.u.reshape(*self.u.shape, *(1,) * len(self.kernel_size)))
        if self.bias is not None:
            tucker.restore.bias.copy_(self.bias)
        return tucker


def cut_rank(module: SVDConv, rank: int) -> SVDConv:
    """A new ``SVDConv`` keeping the ``rank`` components of largest ``|s|``.

    Raises:
        MedslimError: ``rank`` outside ``[1, module.rank]``.
    """
    if not 1 <= rank <= module.rank:
        raise MedslimError(f"cannot cut an SVD layer of rank {module.rank} to rank {rank}")
    keep = order(module.s)[:rank]
    new = SVDConv(module._like(), rank)
    with torch.no_grad():
        new.u.copy_(module.u[:, keep])
        new.s.copy_(module.s[keep])
        new.v.copy_(module.v[:, keep])
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.train(module.training)
    return new


def order(s: Tensor) -> Tensor:
    """Indices ``[r]`` sorting ``|s|`` in descending order (stable)."""
    return torch.sort(s.detach().abs(), descending=True, stable=True).indices


def ratio_rank(s: Tensor, eps: float) -> int:
    """DPRP's kept rank τ: with ``a = |s|`` sorted descending, the first ``j`` (1-based) with
    ``a_{j+1} ≤ eps·a_j``, else ``r``. Zeros after a non-zero value are always cut."""
    a = s.detach().abs().sort(descending=True).values
    small = (a[1:] <= eps * a[:-1]).nonzero()
    return int(small[0]) + 1 if len(small) else len(a)


def orthogonality_loss(u: Tensor, v: Tensor) -> Tensor:
    """Eq. 10 for one layer: ``(‖UᵀU − I‖_F + ‖VᵀV − I‖_F) / r²``; ``u [m, r]``, ``v [n, r]``."""
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    return (torch.linalg.matrix_norm(u.T @ u - eye) + torch.linalg.matrix_norm(v.T @ v - eye)) / r ** 2


def sorting_loss(s: Tensor) -> Tensor:
    """Eq. 11 for one layer: mean rise over out-of-order neighbours plus mean magnitude of the
    negative values (each term 0 when there are none); ``s [r]`` in stored order."""
    rise = (s[1:] - s[:-1]).clamp_min(0)
    neg = (-s).clamp_min(0)
    gamma, eta = int((rise > 0).sum()), int((neg > 0).sum())
    out = s.new_zeros(())
    if gamma:
        out = out + rise.sum() / gamma
    if eta:
        out = out + neg.sum() / eta
    return out


def compression_loss(s: Tensor, eps: float) -> Tensor:
    """Eq. 12 for one layer: ``Σ_{i≥τ} |σ_i| / ((r − τ + 1)·‖σ‖₂)`` over ``|s|`` ordered
    descending, ``τ = ratio_rank(s, eps)``; 0 for an all-zero ``s``."""
    norm = torch.linalg.vector_norm(s)
    if float(norm.detach()) == 0:
        return norm
    tau = ratio_rank(s, eps)
    tail = s[order(s)[tau - 1:]]
    return tail.abs().sum() / (len(tail) * norm)


def _unfold_out(weight: Tensor, *, transposed: bool) -> Tensor:
    """``W_(out) [C_out, C_in·prod(k)]`` (columns ordered ``(c_in, k…)``)."""
    w = weight.transpose(0, 1) if transposed else weight
    return w.reshape(w.shape[0], -1)


def _check(conv: nn.Module) -> None:
    if not isinstance(conv, _ConvNd):
        raise MedslimError(f"the SVD parametrisation needs a Conv/ConvTranspose layer, got {type(conv).__name__}")
    if conv.groups != 1:
        raise MedslimError(f"the SVD parametrisation of grouped convolutions is not supported (groups={conv.groups})")
    if conv.padding_mode != "zeros":
        raise MedslimError(f"the SVD parametrisation supports padding_mode 'zeros' only, got '{conv.padding_mode}'")
    if isinstance(conv.padding, str) and conv.transposed:
        raise MedslimError("string padding is not supported for transposed convolutions")
