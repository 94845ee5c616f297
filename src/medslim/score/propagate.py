"""Seed the head, run the linearised network backwards, read per-channel scores.

This is the shared engine of ``hvs``, ``nisp``, ``hvs_data`` and ``consumer_l1``; it returns raw
(un-normalised) channel scores so that invariants such as mass conservation can be checked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from medslim.errors import MedslimError
from medslim.families import family_of
from medslim.score.linearise import Rule, linearise
from medslim.score.registry import ScoreContext, resolve_layers

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Propagation:
    """Raw channel scores of one backward pass.

    Attributes:
        outputs: ``{module name: [C]}`` scores of the tensor each module returns.
        inputs: ``{module name: [C]}`` scores of the tensor entering each module (summed over
            all consumers of that tensor); ``""`` is the network input.
        seeded: number of seeded head outputs (batch × voxels × seeded classes) — with
            ``reduce="sum"`` and rule ``hvs`` the total score at any full cut of the network.
        input_mass: total score at the network input (a full cut); equals ``seeded`` for rule
            ``hvs`` unless output units have all-zero weights.
        input_scores: the unreduced score of the network input ``[B, C, *spatial]`` (per pixel
            with the ``spatial`` engine; ``[1, C, 1, …]`` with the ``channel`` engine).
    """

    outputs: dict[str, Tensor]
    inputs: dict[str, Tensor]
    seeded: float
    input_mass: float
    input_scores: Tensor | None = None


def find_head(model: nn.Module) -> str:
    """The module whose output is the network's main output (``medslim.families``: nnU-Net's
    last ``decoder.seg_layers.<i>``, a MONAI network itself (``""``), a classifier's last
    Linear), else the last Linear/convolution in module order.

    Raises:
        MedslimError: the model has neither.
    """
    if not any(isinstance(m, (_ConvNd, nn.Linear)) for m in model.modules()):
        raise MedslimError(f"cannot find an output layer in the {type(model).__name__}; set the head")
    return family_of(model).output_module(model)


class _Channels:
    """Accumulates per-channel sum and sum of squares of the scores a tensor hook receives."""

    def __init__(self, dim: int):
        self.dim, self.total, self.squares, self.voxels = dim, None, None, 0

    def __call__(self, g: Tensor) -> None:
        g = g.detach().movedim(self.dim, 0)
        g = g.reshape(g.shape[0], -1)
        total, squares = g.sum(1, dtype=torch.float64), torch.linalg.vector_norm(g, dim=1).double() ** 2
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.voxels += g.shape[1]

    def reduce(self, how: str) -> Tensor:
        if how == "sum":
            return self.total
        if how == "mean":
            return self.total / self.voxels
        return (self.squares / self.voxels).sqrt()


def _watch(t: Tensor, acc: _Channels) -> None:
    if not isinstance(t, Tensor):
        raise MedslimError(f"can only score modules that take/return one tensor, got {type(t).__name__}")
    t.register_hook(acc)  # a module hook must return None, or it would replace the tensor


def _channel_dim(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _input_shape(model: nn.Module, ctx: ScoreContext) -> tuple[int, ...]:
    if ctx.engine == "spatial":
        if ctx.input_shape is None:
            raise MedslimError("the spatial HVS engine needs input_shape (batch, channels, *spatial), "
                               "e.g. the nnU-Net patch (1, 1, 40, 56, 40)")
        return ctx.input_shape
    if ctx.input_shape is not None:
        return (1, ctx.input_shape[1], *[1] * (len(ctx.input_shape) - 2))
    for m in model.modules():
        if isinstance(m, _ConvNd):
            return (1, m.in_channels, *[1] * (m.weight.dim() - 2))
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise MedslimError(f"cannot infer the input shape of the {type(model).__name__}; set input_shape")


def propagate(model: nn.Module, ctx: ScoreContext, outputs_of: Sequence[str] = (),
              inputs_of: Sequence[str] = (), *, rule: Rule = "hvs",
              input_scale: dict[str, Tensor] | None = None,
              matrices: dict[str, Tensor] | None = None) -> Propagation:
    """Seed δ = 1 at the head's output and propagate scores backwards (see ``linearise``).

    Uses ``ctx.engine``, ``ctx.input_shape``, ``ctx.reduce``, ``ctx.seed_classes`` and
    ``ctx.head``; ``ctx.normalize`` is ignored (scores are raw). The channel engine computes in
    float64 (tiny tensors); the spatial engine in float32, float64 for ``nisp`` whose unnormalised
    products of ``|W|`` sums can overflow float32 in deep networks. ``input_scale`` and
    ``matrices``: see ``linearise``.

    Raises:
        MedslimError: unknown module names, bad seed classes, a requested module that is not run
            in the forward pass, or a network the engine cannot linearise.
    """
    head = ctx.head if ctx.head is not None else find_head(model)
    originals = resolve_layers(model, [*outputs_of, *inputs_of, head])
    dtype = torch.float64 if ctx.engine == "channel" or rule == "nisp" else torch.float32
    net = linearise(model, ctx.engine, rule, dtype, input_scale, matrices)
    modules = dict(net.named_modules())

    outs = {n: _Channels(_channel_dim(originals[n])) for n in outputs_of}
    ins = {n: _Channels(1 if n == "" else _channel_dim(originals[n])) for n in {*inputs_of, ""}}
    head_out: list[Tensor] = []
    handles = [modules[head].register_forward_hook(lambda m, a, out: head_out.append(out))]
    for name, acc in outs.items():
        handles.append(modules[name].register_forward_hook(
            lambda m, a, out, acc=acc: _watch(out, acc)))
    for name, acc in ins.items():
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, acc=acc: _watch(a[0], acc)))
    try:
        x = torch.ones(_input_shape(model, ctx), dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            try:
                net(x)
            except RuntimeError as e:
                hint = "; try engine='spatial'" if ctx.engine == "channel" else ""
                raise MedslimError(f"the {ctx.engine} HVS engine cannot run the "
                                   f"{type(model).__name__} ({e}){hint}") from e
            if not head_out:
                raise MedslimError(f"head '{head}' is not run in the forward pass")
            seed = _seed(head_out[-1], _channel_dim(originals[head]), ctx.seed_classes, head)
            head_out[-1].backward(seed)
    finally:
        for h in handles:
            h.remove()

    result = {}
    for kind, accs in (("output", outs), ("input", ins)):
        result[kind] = {}
        for name, acc in accs.items():
            if acc.total is None:
                raise MedslimError(f"the {kind} of '{name}' does not reach the head '{head}' "
                                   f"(not run in the forward pass, or not upstream of the head)")
            result[kind][name] = acc.reduce(ctx.reduce)
    p = Propagation(result["output"], {n: result["input"][n] for n in inputs_of}, float(seed.sum(dtype=torch.float64)),
                    float(ins[""].total.sum()), x.grad.detach() if x.grad is not None else None)
    if rule == "hvs" and p.input_mass > p.seeded * (1 + 1e-3):
        # mass can only grow where feature maps merge other than by a linear module or a
        # two-operand addition (medslim.residual), e.g. torch.stack(maps).sum(0) or a product
        log.warning("HVS score mass grew from %.6g seeded to %.6g at the network input: the %s merges "
                    "feature maps in a way HVS does not split (not a two-operand addition, e.g. a sum "
                    "over stacked maps or a product of maps)", p.seeded, p.input_mass, type(model).__name__)
    return p


def _seed(out: Tensor, dim: int, classes: tuple[int, ...] | None, head: str) -> Tensor:
    """δ = 1 on every element of ``out`` whose class index (along ``dim``) is seeded."""
    if classes is None:
        return out.new_ones(()).expand_as(out)
    n = out.shape[dim]
    if max(classes) >= n:
        raise MedslimError(f"seed class {max(classes)} does not exist: head '{head}' has {n} outputs")
    mask = torch.zeros(n, dtype=out.dtype)
    mask[list(classes)] = 1
    shape = [1] * out.dim()
    shape[dim] = n
    return mask.reshape(shape).expand_as(out).contiguous()

