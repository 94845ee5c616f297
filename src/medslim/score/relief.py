"""NN-Relief (Dekhovich et al. 2024, "Neural network relief: a pruning algorithm based on neural
activity", Machine Learning 113; SPEC §8): activity-based connection scores and the α-mass rule.

A connection's score is the share of a unit's mean absolute input signal that it carries:
Linear (Eq. 1) ``s_ij = E|w_ji x_i| / (Σ_k E|w_jk x_k| + |b_j|)``; convolution (Eq. 2–3) the
same with ``E‖|K_ji| * |x_i|‖_F`` per kernel and ``|b_j|·√(output voxels)`` for the bias.

Readings of the paper (where its text is garbled or ambiguous):

- Eq. 2 sums over ``i ∈ {1..m_l}`` and names kernels ``K_{m_j j}``; both must be the
  ``m_{l-1}`` input channels of layer ``l`` (the Linear form of Eq. 1 sums over ``m_{l-1}``).
- The convolution is ``|K|`` applied to ``|x|`` with the layer's own stride, padding and
  dilation, and ``‖·‖_F`` is taken over the output map, per sample, then averaged (Eq. 2
  literally). The authors' code (``lenet_prune.py``) sums the map instead (an L1 norm, bias
  ``|b|·voxels``), which up to zero-padding borders is ``‖K‖₁·E|x|·voxels``; ``norm="l1"``
  offers that reading (cheap), ``norm="fro"`` (default) the printed one.
- "Expectation" is over the calibration samples; for convolutions the norm already sums over
  positions. Inputs ``x`` are read in one forward pass of the unpruned network (Algorithm 1
  computes ``X^(l)`` before pruning layer ``l``).
- The α rule keeps the top ``p0 = min{p : Σ_{i≤p} ŝ_i ≥ α}`` contributors by a stable sort
  (Algorithm 1 line 9 prunes ``s < ŝ_{p0}``: the same set unless scores tie at ŝ_{p0}); the
  bias is one of the contributors (Algorithm 2 line 6) when it is passed.
- Structured (channel) use, beyond the paper: a channel's score is the sum of its connection
  scores over every unit of every consumer, and a layer keeps the fewest channels holding α
  of its channels' summed score (``alpha_count``). The bias enters through the denominator
  only: channel pruning never removes it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from medslim.errors import MedslimError
from medslim.score.propagate import propagate
from medslim.score.registry import ScoreContext, finish, register_criterion

Norm = Literal["fro", "l1"]
NORMS = ("fro", "l1")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def linear_contributions(weight: Tensor, x: Tensor) -> Tensor:
    """``E_n |w_ji x_ni|``: weight ``[O, C]``, inputs ``x`` ``[N, C]`` (or ``[N, …, C]``,
    every leading position a sample) → ``[O, C]`` float64."""
    mean_abs = x.detach().reshape(-1, x.shape[-1]).abs().double().mean(0)
    return weight.detach().abs().double() * mean_abs[None, :]


def conv_contributions(conv: _ConvNd, x: Tensor, norm: Norm = "fro", chunk: int = 8) -> Tensor:
    """``E_n ‖|K_oc| * |x_nc|‖`` per (output, input) channel pair of a (transposed) convolution
    with ``groups = 1``: ``x`` ``[N, C, *spatial]`` → ``[O, C]`` float64. ``norm="fro"``: the
    Frobenius norm of each output map (Eq. 2, ``chunk`` output channels at a time: the maps of
    all pairs are ``[N, C·chunk, *out]``); ``"l1"``: its sum (the authors' code).

    Raises:
        MedslimError: grouped convolution, or an unknown ``norm``.
    """
    if conv.groups != 1:
        raise MedslimError(f"relief scores convolutions with groups=1, got groups={conv.groups}")
    if norm not in NORMS:
        raise MedslimError(f"unknown relief norm {norm!r}; choose one of {', '.join(NORMS)}")
    transposed = isinstance(conv, _ConvTransposeNd)
    w = conv.weight.detach().abs()
    w = w.transpose(0, 1) if transposed else w  # [O, C, k…]
    ax = x.detach().abs().to(w.dtype)
    n, c = ax.shape[0], ax.shape[1]
    if norm == "l1":
        # Σ_p (|K_oc| * |x_c|)(p) = Σ_a |K_oc,a| A_c,a with A_c,a = Σ_p |x_c|(stride·p + a): the weight
        # gradient of Σ conv(|x|, ·), one call for all pairs
        probe = torch.ones((c, 1, *w.shape[2:]) if transposed else (1, c, *w.shape[2:]), dtype=w.dtype,
                           requires_grad=True)
        with torch.enable_grad():
            _convolve(conv, ax, probe, groups=1).sum().backward()
        a = probe.grad.transpose(0, 1) if transposed else probe.grad  # [1, C, k…]
        return (w.double() * a.double()).sum(tuple(range(2, w.dim()))) / n
    out = []
    for start in range(0, w.shape[0], chunk):
        part = w[start:start + chunk]  # [o, C, k…]: one single-channel filter per pair (c, o), grouped by c
        native = part.transpose(0, 1) if transposed else part.transpose(0, 1).reshape(-1, 1, *part.shape[2:])
        maps = _convolve(conv, ax, native.contiguous(), groups=c)  # [N, C·o, *out], c-major
        fro = maps.reshape(n, c, part.shape[0], -1).double().norm(dim=-1).mean(0)  # [C, o]
        out.append(fro.T)
    return torch.cat(out)


def _convolve(conv: _ConvNd, x: Tensor, w: Tensor, groups: int) -> Tensor:
    """``x`` through ``conv``'s operation (stride, padding, dilation) with weight ``w`` in the
    module's own layout (transposed: ``[C_in, O/g, k…]``) and ``groups``."""
    nd = w.dim() - 2
    if isinstance(conv, _ConvTransposeNd):
        return _CONV_T[nd](x, w, None, conv.stride, conv.padding, conv.output_padding, groups, conv.dilation)
    return _CONV[nd](x, w, None, conv.stride, conv.padding, conv.dilation, groups)


def bias_contribution(module: nn.Module, out_voxels: int, norm: Norm = "fro") -> Tensor:
    """``|b_o|`` (Linear) or ``|b_o|·√voxels`` (``fro``; the Frobenius norm of the constant bias
    map, Eq. 3) / ``|b_o|·voxels`` (``l1``) per output channel ``[O]`` float64; zeros without bias."""
    o = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    if module.bias is None:
        return torch.zeros(o, dtype=torch.float64)
    factor = 1.0 if isinstance(module, nn.Linear) else (out_voxels ** 0.5 if norm == "fro" else float(out_voxels))
    return module.bias.detach().abs().double() * factor


def connection_scores(contributions: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 1–3: ``s_oc = contrib_oc / S_o`` and the bias score ``|b_o| / S_o``, with
    ``S_o = Σ_c contrib_oc + |b_o|``: ``[O, C]`` (and ``[O]`` bias contributions) →
    (``[O, C]``, ``[O]``). Each row plus its bias score sums to 1; a unit with ``S_o = 0``
    (no signal at all) scores 0 everywhere."""
    bias = torch.zeros(contributions.shape[0], dtype=contributions.dtype) if bias is None else bias
    total = contributions.sum(1) + bias
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return contributions / safe[:, None], bias / safe


def _p0(sorted_scores: Tensor, alpha: float) -> Tensor:
    """Per row of descending scores ``[…, n]``: ``min{p : Σ_{i≤p} ŝ_i ≥ α·Σ ŝ}`` (0 for an
    all-zero row). The relative tolerance is float32's: the criteria return float32 scores, whose
    sums miss exact fractions (and α = 1) by rounding."""
    cum = sorted_scores.cumsum(-1)
    target = alpha * cum[..., -1:] * (1 - 1e-6)
    p0 = (cum < target).sum(-1) + 1
    return torch.where(cum[..., -1] > 0, p0.clamp(max=sorted_scores.shape[-1]), torch.zeros_like(p0))


def alpha_count(scores: Tensor, alpha: float) -> int:
    """How many of ``scores`` ``[C]`` (non-negative) to keep: the fewest whose sum reaches
    ``α`` of the total, at least one."""
    s = torch.sort(scores.detach().double().reshape(-1), descending=True).values
    return max(1, int(_p0(s, alpha)))


def alpha_mask(scores: Tensor, alpha: float, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The paper's per-unit rule: for each row ``o`` of ``scores`` ``[O, C]`` (with its bias
    score ``[O]`` as one more contributor), keep the top ``p0`` contributors (stable sort:
    among ties the lower index, the weights before the bias). Returns the boolean keep masks
    ``[O, C]`` and ``[O]`` (``None`` without bias). Rows without signal keep nothing."""
    full = scores.double() if bias is None else torch.cat([scores.double(), bias.double()[:, None]], 1)
    order = torch.sort(-full, dim=1, stable=True).indices
    p0 = _p0(torch.gather(full, 1, order), alpha)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(full.shape[1]).expand_as(order))
    keep = ranks < p0[:, None]
    return (keep, None) if bias is None else (keep[:, :-1], keep[:, -1])


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """Connection scores of one convolution/Linear: ``weights`` ``[O, C]``, ``bias`` ``[O]``."""

    weights: Tensor
    bias: Tensor


def layer_scores(model: nn.Module, batch: Tensor, norm: Norm = "fro",
                 names: Sequence[str] | None = None) -> dict[str, LayerScores]:
    """``{name: LayerScores}`` of every convolution and Linear of ``model`` (or those in
    ``names``) over ``batch`` ``[B, C, *spatial]``, run one sample at a time in eval mode without
    gradients (BatchNorm statistics untouched, each module's mode restored after; one sample's
    activations in memory). Not on a copy: a model masked by ``torch.nn.utils.prune`` holds
    computed weights that ``deepcopy`` refuses. A module run more than once per forward pass
    accumulates each call as a sample.

    Raises:
        MedslimError: a grouped convolution, or a requested module never run.
    """
    net = model
    modes = {m: m.training for m in net.modules()}
    net.eval()
    wanted = set(names) if names is not None else None
    sums: dict[str, Tensor] = {}
    bias: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def hook(mod: nn.Module, args, out, name: str) -> None:
        x = args[0]
        if isinstance(mod, nn.Linear):
            c = linear_contributions(mod.weight, x)
            weight = x.reshape(-1, x.shape[-1]).shape[0]  # rows are samples: weigh calls by their rows
        else:
            c = conv_contributions(mod, x, norm)
            weight = x.shape[0]
        sums[name] = sums.get(name, 0) + c * weight
        calls[name] = calls.get(name, 0) + weight
        bias[name] = bias_contribution(mod, out[0, 0].numel() if out.dim() > 2 else 1, norm)

    handles = [m.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name))
               for name, m in net.named_modules()
               if isinstance(m, (_ConvNd, nn.Linear)) and (wanted is None or name in wanted)]
    device = next(net.parameters()).device
    try:
        with torch.no_grad():
            for i in range(batch.shape[0]):
                net(batch[i:i + 1].to(device, torch.float32))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    missing = sorted((wanted or set()) - set(sums))
    if missing:
        raise MedslimError(f"relief: '{missing[0]}' is not run in the forward pass")
    out = {}
    for name in sums:
        w, b = connection_scores((sums[name] / calls[name]).cpu(), bias[name].cpu())
        out[name] = LayerScores(w, b)
    return out


@register_criterion("relief", needs_calibration=True)
def relief(model: nn.Module, layers: Sequence[str], ctx: ScoreContext) -> dict[str, Tensor]:
    """Structured NN-Relief: channel ``c``'s score is ``Σ_{consumers} Σ_o s_oc``, its connection
    scores (Eq. 1–3, Frobenius form) summed over every unit of every convolution/Linear that
    reads it — through norms, activations and pooling, at its offset in decoder
    concatenations, and in full across residual additions (the consumers that
    ``consumer_l1`` finds, with ``s_oc`` in place of ``‖W[o, c]‖₁``), over ``ctx.calibration``
    ``[B, C, *spatial]``. ``alpha_count`` turns a layer's scores into its keep count.

    Raises:
        MedslimError: no calibration batch, or a grouped convolution.
    """
    if ctx.calibration is None:
        raise MedslimError("relief needs calibration patches (ScoreContext.calibration)")
    matrices = {name: s.weights for name, s in layer_scores(model, ctx.calibration).items()}
    channel = dataclasses.replace(ctx, engine="channel", reduce="sum")
    return finish(propagate(model, channel, outputs_of=layers, rule="consumer", matrices=matrices).outputs, ctx)


def alpha_keep_counts(group_scores: Mapping[str, Tensor], alpha: float) -> dict[str, int]:
    """``{group: alpha_count(scores, α)}``: each group (``[C_g]`` summed member scores, see
    ``prune_network``) keeps the fewest channels holding α of its score mass."""
    return {name: alpha_count(s, alpha) for name, s in group_scores.items()}


def check_alpha(alpha: float | None, criterion: str) -> None:
    """``MedslimError`` unless ``alpha`` is ``None`` or in ``(0, 1]`` with ``criterion`` relief."""
    if alpha is None:
        return
    if criterion != "relief":
        raise MedslimError(f"--alpha sets each layer's count from relief's score mass; it needs --criterion relief, "
                           f"got --criterion {criterion} (use --prune for a fixed ratio)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise MedslimError(f"--alpha must be in (0, 1] (the fraction of each layer's relief score kept), got {alpha}")
