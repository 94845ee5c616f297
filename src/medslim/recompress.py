"""Iterative compression (compress a little, fine-tune, repeat): one more stage on a network
that is already compressed.

A stage shrinks every Tucker rank by ``rank_factor`` (``shrink_tucker``: the core is
re-decomposed and its factors merged into the 1×1 projections) and prunes ``prune_ratio`` of
the current candidate channels with the criterion, then composes the spec: ranks are the new
ones, kept channels are indices into the *base* decomposed network (``kept_2 ∘ kept_1``), so
``CompressedUNet`` rebuilds the result from the base architecture in one step. Only the
``outer`` site: rank-site pruning changes ranks, which this composition does not track.
Layers left dense by the first stage stay dense.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from medslim.compress import CompressConfig
from medslim.decompose.apply import module_parents, replace_module
from medslim.decompose.truncate import shrink_tucker
from medslim.errors import MedslimError
from medslim.network import CompressedUNet
from medslim.prune import example_input, prunable_layers, prune_network
from medslim.prune.sites import stem_output
from medslim.score import ScoreContext, get_criterion
from medslim.spec import CompressionSpec, LayerRanks


def shrink_rank(rank: int | None, factor: float, rank_min: int) -> int | None:
    """``ceil(factor · rank)``, at least ``rank_min`` (and never above ``rank``)."""
    if rank is None:
        return None
    return min(rank, max(rank_min, math.ceil(round(factor * rank, 9))))


def compose_kept(before: Mapping[str, Sequence[int]], now: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Kept channels relative to the unpruned layer: ``now`` indexes the channels ``before`` kept."""
    out = {k: tuple(v) for k, v in before.items()}
    for name, idx in now.items():
        base = before.get(name)
        out[name] = tuple(int(base[i]) for i in idx) if base is not None else tuple(int(i) for i in idx)
    return out


def compress_further(net: CompressedUNet, config: CompressConfig, rank_factor: float, input_shape: Sequence[int],
                     calibration: Tensor | None = None, calibration_target: Tensor | None = None) -> CompressedUNet:
    """One more stage on a copy of ``net`` (deep supervision off; ``net`` is not modified).

    Args:
        config: the stage's criterion, ``prune_ratio`` (of the current channels), ``rank_min``,
            ``prune_site`` (must be ``outer``).
        rank_factor: every rank becomes ``ceil(rank_factor · rank)``, in ``(0, 1]``.
        input_shape: ``[1, C_in, *patch]``.
    Returns:
        the new ``CompressedUNet`` (eval mode) with the composed spec.
    """
    if config.prune_site != "outer":
        raise MedslimError("iterative compression supports prune_site 'outer' only")
    if net.spec.cp:
        raise MedslimError("iterative compression of a CP-decomposed model (--decomposition cp) is not supported; "
                           "compress the original model again with the new settings")
    if not 0.0 < rank_factor <= 1.0:
        raise MedslimError(f"rank_factor must be in (0, 1], got {rank_factor}")
    config.check_calibration(calibration is not None)
    work = copy.deepcopy(net).eval()
    modules = dict(work.named_modules(remove_duplicate=False))
    parents = module_parents(work)
    ranks: dict[str, LayerRanks] = {}
    for name in net.spec.ranks:
        module = modules[name]
        r_in, r_out = (shrink_rank(r, rank_factor, config.rank_min) for r in module.ranks)
        shrunk = shrink_tucker(module, r_in, r_out)
        replace_module(parents, module, shrunk)
        ranks[name] = LayerRanks(*shrunk.ranks)
    layers = prunable_layers(work, config.prune_site, prune_stem=config.prune_stem)
    kept: dict[str, tuple[int, ...]] = {}
    if config.prune_ratio > 0 and layers:
        ctx = ScoreContext(input_shape=tuple(input_shape), engine=config.engine, seed=config.seed,
                           calibration=calibration, calibration_target=calibration_target)
        scores = get_criterion(config.criterion)(work, layers, ctx)
        example = example_input(work, int(input_shape[1]))
        protect = () if config.prune_stem else (stem_output(work),)
        work, record = prune_network(work, layers, scores, config.prune_ratio, example, protect=protect)
        kept = record.kept
    provenance = dict(net.spec.provenance)
    provenance["stages"] = [*provenance.get("stages", [dict(provenance.get("config", {}))]),
                            {**config.to_dict(), "rank_factor": rank_factor}]
    spec = CompressionSpec(ranks=ranks, kept=compose_kept(net.spec.kept, kept), provenance=provenance)
    return CompressedUNet.wrap(work, spec).eval()
