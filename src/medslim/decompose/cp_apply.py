"""Per-filter CP (NORTON) on whole networks: which convs, the parameter guard, and the
structure-only rebuild from a spec's ``cp`` record.

Eligible convolutions are Tucker's (``eligible_convs``: heads, grouped and 1×…×1 convs
excluded; the stem included) minus transposed convolutions, which ``CPDConv`` does not
handle. The stem (``C_in = 1``) usually fails the parameter guard at ``R ≥ 3``
(``R·(1 + Σk) ≥ prod(k)``) and stays dense, as Tucker only shrinks its output mode.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import replace

from torch import nn
from torch.nn.modules.conv import _ConvNd

from medslim.decompose.apply import (DecompositionRecord, LayerRecord, _layer_record, eligible_convs, spec_conv,
                                     module_parents, replace_module)
from medslim.decompose.cp import N_ITER_MAX, CPDConv, check_cp_conv, cp_params
from medslim.errors import MedslimError
from medslim.spec import LayerRanks

CP_GUARDS = ("params", None)


def check_cp_rank(rank: object, option: str = "--cp-rank") -> int:
    """``rank`` if it is an integer ≥ 1, else ``MedslimError``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MedslimError(f"{option} must be an integer ≥ 1 (rank-1 terms per filter), got {rank!r}")
    return rank


def decompose_network_cp(net: nn.Module, rank: int, *, guard: str | None = "params", n_iter_max: int = N_ITER_MAX,
                         progress: Callable[[str], None] | None = None) -> tuple[nn.Module, DecompositionRecord]:
    """Deep copy of ``net`` with every eligible conv replaced by ``CPDConv`` at ``rank``
    (``net`` is not modified). ``guard="params"`` keeps a layer dense unless that lowers its
    parameter count; ``None`` always replaces. Records carry ``cp_rank``, ``rel_error`` and,
    in ``discarded_energy["nmse"]``, the paper's per-filter NMSE of the layer.

    Raises:
        MedslimError: bad ``rank`` or ``guard``, or see ``eligible_convs``.
    """
    check_cp_rank(rank, "CP rank")
    if guard not in CP_GUARDS:
        raise MedslimError(f"unknown CP guard {guard!r}; choose 'params' or None")
    new = copy.deepcopy(net)
    parents = module_parents(new)
    record = DecompositionRecord(settings={"decomposition": "cp", "cp_rank": rank, "guard": guard,
                                           "n_iter_max": n_iter_max})
    for name, conv in eligible_convs(new, include_stem=True).items():
        if conv.transposed:
            record.layers[name] = replace(_layer_record(conv, LayerRanks(None, None)),
                                          reason="transposed conv: CP not supported, kept dense")
            continue
        if progress is not None:
            progress(name)
        base = cp_record(conv, rank)
        if guard == "params" and base.params_after >= base.params_before:
            record.layers[name] = replace(base, reason=f"guard: {base.params_after} params after ≥ "
                                                       f"{base.params_before} before")
            continue
        module, f = CPDConv.from_conv(conv, rank, n_iter_max=n_iter_max)
        replace_module(parents, conv, module)
        record.layers[name] = replace(base, replaced=True, rel_error=f.rel_error, discarded_energy={"nmse": f.nmse})
    return new, record


def cp_record(conv: _ConvNd, rank: int) -> LayerRecord:
    """The layer record of a dense conv, with CP's parameters and MACs per output voxel."""
    base = _layer_record(conv, LayerRanks(None, None))
    n = conv.out_channels * rank
    macs = conv.in_channels * n * math.prod(conv.stride) + n * sum(conv.kernel_size)  # projection at input resolution
    return replace(base, cp_rank=rank, params_after=cp_params(conv, rank), macs_after=float(macs))


def apply_cp(net: nn.Module, cp: Mapping[str, int]) -> nn.Module:
    """Structure-only rebuild: a deep copy of ``net`` with each named conv replaced by an
    untrained ``CPDConv`` of the given rank, ready for a strict ``load_state_dict``.

    Raises:
        MedslimError: a name that is not a convolution of ``net``, or a bad rank.
    """
    new = copy.deepcopy(net)
    modules = dict(new.named_modules(remove_duplicate=False))
    parents = module_parents(new)
    done: set[int] = set()
    for name, rank in cp.items():
        conv = spec_conv(modules, name, "CP-decomposes")
        check_cp_conv(conv)
        check_cp_rank(rank, f"the CP rank of `{name}`")
        if id(conv) not in done:
            replace_module(parents, conv, CPDConv(conv, rank))
            done.add(id(conv))
    return new

