"""Remove channels physically with Torch-Pruning, and replay a saved record (SPEC §3)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from medslim.errors import MedslimError
from medslim.prune.graph import build_graph
from medslim.prune.select import keep_top_k


@dataclass
class PruneRecord:
    """What pruning did: ``kept[root] = kept output-channel indices`` (in pruning order), the
    members pruned together with each root, and channel counts before/after per root."""

    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)


def out_channel_fn(module: nn.Module) -> Callable:
    """Torch-Pruning's output-channel pruning function for ``module`` (Linear or convolution)."""
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def coupled_members(graph: tp.DependencyGraph, module: nn.Module, names: Mapping[nn.Module, str]) -> list[str]:
    """Names (from ``names``) of all modules whose output channels are coupled with ``module``'s."""
    group = graph.get_pruning_group(module, out_channel_fn(module), idxs=[0])
    out = []
    for dep, _ in group:
        target = dep.target.module
        if graph.is_out_channel_pruning_fn(dep.handler) and target in names and names[target] not in out:
            out.append(names[target])
    return out


def prune_network(net: nn.Module, layers: Sequence[str], scores: Mapping[str, torch.Tensor],
                  ratio: float, example: torch.Tensor, protect: Sequence[str] = (),
                  progress: Callable[[str], None] | None = None) -> tuple[nn.Module, PruneRecord]:
    """Prune ``ratio`` of the output channels of every layer in ``layers`` from a copy of ``net``.

    Coupled layers (e.g. residual additions) form one group, scored by the sum of its members'
    scores; the group keeps ``ceil((1 - ratio) * C)`` channels. A group that would also prune
    a ``protect``-ed layer's outputs (e.g. the stem, coupled to ResEnc's stage-0 residual
    stream) is left whole.

    Args:
        net: network, not modified.
        layers: candidate conv names (see ``prunable_layers``).
        scores: ``name -> [C_out]`` importance (higher = keep), one entry per layer.
        ratio: fraction removed per layer, in ``[0, 1)``.
        example: an input the network accepts, used to trace the graph.
    Returns:
        the pruned copy and its ``PruneRecord``.
    """
    if not 0.0 <= ratio < 1.0:
        raise MedslimError(f"pruning ratio must be in [0, 1), got {ratio}")
    net = copy.deepcopy(net)
    record = PruneRecord()
    if ratio == 0.0 or not layers:
        return net, record
    graph = build_graph(net, example)
    modules = dict(net.named_modules())
    names = {modules[n]: n for n in [*layers, *protect]}
    done: set[str] = set(protect)
    for name in layers:
        if name in done:
            continue
        coupled = coupled_members(graph, modules[name], names)
        if any(m in protect for m in coupled):
            done.update(coupled)
            continue
        members = [m for m in coupled if m not in done]
        done.update(members)
        total = sum(scores[m].detach().double().cpu() for m in members)
        keep = keep_top_k(total, ratio)
        c = total.numel()
        remove = sorted(set(range(c)) - set(keep.tolist()))
        if remove:
            graph.get_pruning_group(modules[name], out_channel_fn(modules[name]), idxs=remove).prune()
        record.kept[name] = tuple(keep.tolist())
        record.members[name] = members
        record.channels[name] = (c, len(keep))
        if progress is not None:
            progress(name)
    return net, record


def apply_kept(net: nn.Module, kept: Mapping[str, Sequence[int]], example: torch.Tensor) -> nn.Module:
    """Replay a ``PruneRecord.kept`` on ``net`` (in place; structure only — weights are loaded
    afterwards). Raises ``MedslimError`` if a layer is missing or an index is out of range."""
    if not kept:
        return net
    graph = build_graph(net, example)
    modules = dict(net.named_modules())
    for name, keep in kept.items():
        if name not in modules:
            raise MedslimError(f"compression spec prunes `{name}`, which this network does not have; "
                               "the spec does not match the base architecture")
        module = modules[name]
        c = graph.get_out_channels(module)
        if c is None or max(keep) >= c:
            raise MedslimError(f"compression spec keeps channel {max(keep)} of `{name}`, which has {c} outputs")
        remove = sorted(set(range(c)) - set(int(i) for i in keep))
        if remove:
            graph.get_pruning_group(module, out_channel_fn(module), idxs=remove).prune()
    return net
