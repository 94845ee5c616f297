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
from medslim.prune.groupnorm import channel_granule, granule_top_k
from medslim.prune.select import check_selection, global_keep_counts, keep_count


KeepRule = Callable[[Mapping[str, torch.Tensor]], Mapping[str, int]]
"""``{group: [C_g] summed member scores} -> {group: channels kept}``: a criterion's own counts
(e.g. ``medslim.score.relief.alpha_keep_counts``) in place of a ratio."""


@dataclass
class PruneRecord:
    """What pruning did: ``kept[root] = kept output-channel indices`` (in pruning order), the
    members pruned together with each root, and channel counts before/after per root."""

    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)


def out_channel_fn(graph: tp.DependencyGraph, module: nn.Module) -> Callable:
    """The output-channel pruning function ``graph`` uses for ``module`` (Linear, convolution,
    or a layer with a customized pruner such as ``CPDConv``)."""
    return graph.get_pruner_of_module(module).prune_out_channels


def coupled_members(graph: tp.DependencyGraph, module: nn.Module, names: Mapping[nn.Module, str]) -> list[str]:
    """Names (from ``names``) of all modules whose output channels are coupled with ``module``'s."""
    group = graph.get_pruning_group(module, out_channel_fn(graph, module), idxs=[0])
    out = []
    for dep, _ in group:
        target = dep.target.module
        if graph.is_out_channel_pruning_fn(dep.handler) and target in names and names[target] not in out:
            out.append(names[target])
    return out


def prune_network(net: nn.Module, layers: Sequence[str], scores: Mapping[str, torch.Tensor],
                  ratio: float, example: torch.Tensor, protect: Sequence[str] = (),
                  progress: Callable[[str], None] | None = None,
                  selection: str = "layer", keep: KeepRule | None = None) -> tuple[nn.Module, PruneRecord]:
    """Prune ``ratio`` of the output channels of the layers in ``layers`` from a copy of ``net``.

    Coupled layers (e.g. residual additions) form one group, scored by the sum of its members'
    scores. A group coupled with a GroupNorm keeps whole norm groups (its count rounded up;
    ``medslim.prune.groupnorm``). ``selection="layer"``: each group keeps ``ceil((1 - ratio) * C)`` channels;
    ``"global"``: the channels of all groups are ranked together (each group's scores
    L2-normalised) and ``ratio`` of them go, at least one kept per group (``global_keep_counts``, which says how the per-layer L2
    normalisation of the scores shifts removal to wide layers). Either way a group keeps its
    top-``k`` channels. A group that would also prune a ``protect``-ed layer's outputs (e.g.
    the stem, coupled to ResEnc's stage-0 residual stream) is left whole and not ranked.

    Args:
        net: network, not modified.
        layers: candidate conv names (see ``prunable_layers``).
        scores: ``name -> [C_out]`` importance (higher = keep), one entry per layer.
        ratio: fraction removed per layer (``layer``) or of all candidate channels
            (``global``), in ``[0, 1)``.
        example: an input the network accepts, used to trace the graph.
        selection: ``"layer"`` or ``"global"`` (``medslim.prune.select.SELECTIONS``).
        keep: sets each group's count from its summed scores instead of ``ratio`` and
            ``selection`` (which are then ignored).
    Returns:
        the pruned copy and its ``PruneRecord``.
    Raises:
        MedslimError: ``ratio`` outside ``[0, 1)``, an unknown ``selection``, or a ``keep``
            count outside ``[1, C_g]``.
    """
    if not 0.0 <= ratio < 1.0:
        raise MedslimError(f"pruning ratio must be in [0, 1), got {ratio}")
    check_selection(selection)
    net = copy.deepcopy(net)
    record = PruneRecord()
    if (ratio == 0.0 and keep is None) or not layers:
        return net, record
    graph = build_graph(net, example)
    modules = dict(net.named_modules())
    groups = channel_groups(graph, modules, layers, protect)
    totals = {name: sum(scores[m].detach().double().cpu() for m in members) for name, members in groups.items()}
    if keep is not None:
        counts = dict(keep(totals))
        bad = next((n for n, t in totals.items() if not 1 <= counts.get(n, 0) <= t.numel()), None)
        if bad is not None:
            raise MedslimError(f"keep rule gave {counts.get(bad)} channels for '{bad}', which has {totals[bad].numel()}")
    elif selection == "global":
        counts = global_keep_counts(totals, ratio)
    else:
        counts = {name: keep_count(t.numel(), ratio) for name, t in totals.items()}
    grouped_norms = any(isinstance(m, nn.GroupNorm) for m in net.modules())
    for name, members in groups.items():
        granule = channel_granule(graph, modules[name], out_channel_fn(graph, modules[name])) if grouped_norms else 1
        keep = granule_top_k(totals[name], counts[name], granule)
        c = totals[name].numel()
        remove = sorted(set(range(c)) - set(keep.tolist()))
        if remove:
            graph.get_pruning_group(modules[name], out_channel_fn(graph, modules[name]), idxs=remove).prune()
        record.kept[name] = tuple(keep.tolist())
        record.members[name] = members
        record.channels[name] = (c, len(keep))
        if progress is not None:
            progress(name)
    return net, record


def channel_groups(graph: tp.DependencyGraph, modules: Mapping[str, nn.Module], layers: Sequence[str],
                   protect: Sequence[str] = ()) -> dict[str, list[str]]:
    """``root -> members``: the layers of ``layers`` whose output channels are pruned together,
    in network order, each group under its first layer. Groups that include a ``protect``-ed
    layer are left out."""
    names = {modules[n]: n for n in [*layers, *protect]}
    done: set[str] = set(protect)
    groups: dict[str, list[str]] = {}
    for name in layers:
        if name in done:
            continue
        coupled = coupled_members(graph, modules[name], names)
        if any(m in protect for m in coupled):
            done.update(coupled)
            continue
        groups[name] = [m for m in coupled if m not in done]
        done.update(groups[name])
    return groups


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
            graph.get_pruning_group(module, out_channel_fn(graph, module), idxs=remove).prune()
    return net
