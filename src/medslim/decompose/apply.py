"""Tucker-2 on whole networks (nnU-Net ``PlainConvUNet`` / ``ResidualEncoderUNet``; SPEC §1).

Layer names are those of ``net.named_modules()`` on the *original* network (the first name
of a module registered twice, e.g. ``…convs.0.conv`` rather than ``…convs.0.all_modules.0``,
and ``encoder.…`` rather than ``decoder.encoder.…``). A replaced module is swapped in every
parent that holds it, so nnU-Net's ``ConvDropoutNormReLU.conv`` alias and its
``all_modules`` entry stay the same object.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.cp import CPDConv
from medslim.decompose.latency import LayerTimer, conv_input_shapes, format_seconds
from medslim.decompose.ranks import LayerSite, check_rank_multiple, finalize_ranks, is_network_policy
from medslim.decompose.tucker import METHODS, TuckerConv
from medslim.errors import MedslimError, did_you_mean
from medslim.families import head_names, under
from medslim.spec import LayerRanks

GUARDS = ("params", "params+flops", "latency", None)


@dataclass(frozen=True)
class LayerRecord:
    """What ``decompose_network`` did to one conv. ``macs_*`` are multiply-accumulates per
    output voxel (exact for same-padded convs and kernel = stride transposed convs).
    ``rel_error``/``discarded_energy`` are ``None`` when the guard skipped the layer.
    ``seconds_dense``/``seconds_tucker``: measured seconds of the dense conv and of its Tucker
    form at the layer's input shape (``latency`` guard or policy; else ``None``)."""

    ranks: LayerRanks
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    transposed: bool
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    replaced: bool
    reason: str = ""
    rel_error: float | None = None
    discarded_energy: dict[str, float] | None = None
    seconds_dense: float | None = None
    seconds_tucker: float | None = None
    cp_rank: int | None = None  # per-filter CP rank (``decompose_network_cp``); ``ranks`` are then None


@dataclass
class DecompositionRecord:
    """Per-layer records in network order, plus the settings that produced them."""

    layers: dict[str, LayerRecord] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, LayerRanks]:
        """Ranks of the replaced layers only, ready for ``CompressionSpec(ranks=...)``."""
        return {n: r.ranks for n, r in self.layers.items() if r.replaced and r.cp_rank is None}

    @property
    def cp_ranks(self) -> dict[str, int]:
        """CP ranks of the layers replaced by ``CPDConv``, ready for ``CompressionSpec(cp=...)``."""
        return {n: r.cp_rank for n, r in self.layers.items() if r.replaced and r.cp_rank is not None}

    @property
    def skipped(self) -> list[str]:
        return [n for n, r in self.layers.items() if not r.replaced]

    def params_saved(self) -> int:
        return sum(r.params_before - r.params_after for r in self.layers.values() if r.replaced)

    def conv_seconds(self) -> tuple[float, float] | None:
        """Measured seconds of the eligible convs (one patch) before and after, or ``None``
        if latency was not measured."""
        timed = [r for r in self.layers.values() if r.seconds_dense is not None]
        if not timed:
            return None
        after = sum(r.seconds_tucker if r.replaced and r.seconds_tucker is not None else r.seconds_dense
                    for r in timed)
        return sum(r.seconds_dense for r in timed), after


def eligible_convs(net: nn.Module, *, include_stem: bool = True,
                   include_1x1: bool = False) -> dict[str, nn.Module]:
    """Convolutions to decompose, in registration order: every ``ConvNd``/``ConvTransposeNd``
    except the heads (``medslim.families``), grouped convs, and (by default) 1×…×1
    convs such as ResEnc skip projections. The stem is the first conv in registration order
    (it reads the network input); ``decompose_network`` decomposes only its output mode.

    Raises:
        MedslimError: the network is already decomposed, has no convolution, mixes spatial
            dimensions (e.g. a ``Conv2d`` in a 3D U-Net), or holds something other than a
            convolution where nnU-Net puts one (``ConvDropoutNormReLU.conv``).
    """
    convs = _all_convs(net)
    heads = head_names(net)
    out: dict[str, nn.Module] = {}
    for i, (name, conv) in enumerate(convs.items()):
        if i == 0 and not include_stem:
            continue
        if under(name, heads) or conv.groups != 1:
            continue
        if not include_1x1 and all(k == 1 for k in conv.kernel_size):
            continue
        out[name] = conv
    return out


def stem_name(net: nn.Module) -> str:
    """Name of the first convolution in registration order (nnU-Net's stem)."""
    return next(iter(_all_convs(net)))


def decompose_network(net: nn.Module, policy: Callable[..., LayerRanks], *, method: str = "hosvd",
                      guard: str | None = "params", rank_min: int = 1, rank_multiple: int = 1,
                      include_stem: bool = True, include_1x1: bool = False,
                      input_shape: Sequence[int] | None = None, timer: LayerTimer | None = None,
                      progress: Callable[[str], None] | None = None) -> tuple[nn.Module, DecompositionRecord]:
    """Deep copy of ``net`` with each eligible conv (``eligible_convs``) replaced by its
    ``TuckerConv``; ``net`` is not modified.

    Ranks: ``policy(weight, transposed=…, modes=…)`` per layer, or for a network-level policy
    (one with ``plan``, see ``medslim.decompose.ranks``) ``policy.plan(...)`` once for all
    layers; then clamped to ``[rank_min, C]`` and rounded up to a multiple of
    ``rank_multiple`` (capped at ``C``). The stem gets ``rank_in=None``.

    ``guard``: ``"params"`` replaces a layer only if that lowers its parameter count,
    ``"params+flops"`` also its MACs, ``"latency"`` only if its Tucker form is measurably
    faster than the dense conv at the layer's input shape for ``input_shape``, ``None``
    always (DF = 1 sanity check). Latency (the ``latency`` guard, or a policy with
    ``measures_latency``) is measured by ``timer`` (default: ``LayerTimer()``, cached per
    device under ``$MEDSLIM_CACHE``); it and every network-level policy need
    ``input_shape = [1, C_in, *patch]``. ``progress(name)`` is called before each layer.

    Raises:
        MedslimError: unknown ``method``/``guard``, ``rank_min < 1``, ``rank_multiple < 1``,
            latency or a network-level policy without ``input_shape``, or see ``eligible_convs``.
    """
    if method not in METHODS:
        raise MedslimError(f"unknown decomposition method '{method}'{did_you_mean(method, [m for m in METHODS if m])}; "
                           f"choose one of {', '.join(METHODS)}")
    if guard not in GUARDS:
        raise MedslimError(f"unknown rank guard {guard!r}{did_you_mean(str(guard), [g for g in GUARDS if g])}; "
                           f"choose 'params', 'params+flops', 'latency' or None")
    if isinstance(rank_min, bool) or not isinstance(rank_min, int) or rank_min < 1:
        raise MedslimError(f"rank_min must be a positive integer, got {rank_min!r}")
    check_rank_multiple(rank_multiple)
    planned = is_network_policy(policy)
    timed = guard == "latency" or (planned and getattr(policy, "measures_latency", False))
    if (timed or planned) and input_shape is None:
        what = "the rank guard 'latency'" if guard == "latency" else f"the rank policy '{getattr(policy, 'name', policy)}'"
        raise MedslimError(f"{what} needs each layer's real input shape; pass input_shape "
                           f"[1, C_in, *patch] (the nnU-Net patch)")
    new = copy.deepcopy(net)
    stem = stem_name(new)
    convs = eligible_convs(new, include_stem=include_stem, include_1x1=include_1x1)
    parents = module_parents(new)
    record = DecompositionRecord(settings={"policy": repr(policy), "method": method, "guard": guard,
                                           "rank_min": rank_min, "rank_multiple": rank_multiple})
    sites: dict[str, LayerSite] = {}
    if timed:
        timer = timer if timer is not None else LayerTimer()
        record.settings.update(latency_device=timer.cache.device, latency_threads=timer.threads)
    if timed or planned:
        record.settings.update(input_shape=list(input_shape))
        shapes = conv_input_shapes(new, input_shape, convs)
        sites = {name: LayerSite(conv, ("out",) if name == stem else ("in", "out"), shapes[name])
                 for name, conv in convs.items()}
    plan = policy.plan(sites, timer=timer, rank_min=rank_min, rank_multiple=rank_multiple,
                       progress=progress) if planned else {}
    for name, conv in convs.items():
        if progress is not None:
            progress(name)
        modes = ("out",) if name == stem else ("in", "out")
        if planned and plan.get(name) is None:
            seconds = timer.layer_seconds(conv, sites[name].spatial) if timed else None
            record.layers[name] = replace(_layer_record(conv, LayerRanks(None, None)), reason="rank policy: kept dense",
                                          seconds_dense=seconds)
            continue
        proposed = plan[name] if planned else policy(conv.weight.detach(), transposed=bool(conv.transposed),
                                                     modes=modes)
        ranks = finalize_ranks(proposed, conv.in_channels, conv.out_channels, rank_min=rank_min,
                               rank_multiple=rank_multiple)
        base = _layer_record(conv, ranks)
        if timed:
            base = replace(base, seconds_dense=timer.layer_seconds(conv, sites[name].spatial),
                           seconds_tucker=timer.layer_seconds(conv, sites[name].spatial, ranks))
        reason = _guard_reason(base, guard)
        if reason:
            record.layers[name] = replace(base, reason=reason)
            continue
        tucker, f = TuckerConv.from_conv(conv, ranks.rank_in, ranks.rank_out, method=method)
        replace_module(parents, conv, tucker)
        record.layers[name] = replace(base, replaced=True, rel_error=f.rel_error,
                                      discarded_energy=f.discarded_energy)
    return new, record


def spec_conv(modules: Mapping[str, nn.Module], name: str, verb: str) -> _ConvNd:
    """The convolution a compression spec names (``verb``: what the spec does to it).

    Raises:
        MedslimError: the network has no such module, or it is not a convolution.
    """
    conv = modules.get(name)
    if conv is None:
        raise MedslimError(f"the compression spec {verb} `{name}`, which the network does not have"
                           f"{did_you_mean(name, list(modules))}; was the spec made for another architecture?")
    if not isinstance(conv, _ConvNd):
        raise MedslimError(f"the compression spec {verb} `{name}`, which is a {type(conv).__name__}, "
                           f"not a convolution; was the spec made for another architecture?")
    return conv


def apply_ranks(net: nn.Module, ranks: Mapping[str, LayerRanks]) -> nn.Module:
    """Structure-only rebuild: a deep copy of ``net`` (the base architecture) with each named
    conv replaced by ``TuckerConv.empty_like`` (default-initialised weights), ready for a
    strict ``load_state_dict`` of a decomposed network's state dict. ``net`` is not modified.

    Raises:
        MedslimError: a name that is not a convolution of ``net``, or a rank outside ``[1, C]``.
    """
    new = copy.deepcopy(net)
    modules = dict(new.named_modules(remove_duplicate=False))
    chosen: dict[int, tuple[str, nn.Module, LayerRanks]] = {}
    for name, r in ranks.items():
        conv = spec_conv(modules, name, "decomposes")
        _check_ranks(name, conv, r)
        if id(conv) in chosen and chosen[id(conv)][2] != r:
            raise MedslimError(f"the compression spec gives `{chosen[id(conv)][0]}` and its alias `{name}` "
                               f"different ranks ({chosen[id(conv)][2].to_list()} vs {r.to_list()})")
        chosen[id(conv)] = (name, conv, r)
    parents = module_parents(new)
    for _, conv, r in chosen.values():
        replace_module(parents, conv, TuckerConv.empty_like(conv, r.rank_in, r.rank_out))
    return new


def tucker_params(conv: _ConvNd, ranks: LayerRanks) -> int:
    """Parameter count of ``TuckerConv(conv, *ranks)`` (elementwise if the ranks are integer
    arrays of broadcastable shapes, as the ``budget`` rank policy passes them)."""
    c_in, c_out = conv.in_channels, conv.out_channels
    r_in, r_out = _or_dense(ranks.rank_in, c_in), _or_dense(ranks.rank_out, c_out)
    k = math.prod(conv.kernel_size)
    return ((0 if ranks.rank_in is None else c_in * r_in) + r_in * r_out * k
            + (0 if ranks.rank_out is None else r_out * c_out) + (c_out if conv.bias is not None else 0))


def conv_macs(conv: _ConvNd, ranks: LayerRanks | None, spatial: Sequence[int]) -> float:
    """Multiply-accumulates of one forward pass of ``conv`` (dense if ``ranks`` is None, else
    its ``TuckerConv``) on an input of spatial shape ``spatial``; elementwise on rank arrays.
    Output size from the conv arithmetic, so odd sizes after strides are exact."""
    v_out = math.prod(_output_size(conv, spatial))
    return _macs_at(conv, ranks, v_in=float(math.prod(spatial)), v_out=float(v_out))


def _macs(conv: _ConvNd, ranks: LayerRanks | None) -> float:
    """MACs per output voxel; the input has ``prod(stride)`` times more (conv) or fewer
    (transposed conv) voxels than the output."""
    s = float(math.prod(conv.stride))
    return _macs_at(conv, ranks, v_in=1 / s if conv.transposed else s, v_out=1.0)


def _macs_at(conv: _ConvNd, ranks: LayerRanks | None, *, v_in: float, v_out: float) -> float:
    """MACs for ``v_in`` input and ``v_out`` output voxels: the 1×…×1 projections run at their
    own resolution, the core (and a dense conv) per output voxel, or per input voxel when
    transposed."""
    v_core = v_in if conv.transposed else v_out
    k = math.prod(conv.kernel_size)
    c_in, c_out = conv.in_channels, conv.out_channels
    if ranks is None:
        return c_in * c_out * k * v_core
    r_in, r_out = _or_dense(ranks.rank_in, c_in), _or_dense(ranks.rank_out, c_out)
    return ((0 if ranks.rank_in is None else c_in * r_in * v_in) + r_in * r_out * k * v_core
            + (0 if ranks.rank_out is None else r_out * c_out * v_out))


def _or_dense(rank, channels: int):
    return channels if rank is None else rank


def _output_size(conv: _ConvNd, spatial: Sequence[int]) -> list[int]:
    """Output spatial size of ``conv`` for input size ``spatial`` (PyTorch's conv arithmetic)."""
    if conv.padding == "same":
        return list(spatial)
    padding = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
    dims = zip(spatial, conv.kernel_size, conv.stride, padding, conv.dilation, conv.output_padding)
    if conv.transposed:
        return [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, d, op in dims]
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d, _ in dims]


def _layer_record(conv: _ConvNd, ranks: LayerRanks) -> LayerRecord:
    return LayerRecord(ranks=ranks, c_in=conv.in_channels, c_out=conv.out_channels,
                       kernel=tuple(conv.kernel_size), transposed=bool(conv.transposed),
                       params_before=sum(p.numel() for p in conv.parameters()),
                       params_after=tucker_params(conv, ranks), macs_before=_macs(conv, None),
                       macs_after=_macs(conv, ranks), replaced=False)


def _guard_reason(rec: LayerRecord, guard: str | None) -> str:
    if guard is None:
        return ""
    if guard == "latency":
        if rec.seconds_tucker >= rec.seconds_dense:
            return f"guard: Tucker {format_seconds(rec.seconds_tucker)} ≥ dense {format_seconds(rec.seconds_dense)}"
        return ""
    if rec.params_after >= rec.params_before:
        return f"guard: {rec.params_after} params after ≥ {rec.params_before} before"
    if guard == "params+flops" and rec.macs_after >= rec.macs_before:
        return f"guard: {rec.macs_after:.0f} MACs/voxel after ≥ {rec.macs_before:.0f} before"
    return ""


def _check_ranks(name: str, conv: _ConvNd, r: LayerRanks) -> None:
    if r.rank_in is None and r.rank_out is None:
        raise MedslimError(f"the compression spec gives `{name}` no rank at all; give rank_in and/or rank_out")
    if conv.groups != 1:
        raise MedslimError(f"`{name}` is a grouped convolution (groups={conv.groups}); Tucker-2 does not apply")
    for what, rank, c in (("input", r.rank_in, conv.in_channels), ("output", r.rank_out, conv.out_channels)):
        if rank is None:
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MedslimError(f"rank {rank!r} for the {what} mode of `{name}` is not a positive integer")
        if rank > c:
            raise MedslimError(f"rank {rank} exceeds the {c} {what} channels of `{name}`; "
                               f"use a rank ≤ {c} (DF in (0, 1])")


def _all_convs(net: nn.Module) -> dict[str, _ConvNd]:
    """Every ConvNd/ConvTransposeNd by first name, after checking the network is decomposable."""
    convs: dict[str, _ConvNd] = {}
    dim: int | None = None
    for name, m in net.named_modules():
        if isinstance(m, (TuckerConv, CPDConv)):
            kind = "Tucker" if isinstance(m, TuckerConv) else "CP"
            raise MedslimError(f"the network is already {kind}-decomposed (`{name}`); "
                               f"decompose the original network, or rebuild with apply_ranks/apply_cp")
        if _holds_conv_alias(m) and not isinstance(m.conv, (_ConvNd, TuckerConv, CPDConv)):
            raise MedslimError(f"`{name}.conv` is a {type(m.conv).__name__} where nnU-Net expects a convolution; "
                               f"medslim can only decompose Conv/ConvTranspose layers")
        if not isinstance(m, _ConvNd):
            continue
        d = len(m.kernel_size)
        if dim is None:
            dim = d
        elif d != dim:
            raise MedslimError(f"`{name}` is a {type(m).__name__} in a {dim}D network (first conv is {dim}D); "
                               f"medslim expects one spatial dimension throughout")
        convs[name] = m
    if not convs:
        raise MedslimError(f"the network ({type(net).__name__}) has no convolution to decompose")
    return convs


def _holds_conv_alias(m: nn.Module) -> bool:
    """nnU-Net's ``ConvDropoutNormReLU``: ``conv`` aliases the first entry of ``all_modules``."""
    return "conv" in m._modules and "all_modules" in m._modules


def module_parents(net: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each module id, every ``(parent, key)`` registering it (aliases included)."""
    index: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in net.modules():
        for key, child in parent._modules.items():
            if child is not None:
                index.setdefault(id(child), []).append((parent, key))
    return index


def replace_module(parents: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (``parents`` from ``module_parents``; aliases too)."""
    # _modules[key] = ... works for attributes and Sequential/ModuleList entries alike
    for parent, key in parents.get(id(old), []):
        parent._modules[key] = new
