"""The linearised network through which HVS-type scores flow backwards.

A deep copy of the model in which every linear module ``f`` (convolution, transposed
convolution, Linear, average/max pooling, adaptive pooling, upsampling) is replaced by a
:class:`Linearised` module with ``f_abs`` = ``f`` with weights ``|W|`` and no bias, and whose
backward is one step of the recursion (SPEC §2), with ``D = f_abs(1)`` the fan-in mass:

- ``hvs``:      ``S_in = vjpₓ(f_abs)(S_out / D)``   (rows of P sum to 1: mass is conserved)
- ``nisp``:     ``S_in = vjpₓ(f_abs)(S_out)``       (``|A|ᵀ S_out``)
- ``consumer``: ``S_in = vjpₓ(f_abs)(1)`` for weighted modules (the incoming score is dropped,
  so a channel receives the column L1 norms of its direct consumers; see ``consumer_l1``).

Normalisation layers, activations and dropout become identities. Fan-outs and concatenations
are then handled by autograd (scores add at fan-outs and split along channels at concatenations);
residual additions — any addition of two feature maps, found while the forward pass runs
(:mod:`medslim.score.residual`), whatever block class or library wrote it — give each addend
weight ½, and squeeze-excitation gates are skipped (scores pass through the gated map). The
forward pass carries ones (every ``hvs`` step maps ones to ones), so functional ReLUs called
inside ``forward`` pass scores unchanged; values never influence the backward pass, which only
depends on shapes.

``channel`` engine: convolutions become 1-voxel channel maps ``P̄[o, c] = Σ_a |W[o, c, a]|``
(transposed convolutions likewise from ``W[c, o, a]``); fixed-size pooling and upsampling
become identities, so a ``(1, C, 1, …, 1)`` input stays 1 voxel everywhere.

A CP block (``CPDConv``) is linearised as one convolution with the non-negative weight
``W⁺[o, c, k…] = Σ_r |c_{o,c,r}| Π_d |a_{d,o,k_d,r}|`` (so ``P̄[o, c] = Σ_r |c_{o,c,r}| Π_d Σ_k
|a_{d,o,k,r}|``): every path through its projection, axis convs and rank sum, weighted as HVS
weights a dense conv's taps. Linearising its parts one by one would normalise each rank-1 term
on its own and copy the block's score to all ``R`` terms.
"""
from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.dropout import _DropoutNd

from medslim.decompose.cp import CPDConv, cp_weight
from medslim.errors import MedslimError
from medslim.score.residual import ResidualAdditions

Rule = Literal["hvs", "nisp", "consumer"]
Engine = Literal["channel", "spatial"]

_ACTIVATIONS = tuple(c for c in vars(nn.modules.activation).values()
                     if isinstance(c, type) and issubclass(c, nn.Module)
                     and c not in (nn.Module, nn.MultiheadAttention))
# modules that keep every channel in place (norms, dropout, activations); the Taylor criterion
# reads a layer's channels after them
PASS_THROUGH = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, _DropoutNd,
                 *_ACTIVATIONS)
_MAX_TO_AVG = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
_ADAPTIVE = {nn.AdaptiveAvgPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d: nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d: nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d,
             nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


class _Op:
    """One linear map ``A ≥ 0`` of the linearised network; subclasses give shape, ``D``, vjp."""

    def __init__(self, rule: Rule, weighted: bool):
        self.rule, self.weighted = rule, weighted

    def out_shape(self, in_shape: torch.Size, like: Tensor) -> torch.Size:
        raise NotImplementedError

    def fan_in(self, in_shape: torch.Size, like: Tensor) -> Tensor:
        """``D = A·1`` for a batch of 1: ``(1, *out_shape[1:])``."""
        raise NotImplementedError

    def vjp(self, g: Tensor, in_shape: torch.Size) -> Tensor:
        """``Aᵀ g``: ``out_shape`` → ``in_shape``."""
        raise NotImplementedError

    def step(self, g: Tensor, in_shape: torch.Size) -> Tensor:
        if self.rule == "hvs":
            d = self.fan_in(in_shape, g)
            g = g / d.masked_fill_(d <= 0, float("inf"))  # D = 0: all-zero row, nothing to pass on
        elif self.rule == "consumer" and self.weighted:
            g = torch.ones_like(g)
        return self.vjp(g, in_shape)


class _ConvOp(_Op):
    """``f_abs`` of a (transposed) convolution with zero padding: weight ``[O, C/g, k…]`` or,
    transposed, ``[C, O/g, k…]``."""

    def __init__(self, weight: Tensor, stride, padding, dilation, transposed: bool,
                 output_padding, groups: int, rule: Rule):
        super().__init__(rule, weighted=True)
        self.w = weight
        self.args = (list(stride), list(padding), list(dilation), transposed, list(output_padding))
        self.groups = groups

    def _conv(self, x: Tensor, w: Tensor, groups: int) -> Tensor:
        return torch.ops.aten.convolution(x, w, None, *self.args, groups)

    def out_shape(self, in_shape, like):
        meta = torch.empty(in_shape, device="meta", dtype=self.w.dtype)
        return self._conv(meta, self.w.to("meta"), self.groups).shape

    def fan_in(self, in_shape, like):
        transposed = self.args[3]
        if transposed and self.groups > 1:
            return self._conv(like.new_ones((1, *in_shape[1:])), self.w, self.groups)
        # all input channels carry ones, so summing the weight over them gives D from one channel
        w1 = self.w.sum(0 if transposed else 1, keepdim=True)
        return self._conv(like.new_ones((1, 1, *in_shape[2:])), w1, 1)

    def vjp(self, g, in_shape):
        dummy = g.new_empty(1).expand(in_shape)
        return torch.ops.aten.convolution_backward(g, dummy, self.w, None, *self.args, self.groups,
                                                   (True, False, False))[0]


class _FnOp(_Op):
    """``f_abs`` given as a function (Linear, pooling, upsampling, exotic padding)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], rule: Rule, weighted: bool):
        super().__init__(rule, weighted)
        self.fn = fn

    def fan_in(self, in_shape, like):
        return self.fn(like.new_ones((1, *in_shape[1:])))

    def out_shape(self, in_shape, like):
        return torch.Size((in_shape[0], *self.fan_in(in_shape, like).shape[1:]))

    def vjp(self, g, in_shape):
        with torch.enable_grad():
            z = g.new_zeros(in_shape, requires_grad=True)
            return torch.autograd.grad(self.fn(z), z, g)[0]


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, op: _Op) -> Tensor:
        ctx.op, ctx.in_shape = op, x.shape
        return x.new_ones(op.out_shape(x.shape, x))

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.op.step(g.contiguous(), ctx.in_shape), None


class Linearised(nn.Module):
    """Stand-in for one linear module of the original network (same module name)."""

    def __init__(self, op: _Op, source: str):
        super().__init__()
        self.op, self.source = op, source

    def forward(self, x: Tensor) -> Tensor:
        return _Step.apply(x, self.op)

    def extra_repr(self) -> str:
        return f"{self.source}, rule={self.op.rule}"


def channel_matrix(conv: _ConvNd) -> Tensor:
    """``P̄[o, c] = Σ_a |W[o, c, a]|`` as a dense ``[C_out, C_in]`` matrix (groups block-diagonal)."""
    w = conv.weight.detach().abs().flatten(2).sum(2)  # [O, C/g] or, transposed, [C, O/g]
    if isinstance(conv, _ConvTransposeNd):
        return torch.block_diag(*(b.T for b in w.chunk(conv.groups, dim=0)))
    return torch.block_diag(*w.chunk(conv.groups, dim=0))


def _conv_replacement(m: _ConvNd, engine: Engine, rule: Rule, dtype: torch.dtype,
                      scale: Tensor | None, matrix: Tensor | None = None) -> _Op:
    nd = m.weight.dim() - 2
    if engine == "channel":
        p = channel_matrix(m).to(dtype) if matrix is None else matrix.to(dtype)
        if scale is not None:
            p = p * scale.to(dtype)[None, :]
        return _ConvOp(p.reshape(*p.shape, *[1] * nd), [1] * nd, [0] * nd, [1] * nd, False,
                       [0] * nd, 1, rule)
    w = m.weight.detach().abs().to(dtype)
    transposed = isinstance(m, _ConvTransposeNd)
    if transposed or (not isinstance(m.padding, str) and m.padding_mode == "zeros"):
        return _ConvOp(w, m.stride, m.padding, m.dilation, transposed,
                       m.output_padding if transposed else [0] * nd, m.groups, rule)
    return _FnOp(lambda x: m._conv_forward(x, w, None), rule, weighted=True)


def cp_dense(block: CPDConv) -> _ConvNd:
    """A dense convolution with ``block``'s geometry and weight ``W⁺`` ``[C_out, C_in, k…]``
    (module docstring), on ``block``'s device; for linearising only."""
    channel, spatial = block.factors()
    w = cp_weight(channel.abs(), tuple(a.abs() for a in spatial))
    conv = type(block.project)(block.in_channels, block.out_channels, block.kernel_size, stride=block.stride,
                               padding=block.padding, dilation=block.dilation, bias=False,
                               padding_mode=block.axes[0].padding_mode, device="meta")
    conv.weight = nn.Parameter(w, requires_grad=False)
    return conv


def _replacement(name: str, m: nn.Module, engine: Engine, rule: Rule, dtype: torch.dtype,
                 scale: Tensor | None, matrix: Tensor | None = None) -> nn.Module | None:
    """The stand-in for leaf module ``m`` (or a ``CPDConv``), or ``None`` to keep it
    (shape-only modules)."""
    kind = type(m).__name__
    if isinstance(m, CPDConv):
        return Linearised(_conv_replacement(cp_dense(m), engine, rule, dtype, scale, matrix), kind)
    if isinstance(m, _ConvNd):
        return Linearised(_conv_replacement(m, engine, rule, dtype, scale, matrix), kind)
    if isinstance(m, nn.Linear):
        w = (m.weight.detach().abs() if matrix is None else matrix).to(dtype)
        if scale is not None:
            w = w * scale.to(dtype)[None, :]
        return Linearised(_FnOp(lambda x: F.linear(x, w), rule, weighted=True), kind)
    if type(m) in _ADAPTIVE:
        return Linearised(_FnOp(_ADAPTIVE[type(m)](m.output_size), rule, weighted=False), kind)
    if type(m) in _MAX_TO_AVG or isinstance(m, (*_AVG_POOLS, nn.Upsample)):
        if engine == "channel":
            return nn.Identity()
        if type(m) in _MAX_TO_AVG:
            dilation = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
            if m.return_indices or any(d != 1 for d in dilation):
                raise MedslimError(f"cannot linearise {kind} '{name}' with dilation or return_indices")
            m = _MAX_TO_AVG[type(m)](m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                     count_include_pad=False)
        return Linearised(_FnOp(m, rule, weighted=False), kind)
    if isinstance(m, PASS_THROUGH):
        return nn.Identity()
    if any(True for _ in m.parameters(recurse=False)):
        raise MedslimError(f"HVS scoring does not know how to linearise {kind} ('{name}'); "
                           f"supported: convolutions, Linear, pooling, upsampling, norms, activations")
    return None


def _with_residual_rule(net: nn.Module, weight: float) -> nn.Module:
    """``net`` whose forward runs under :class:`~medslim.score.residual.ResidualAdditions` (each
    addend of a residual addition gets ``weight`` of the sum's score; SE gates are skipped)."""
    forward = net.forward

    def run(*args, **kwargs):
        with ResidualAdditions(weight, skip_gates=True):
            return forward(*args, **kwargs)

    net.forward = run
    return net


def linearise(model: nn.Module, engine: Engine, rule: Rule, dtype: torch.dtype,
              input_scale: dict[str, Tensor] | None = None,
              matrices: dict[str, Tensor] | None = None) -> nn.Module:
    """A linearised deep copy of ``model`` (module names unchanged; ``model`` untouched). Its
    ``forward`` is wrapped to apply the residual rule, so run it, do not copy it.

    Args:
        input_scale: optional ``{module name: [C_in]}`` factors multiplying the columns of each
            channel matrix (``hvs_data``: ``E|h_c|``); channel engine only.
        matrices: optional ``{module name: [C_out, C_in]}`` non-negative matrices used in place
            of ``|W|`` / ``P̄`` (``relief``: connection scores); channel engine for convolutions.
    """
    net = copy.deepcopy(model).eval().requires_grad_(False)
    if next(net.children(), None) is None:  # the model is a single layer
        return _replacement("", net, engine, rule, dtype, (input_scale or {}).get(""),
                            (matrices or {}).get("")) or net
    new: dict[int, nn.Module] = {}
    inside_cp = {id(c) for m in net.modules() if isinstance(m, CPDConv) for c in m.modules() if c is not m}
    for name, m in net.named_modules():
        if isinstance(m, CPDConv) or (next(m.children(), None) is None and id(m) not in inside_cp):
            r = _replacement(name, m, engine, rule, dtype, (input_scale or {}).get(name), (matrices or {}).get(name))
            if r is not None:
                new[id(m)] = r
    # replace every slot holding a module, so aliases (nnU-Net's `conv` / `all_modules.0`) agree
    for parent in list(net.modules()):
        for key, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[key] = new[id(child)]
    return _with_residual_rule(net, 1.0 if rule == "consumer" else 0.5)
