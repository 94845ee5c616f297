"""The compression pipeline (SPEC §4, Algorithm 2 without the fine-tune):
decompose every eligible conv (Tucker-2, or NORTON's per-filter CP) → score channels on the
decomposed network → prune ρ per layer (or ρ of all candidate channels, ranked globally).

Data flows one way: ``CompressConfig`` (validated up front) + a network → ``Compressed``
(the new network, its ``CompressionSpec`` and the records of what each stage did).
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from medslim.decompose import decompose_network, decompose_network_cp, get_rank_policy
from medslim.decompose.apply import GUARDS, DecompositionRecord
from medslim.decompose.cp_apply import check_cp_rank
from medslim.decompose.budget_ranks import BUDGET_TARGETS
from medslim.decompose.latency import LayerTimer
from medslim.decompose.ranks import check_rank_multiple
from medslim.decompose.tucker import METHODS
from medslim.errors import MedslimError, did_you_mean
from medslim.prune import PRUNE_SITES, PruneRecord, check_selection, example_input, prunable_layers, prune_network
from medslim.prune.sites import stem_output
from medslim.score import ScoreContext, check_criterion, get_criterion, list_criteria
from medslim.score.relief import alpha_keep_counts, check_alpha
from medslim.spec import CompressionSpec

Progress = Callable[[str, str], None]  # (stage, layer name)
DECOMPOSITIONS = ("tucker", "cp")
#: criteria that cannot score ``CPDConv`` outputs, and why
CP_UNSCORED = {"relief": "its connection scores need ungrouped convolutions"}


@dataclass(frozen=True)
class CompressionSettings:
    """The compression knobs, shared by ``CompressConfig`` and the fine-tune config (which
    validates them through ``CompressConfig`` only when it compresses). ``df`` is the thesis'
    'downsampling factor' (a rank ratio); ``prune_ratio`` is ρ, the fraction of channels
    removed per layer. ``rank_multiple`` rounds every rank up to a multiple (capped at C).
    ``latency_budget`` (rank policy ``latency``) is the target time of the decomposable convs
    as a fraction of their measured dense time; ``guard="latency"`` keeps a layer dense unless
    its Tucker form is measured faster (both measure on this machine, cached per device).
    ``budget`` (rank policy ``budget``) is the target parameters or FLOPs (``budget_target``)
    of the decomposable convs as a fraction of their dense total. ``selection``: ``"layer"``
    removes ρ of each layer's (group's) channels; ``"global"`` ranks the L2-normalised scores
    of all candidate channels together and removes ρ of them, at least one kept per group
    (``medslim.prune.select.global_keep_counts``: wide layers lose more).
    ``decomposition="cp"``: NORTON's per-filter CP at ``cp_rank`` instead of Tucker-2 (the
    rank-policy knobs and ``method`` are then unused; the guard is ``params`` or None), then
    filters of the CP blocks are pruned like convolutions (``norton`` compares the blocks' own
    factors; ``relief`` cannot score them); ``cp_rank`` is also the rank the ``norton``
    criterion decomposes dense filters with."""

    df: float = 0.3
    rank_policy: str = "df"
    energy: float = 0.9
    latency_budget: float = 0.5
    budget: float = 0.1
    budget_target: str = "params"
    rank_min: int = 1
    rank_multiple: int = 1
    method: str = "hosvd"
    guard: str | None = "params"
    prune_ratio: float = 0.5
    criterion: str = "hvs"
    engine: str = "channel"
    prune_site: str = "outer"
    prune_stem: bool = False
    selection: str = "layer"
    decomposition: str = "tucker"
    cp_rank: int = 3


@dataclass(frozen=True)
class CompressConfig(CompressionSettings):
    """How to compress: validated settings + the seed (``random`` criterion).
    ``with_calibration``: the caller will pass calibration patches to ``compress_network``, so
    a data-aware criterion (``hvs_data``, ``taylor``, ``relief``) is accepted here; without, it
    fails now (unless nothing is scored: ``prune_ratio`` 0 and no ``alpha``).
    ``alpha`` (criterion ``relief`` only, in (0, 1]): each layer keeps the fewest channels
    holding α of its relief score mass (``medslim.score.relief.alpha_count``) instead of a
    fixed ratio; ``prune_ratio`` is then set to 0 and ``selection`` must be ``"layer"``."""

    seed: int = 0
    with_calibration: bool = False
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.decomposition not in DECOMPOSITIONS:
            raise MedslimError(f"unknown --decomposition '{self.decomposition}'; choose one of "
                               f"{', '.join(DECOMPOSITIONS)}{did_you_mean(str(self.decomposition), DECOMPOSITIONS)}")
        check_cp_rank(self.cp_rank)
        if self.decomposition == "cp" and self.guard not in ("params", None):
            raise MedslimError(f"--guard {self.guard} does not apply to --decomposition cp; use params or none")
        if not 0.0 < self.df <= 1.0:
            raise MedslimError(f"--df must be in (0, 1], got {self.df}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise MedslimError(f"--prune must be in [0, 1), got {self.prune_ratio}")
        if not 0.0 < self.energy <= 1.0:
            raise MedslimError(f"--energy must be in (0, 1], got {self.energy}")
        if isinstance(self.latency_budget, bool) or not 0.0 < self.latency_budget <= 1.0:
            raise MedslimError(f"--latency-budget must be in (0, 1] (a fraction of the dense convs' measured time), "
                               f"got {self.latency_budget}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0.0 < self.budget <= 1.0:
            raise MedslimError(f"--budget must be in (0, 1] (a fraction of the dense convs' {self.budget_target}), "
                               f"got {self.budget}")
        if self.budget_target not in BUDGET_TARGETS:
            raise MedslimError(f"unknown --budget-target '{self.budget_target}'; "
                               f"choose one of {', '.join(BUDGET_TARGETS)}")
        if isinstance(self.rank_min, bool) or not isinstance(self.rank_min, int) or self.rank_min < 1:
            raise MedslimError(f"--rank-min must be an integer ≥ 1, got {self.rank_min!r}")
        check_rank_multiple(self.rank_multiple)
        if self.guard not in GUARDS:
            raise MedslimError(f"unknown rank guard {self.guard!r}; choose 'params', 'params+flops', 'latency' or None")
        if self.method not in METHODS:
            raise MedslimError(f"unknown decomposition method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.prune_site not in PRUNE_SITES:
            raise MedslimError(f"unknown prune site '{self.prune_site}'; choose one of {', '.join(PRUNE_SITES)}")
        check_selection(self.selection)
        check_alpha(self.alpha, self.criterion)
        if self.alpha is not None:
            if self.selection != "layer":
                raise MedslimError("--alpha sets each layer's count itself; it does not combine with --selection global")
            object.__setattr__(self, "prune_ratio", 0.0)  # the record says what ran: no fixed ratio
        if self.decomposition == "cp" and self.prunes and self.prune_site == "rank":
            raise MedslimError("--prune-site rank prunes Tucker ranks, which --decomposition cp does not have; "
                               "use --prune-site outer")
        if self.decomposition == "cp" and self.prunes and self.criterion in CP_UNSCORED:
            raise MedslimError(f"--criterion {self.criterion} cannot score CP blocks ({CP_UNSCORED[self.criterion]}); "
                               f"with --decomposition cp choose one of "
                               f"{', '.join(c for c in list_criteria() if c not in CP_UNSCORED)}")
        self.rank_policy_fn()  # unknown policy → MedslimError now, not after minutes of work
        self.check_calibration(self.with_calibration)
        ScoreContext(engine=self.engine)

    def check_calibration(self, calibration: bool) -> None:
        """``MedslimError`` if channels are scored (``prunes``) by a criterion that needs
        calibration data and ``calibration`` is false."""
        check_criterion(self.criterion, calibration=calibration or not self.prunes,
                        hint="given by --calibration IMAGES (compress_network(calibration=...) in Python)")

    @property
    def prunes(self) -> bool:
        """Whether channels are scored and pruned (a ratio ρ > 0, or the α rule)."""
        return self.prune_ratio > 0 or self.alpha is not None

    def rank_policy_fn(self):
        params = {"df": {"df": self.df}, "energy": {"energy": self.energy},
                  "latency": {"budget": self.latency_budget},
                  "budget": {"budget": self.budget, "target": self.budget_target}}.get(self.rank_policy, {})
        return get_rank_policy(self.rank_policy, **params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Compressed:
    network: nn.Module
    spec: CompressionSpec
    decomposition: DecompositionRecord | None
    pruning: PruneRecord
    seconds: dict[str, float] = field(default_factory=dict)


def compress_network(net: nn.Module, config: CompressConfig, input_shape: Sequence[int],
                     progress: Progress | None = None, timer: LayerTimer | None = None,
                     calibration: Tensor | None = None, calibration_target: Tensor | None = None) -> Compressed:
    """Compress a copy of ``net`` (a ``PlainConvUNet``/``ResidualEncoderUNet``; not modified).

    Args:
        net: the trained network, deep supervision off.
        config: validated settings.
        input_shape: ``[1, C_in, *patch]``, the nnU-Net patch (HVS ``spatial`` engine, FLOPs,
            the layers' input shapes for the ``latency``/``budget`` rank policies and guard).
        timer: measures layer latency (default ``LayerTimer()``: this machine, cached per device).
        calibration: ``[B, C_in, *patch]`` patches for data-aware criteria (``hvs_data``,
            ``taylor``, ``relief``; e.g. ``medslim.score.calibration.calibration_patches``).
        calibration_target: ``[B, *patch]`` integer labels of ``calibration`` (``taylor``'s
            loss; default: the model's own argmax).
    Returns:
        ``Compressed`` with the new network (eval mode) and its spec.
    Raises:
        MedslimError: a data-aware criterion without ``calibration`` (before any work).
    """
    config.check_calibration(calibration is not None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    step = (lambda name: progress("decompose", name)) if progress else None
    if config.decomposition == "cp":
        decomposed, drec = decompose_network_cp(net, config.cp_rank, guard=config.guard, progress=step)
    else:
        decomposed, drec = decompose_network(
            net, config.rank_policy_fn(), method=config.method, guard=config.guard, rank_min=config.rank_min,
            rank_multiple=config.rank_multiple, input_shape=tuple(input_shape), timer=timer, progress=step)
    seconds["decompose"] = time.perf_counter() - t

    t = time.perf_counter()
    layers = prunable_layers(decomposed, config.prune_site, prune_stem=config.prune_stem)
    if config.prunes and layers:
        ctx = ScoreContext(input_shape=tuple(input_shape), engine=config.engine, seed=config.seed,
                           calibration=calibration, calibration_target=calibration_target, cp_rank=config.cp_rank)
        scores = get_criterion(config.criterion)(decomposed.eval(), layers, ctx)
    else:
        scores = {}
    seconds["score"] = time.perf_counter() - t

    t = time.perf_counter()
    example = example_input(decomposed, int(input_shape[1]))
    protect = () if config.prune_stem else (stem_output(decomposed),)
    pruned, prec = prune_network(decomposed, layers if scores else [], scores, config.prune_ratio, example,
                                 protect=protect, progress=(lambda name: progress("prune", name)) if progress else None,
                                 selection=config.selection,
                                 keep=None if config.alpha is None else functools.partial(alpha_keep_counts,
                                                                                          alpha=config.alpha))
    seconds["prune"] = time.perf_counter() - t

    spec = CompressionSpec(ranks=drec.ranks, kept=prec.kept, cp=drec.cp_ranks,
                           provenance={"config": config.to_dict(), "prune_layers": layers})
    return Compressed(pruned.eval(), spec, drec, prec, seconds)
