"""LOBSTER (unstructured) and SeReNe (structured) on a live network: which tensors they
regularise, the pinning masks, the threshold step and, for SeReNe, the physical removal of the
zeroed channels. The trainers only call these (``nnunet_plugin/medslim_trainers.py``).

A threshold step zeroes what lies below the threshold found by ``threshold_search`` and pins
it (kept at zero after every optimizer step: the paper's parameter pinning). Scores: LOBSTER,
``|θ|`` of each weight of every convolution/Linear (biases and norms are not pruned; they do not
multiply inputs); SeReNe, a channel's parameter norm relative to its norm when regularisation
started (``‖θ_c‖ / ‖θ_c⁰‖``; our reading: the channel's tensors mix conv rows ~1e-2 and norm
scales ~1, so an absolute norm would compare unlike layers). A SeReNe channel's parameters are
the out-channel slices of its Torch-Pruning group: the producing conv's rows and bias and the
following norm's γ/β. γ = β = 0 makes the channel exactly 0 after InstanceNorm, so a zeroed
channel contributes nothing and removing it does not change the output (SPEC §3: with conv
rows alone InstanceNorm would still emit β).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from medslim.finetune.regularize import (
    ThresholdResult,
    channel_sensitivity,
    channel_shrink_,
    group_sensitivity,
    insensitivity,
    lobster_shrink_,
    threshold_search,
)
from medslim.prune.graph import build_graph
from medslim.prune.pruner import channel_groups, out_channel_fn, prune_network
from medslim.spec import CompressionSpec

LossFn = Callable[[], float]


class LobsterRegularizer:
    """LOBSTER on every convolution/Linear weight of ``net`` (``lam`` = λ)."""

    def __init__(self, net: nn.Module, lam: float) -> None:
        self.lam = lam
        self.weights = {f"{n}.weight": m.weight for n, m in net.named_modules()
                        if isinstance(m, (_ConvNd, nn.Linear)) and m.weight is not None}
        self.masks: dict[str, Tensor] = {}
        self.history: list[dict[str, Any]] = []

    def before_step(self) -> None:
        lobster_shrink_(list(self.weights.values()), self.lam)

    @torch.no_grad()
    def after_step(self) -> None:
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    @torch.no_grad()
    def threshold(self, loss: LossFn, tolerance: float) -> ThresholdResult:
        """Zero and pin every weight with ``|θ| < T``, ``T`` from ``threshold_search``."""
        saved = {n: w.detach().clone() for n, w in self.weights.items()}

        def loss_at(t: float) -> float:
            for n, w in self.weights.items():
                w.copy_(saved[n] * (saved[n].abs() >= t))
            return loss()

        result = threshold_search(torch.cat([w.abs().flatten() for w in saved.values()]), loss_at, tolerance)
        for n, w in self.weights.items():
            keep = (saved[n].abs() >= result.threshold) & (saved[n] != 0)
            self.masks[n] = keep.to(w.dtype)
            w.copy_(saved[n] * self.masks[n])
        self.history.append({"threshold": result.threshold, "val_loss_before": result.base_loss,
                             "val_loss_after": result.loss, "zeros": self.report()["zeros"]})
        return result

    def report(self) -> dict[str, Any]:
        """Zeros counted in the regularised weights (unstructured: a dense network is no faster)."""
        layers = {n: (int((w == 0).sum()), w.numel()) for n, w in self.weights.items()}
        zeros, total = sum(z for z, _ in layers.values()), sum(t for _, t in layers.values())
        return {"regularizer": "lobster", "weights": total, "zeros": zeros, "sparsity": zeros / max(total, 1),
                "per_layer": {n: {"zeros": z, "weights": t} for n, (z, t) in layers.items()},
                "thresholds": self.history,
                "note": "unstructured sparsity: the dense network is not faster; counts are of convolution/Linear weights"}


class SereneRegularizer:
    """SeReNe on the output channels of ``layers`` (coupled layers as one group).

    Args:
        net: the network, trained in place.
        layers: candidate conv names (``medslim.prune.prunable_layers``).
        example: an input ``net`` accepts (traces the dependency graph).
        protect: layers whose groups are left whole (e.g. the stem).
        lam: λ.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], example: Tensor, protect: Sequence[str] = (),
                 lam: float = 1e-4) -> None:
        self.lam, self.example, self.protect = lam, example, tuple(protect)
        graph = build_graph(net, example)
        modules = dict(net.named_modules())
        self.groups = channel_groups(graph, modules, layers, self.protect)
        self.slices = {root: group_slices(graph, modules, root) for root in self.groups}
        self.start = {root: self.channel_norms(root) for root in self.groups}
        self.insens = {root: torch.ones(self.start[root].numel()) for root in self.groups}
        self.alive = {root: torch.ones(self.start[root].numel(), dtype=torch.bool) for root in self.groups}
        self.sensitivity: dict[str, Tensor] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def layers(self) -> list[str]:
        return [m for members in self.groups.values() for m in members]

    def refresh(self, net: nn.Module, batch: Tensor) -> None:
        """Recompute the channels' sensitivity on ``batch`` ``[B, C_in, *spatial]``."""
        sens = channel_sensitivity(net, self.layers, batch)
        for root, members in self.groups.items():
            self.sensitivity[root] = group_sensitivity(sens, members)
            self.insens[root] = insensitivity(self.sensitivity[root])

    def before_step(self) -> None:
        for root, slices in self.slices.items():
            channel_shrink_(slices, self.insens[root], self.lam)

    @torch.no_grad()
    def after_step(self) -> None:
        for root, slices in self.slices.items():
            if not bool(self.alive[root].all()):
                channel_shrink_(slices, (~self.alive[root]).float(), 1.0)  # θ − θ·1 = 0 on dead channels

    @torch.no_grad()
    def channel_norms(self, root: str) -> Tensor:
        """``[C]`` L2 norm of each channel's parameters in group ``root``."""
        total = 0
        for p, dim in self.slices[root]:
            total = total + p.detach().float().movedim(dim, 0).reshape(p.shape[dim], -1).pow(2).sum(1).cpu()
        return total.sqrt()

    def scores(self) -> dict[str, Tensor]:
        """``root -> [C]`` relative norm ``‖θ_c‖ / ‖θ_c⁰‖`` (0 for dead channels)."""
        return {r: self.channel_norms(r) / self.start[r].clamp_min(1e-12) * self.alive[r] for r in self.groups}

    @torch.no_grad()
    def threshold(self, loss: LossFn, tolerance: float) -> ThresholdResult:
        """Zero and pin every channel whose relative norm is below ``T`` (``threshold_search``),
        keeping at least one channel per group."""
        saved = {r: [p.detach().clone() for p, _ in self.slices[r]] for r in self.groups}
        scores = self.scores()

        def alive_at(t: float) -> dict[str, Tensor]:
            out = {}
            for r, s in scores.items():
                keep = (s >= t) & self.alive[r]
                if not bool(keep.any()):
                    keep[int(s.argmax())] = True
                out[r] = keep
            return out

        def apply(alive: dict[str, Tensor]) -> None:
            for r, slices in self.slices.items():
                for (p, _), s in zip(slices, saved[r]):
                    p.copy_(s)
                channel_shrink_(slices, (~alive[r]).float(), 1.0)

        def loss_at(t: float) -> float:
            apply(alive_at(t))
            return loss()

        result = threshold_search(torch.cat([s[self.alive[r]] for r, s in scores.items()]), loss_at, tolerance)
        self.alive = alive_at(result.threshold)
        apply(self.alive)
        self.history.append({"threshold": result.threshold, "val_loss_before": result.base_loss,
                             "val_loss_after": result.loss, "channels_zeroed": self.dead_count()})
        return result

    def dead_count(self) -> int:
        return int(sum((~a).sum() for a in self.alive.values()))

    def remove(self, net: nn.Module) -> tuple[nn.Module, CompressionSpec]:
        """A copy of ``net`` without the zeroed channels, and its spec (ranks/CP of ``net.spec``
        if ``net`` is a ``CompressedUNet``; kept channels composed with its own)."""
        from medslim.recompress import compose_kept

        scores = {m: self.alive[r].float() for r, members in self.groups.items() for m in members}
        pruned, record = prune_network(net, self.layers, scores, 0.0, self.example, protect=self.protect,
                                       keep=lambda totals: {n: max(1, int((t > 0).sum())) for n, t in totals.items()})
        old = getattr(net, "spec", CompressionSpec())
        kept = {r: k for r, k in record.kept.items() if len(k) < record.channels[r][0]}
        provenance = {**old.provenance, "serene": {"lambda": self.lam, "thresholds": self.history}}
        spec = CompressionSpec(ranks=old.ranks, cp=old.cp, kept=compose_kept(old.kept, kept), provenance=provenance)
        return pruned, spec

    def report(self) -> dict[str, Any]:
        per_layer = {r: {"channels": int(a.numel()), "zeroed": int((~a).sum())} for r, a in self.alive.items()}
        return {"regularizer": "serene", "channels": sum(v["channels"] for v in per_layer.values()),
                "channels_zeroed": self.dead_count(), "per_layer": per_layer, "thresholds": self.history}


def group_slices(graph: Any, modules: dict[str, nn.Module], root: str) -> list[tuple[Tensor, int]]:
    """``(parameter, channel dim)`` of every tensor that holds ``root``'s output channels: the
    out-channel members of its Torch-Pruning group (convs: weight rows — dim 1 for transposed
    convs — and bias; norms: γ, β)."""
    module = modules[root]
    group = graph.get_pruning_group(module, out_channel_fn(graph, module), idxs=[0])
    out: list[tuple[Tensor, int]] = []
    seen: set[int] = set()
    for dep, _ in group:
        m = dep.target.module
        if not graph.is_out_channel_pruning_fn(dep.handler) or id(m) in seen or not isinstance(m, nn.Module):
            continue
        seen.add(id(m))
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter):
                out.append((p, 1 if pname == "weight" and isinstance(m, _ConvTransposeNd) else 0))
    return out


Regularizer = LobsterRegularizer | SereneRegularizer


def make_regularizer(net: nn.Module, kind: str, lam: float, input_channels: int,
                     prune_stem: bool = False) -> Regularizer:
    """``kind`` ``lobster`` (every conv/Linear weight) or ``serene`` (the ``outer``-site channels,
    the stem's left whole unless ``prune_stem``) on ``net``."""
    from medslim.prune import example_input, prunable_layers
    from medslim.prune.sites import stem_output

    if kind == "lobster":
        return LobsterRegularizer(net, lam)
    layers = prunable_layers(net, "outer", prune_stem=prune_stem)
    protect = () if prune_stem else (stem_output(net),)
    return SereneRegularizer(net, layers, example_input(net, input_channels), protect, lam)


def attach(optimizer: torch.optim.Optimizer, reg: Regularizer) -> None:
    """Run ``reg.before_step`` (shrinkage on ``θᵗ`` with ``gᵗ``) before and ``reg.after_step``
    (pinning) after every ``optimizer.step()``."""
    optimizer.register_step_pre_hook(lambda *_: reg.before_step())
    optimizer.register_step_post_hook(lambda *_: reg.after_step())
