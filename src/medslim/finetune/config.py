"""Fine-tune settings for the nnU-Net trainers: schedule presets, a flat JSON config file
(``MEDSLIM_CONFIG``), validated before any training starts.

Precedence, lowest first: schedule preset < the trainer variant's fixed keys < config file <
environment (``MEDSLIM_EPOCHS``, ``MEDSLIM_ITERS``, ``MEDSLIM_SEED``). A config file may not
contradict a key the trainer variant fixes (e.g. ``df`` of ``nnUNetTrainerMedslim_DF0p3_P0p5``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from medslim.compress import CompressConfig, CompressionSettings
from medslim.errors import MedslimError, did_you_mean
from medslim.mapping_file import read_mapping
from medslim.finetune.distill import KD_LEVELS
from medslim.finetune.regularize import REGULARIZERS
from medslim.network import is_compressed

# Thesis: Adam, lr 1e-4, 200 updates (4 epochs x 50). Weber et al. 2025: AdamW, lr 1e-5,
# 50 epochs (nnU-Net epochs of 250 iterations), rank_min 8. nnunet: nnU-Net's own recipe
# (SGD, Nesterov momentum 0.99, lr 1e-2, poly, weight decay 3e-5) for 1,000 updates.
SCHEDULES: dict[str, dict[str, Any]] = {
    "nnunet": {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "lr_schedule": "poly", "epochs": 20,
               "iterations": 50},
    "thesis": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "epochs": 4, "iterations": 50},
    "weber": {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 1e-2, "epochs": 50, "iterations": 250,
              "rank_min": 8},
}
OPTIMIZERS = ("adam", "adamw", "sgd")
INITS = ("pretrained", "scratch")
LR_SCHEDULES = ("constant", "poly")
ENV_OVERRIDES = {"MEDSLIM_EPOCHS": "epochs", "MEDSLIM_ITERS": "iterations", "MEDSLIM_SEED": "seed"}

_COMPRESS_KEYS = tuple(f.name for f in fields(CompressionSettings))


@dataclass(frozen=True)
class FinetuneConfig(CompressionSettings):
    """One fine-tune run: whether/how to compress (the ``CompressionSettings`` fields, flat as
    in the JSON config), and the schedule.

    ``epochs`` x ``iterations`` optimizer updates; ``val_iterations`` batches of nnU-Net's
    pseudo-Dice per epoch. ``dataset_name``/``plans_name``/``configuration``, when given, must
    match the plans the trainer is started with.

    ``kd_weight`` λ > 0 distils from the original network (``medslim.finetune.distill``) at
    temperature ``kd_temperature`` on deep-supervision ``kd_levels`` ``all`` or ``top``.
    ``init="scratch"`` keeps the compressed architecture but re-initialises every weight as
    nnU-Net does (He, neg. slope 1e-2): the train-from-scratch control. ``final_validation``
    runs nnU-Net's validation of the fold at the end (off in sweeps, which score with medslim).
    ``calibration_batches`` training batches feed data-aware criteria (``hvs_data``, ``taylor``,
    ``relief``). ``alpha`` (criterion ``relief`` only): each layer keeps the fewest channels
    holding α of its score mass instead of ``prune_ratio`` (``medslim compress --alpha``).
    ``steps`` > 1 reaches the target in stages (compress a little, fine-tune, repeat): each
    stage multiplies the ranks by ``DF^(1/steps)`` and removes ``1 − (1 − ρ)^(1/steps)`` of the
    current channels, at epochs ``round(i · epochs / steps)`` (``medslim.recompress``).

    ``regularizer`` ``lobster`` / ``serene`` (``medslim.finetune.sparsify``) shrinks insensitive
    weights / channels by ``reg_lambda`` λ after every update; after ``reg_patience`` epochs
    without a lower validation loss, and at the end, it zeroes what lies below the threshold
    that keeps the validation loss within ``reg_tolerance`` (relative); SeReNe then removes the
    zeroed channels. λ 1e-3 is also the λ chosen on validation on the digits proxy
    (``benchmarks/results/train_time_methods/selection.md``: larger λ cost accuracy first).

    ``dprp`` (``medslim.finetune.dprp``, the uncompressed model only) trains every eligible conv
    as SVD factors with nnU-Net's loss + ``dprp_orth``·L_orth + ``dprp_sort``·L_sort +
    ``dprp_comp``·L_comp (Sharma et al. 2025: 1000, 1, λ_comp 0.1–1), cuts each layer's rank at
    the first singular-value ratio ≤ ``dprp_epsilon`` (ε, paper 0.001–0.1) every
    ``dprp_cut_every`` epochs and at the end, and writes ``TuckerConv`` layers (``dprp_guard``
    ``params``: layers whose factored form is not smaller are written back dense; ``none``:
    never). Defaults λ_comp 0.1, ε 0.01 are the paper's middle values; on the digits proxy the
    validation choice is λ_comp 2, ε 0.1 (2.5 % fewer parameters; ``selection.md``)."""

    compress: bool = True
    schedule: str = "thesis"
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    epochs: int = 4
    iterations: int = 50
    val_iterations: int = 5
    save_every: int = 5
    seed: int = 12345
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_levels: str = "all"
    init: str = "pretrained"
    final_validation: bool = True
    calibration_batches: int = 4
    steps: int = 1
    regularizer: str = "none"
    reg_lambda: float = 1e-3
    reg_tolerance: float = 0.05
    reg_patience: int = 2
    dprp: bool = False
    dprp_orth: float = 1000.0
    dprp_sort: float = 1.0
    dprp_comp: float = 0.1
    dprp_epsilon: float = 0.01
    dprp_cut_every: int = 1
    dprp_guard: str = "params"
    alpha: float | None = None
    dataset_name: str | None = None
    plans_name: str | None = None
    configuration: str | None = None

    def __post_init__(self) -> None:
        for key, choices in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                             ("init", INITS), ("kd_levels", KD_LEVELS), ("regularizer", REGULARIZERS)):
            value = getattr(self, key)
            if value not in choices:
                raise MedslimError(f"unknown {key} '{value}'{did_you_mean(str(value), list(choices))}; "
                                   f"choose one of {', '.join(choices)}")
        if not 0.0 < self.reg_lambda < 1.0:
            raise MedslimError(f"reg_lambda must be in (0, 1), got {self.reg_lambda}")
        if self.reg_tolerance < 0:
            raise MedslimError(f"reg_tolerance must be >= 0 (a relative validation-loss increase), got {self.reg_tolerance}")
        if self.regularizer != "none" and self.steps > 1:
            raise MedslimError(f"regularizer '{self.regularizer}' with iterative compression (steps > 1) is not supported")
        self._check_dprp()
        if self.kd_weight < 0:
            raise MedslimError(f"kd_weight must be >= 0, got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise MedslimError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not 0.0 < self.lr <= 1.0:
            raise MedslimError(f"lr must be in (0, 1], got {self.lr}")
        if self.weight_decay < 0:
            raise MedslimError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("epochs", "iterations", "val_iterations", "save_every", "calibration_batches", "steps",
                    "reg_patience"):
            if getattr(self, key) < 1:
                raise MedslimError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rank_min < 1:
            raise MedslimError(f"rank_min must be >= 1, got {self.rank_min}")
        if self.steps > self.epochs:
            raise MedslimError(f"steps ({self.steps}) must not exceed epochs ({self.epochs}): one stage per epoch at most")
        if self.steps > 1 and self.alpha is not None:
            raise MedslimError("alpha (relief's α rule) with iterative compression (steps > 1) is not supported: "
                               "the later stages would not prune")
        if self.steps > 1 and self.prune_site != "outer":
            raise MedslimError("iterative compression (steps > 1) supports prune_site 'outer' only")
        if self.compress:
            self.compression()  # CompressConfig validates df, prune_ratio, criterion, site, ...

    def _check_dprp(self) -> None:
        from medslim.finetune.dprp import GUARDS

        if self.dprp_guard not in GUARDS:
            raise MedslimError(f"unknown dprp_guard '{self.dprp_guard}'{did_you_mean(self.dprp_guard, GUARDS)}; "
                               f"choose one of {', '.join(GUARDS)}")
        for key in ("dprp_orth", "dprp_sort", "dprp_comp"):
            if getattr(self, key) < 0:
                raise MedslimError(f"{key} must be >= 0 (a loss weight), got {getattr(self, key)}")
        if not 0.0 < self.dprp_epsilon < 1.0:
            raise MedslimError(f"dprp_epsilon must be in (0, 1) (a singular-value ratio), got {self.dprp_epsilon}")
        if self.dprp_cut_every < 1:
            raise MedslimError(f"dprp_cut_every must be >= 1 (epochs), got {self.dprp_cut_every}")
        if self.dprp and self.compress:
            raise MedslimError("dprp trains the uncompressed model's convs as SVD factors; set compress false "
                               "(nnUNetTrainerMedslimDPRP does)")
        if self.dprp and self.kd_weight > 0:
            raise MedslimError("dprp with distillation (kd_weight > 0) is not supported; set kd_weight 0")
        if self.dprp and self.regularizer != "none":
            raise MedslimError(f"dprp with regularizer '{self.regularizer}' is not supported; use one of them")

    @property
    def can_continue(self) -> bool:
        """Whether a stopped run can go on from its last checkpoint (``nnUNetv2_train --c``) with
        nothing lost. Not with a regulariser (its masks and validation-loss history), DPRP (its
        SVD factors) or stages (the stage schedule): the checkpoints do not hold them."""
        return self.regularizer == "none" and not self.dprp and self.steps == 1

    def compression(self) -> CompressConfig:
        """The ``CompressConfig`` these settings describe (the trainers feed data-aware
        criteria with ``calibration_batches`` training batches)."""
        from medslim.score.registry import NEEDS_CALIBRATION

        return CompressConfig(seed=self.seed, with_calibration=self.criterion in NEEDS_CALIBRATION, alpha=self.alpha,
                              **{k: getattr(self, k) for k in _COMPRESS_KEYS})

    def stage_compression(self) -> CompressConfig:
        """The compression of each of ``steps`` stages (``compression()`` when ``steps`` is 1):
        DF ``df^(1/steps)`` (stage 1; later stages scale ranks by the same factor) and
        ``prune_ratio`` ``1 − (1 − ρ)^(1/steps)`` of the channels present."""
        k = self.steps
        return replace(self.compression(), df=self.df ** (1 / k), prune_ratio=1 - (1 - self.prune_ratio) ** (1 / k))

    def stage_epochs(self) -> list[int]:
        """The epoch at whose start each stage compresses (the first at 0)."""
        return [round(i * self.epochs / self.steps) for i in range(self.steps)]

    @property
    def updates(self) -> int:
        return self.epochs * self.iterations

    def check_plans(self, plans: Mapping[str, Any], configuration: str) -> None:
        """Raises ``MedslimError`` if the config names another dataset/plans/configuration, or
        if compression is asked of plans that already describe a medslim-compressed network."""
        for key, actual in (("dataset_name", plans.get("dataset_name")), ("plans_name", plans.get("plans_name")),
                            ("configuration", configuration)):
            wanted = getattr(self, key)
            if wanted is not None and wanted != actual:
                raise MedslimError(f"the medslim config expects {key} '{wanted}' but nnU-Net was started with '{actual}'")
        arch = plans["configurations"][configuration].get("architecture", {})
        if self.compress and is_compressed(arch):
            raise MedslimError(f"plans '{plans.get('plans_name')}' already describe a medslim-compressed network; "
                               "fine-tune from the original plans and checkpoint")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["updates"] = self.updates
        out["compression"] = self.compression().to_dict() if self.compress else None
        return out


_TYPES: dict[str, tuple[type, ...]] = {}
for _f in fields(FinetuneConfig):
    _t = str(_f.type)
    _TYPES[_f.name] = ((bool,) if _t == "bool" else (int,) if _t == "int" else (int, float) if _t == "float"
                       else (int, float, type(None)) if _t == "float | None"
                       else (str, type(None)) if "None" in _t else (str,))


def _typed(key: str, value: Any, source: str) -> Any:
    ok = _TYPES[key]
    kind = ("a number or null" if float in ok and type(None) in ok else "a number" if float in ok
            else "a string or null" if type(None) in ok else f"a {ok[0].__name__}")
    if (isinstance(value, bool) and bool not in ok) or not isinstance(value, ok):
        raise MedslimError(f"{source}: '{key}' must be {kind}, got {value!r}")
    return float(value) if float in ok and value is not None else value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and type-check a flat JSON config (unknown keys are errors)."""
    return read_config_dict(read_mapping(path, "MEDSLIM_CONFIG file"), str(path))


def read_config_dict(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Type-check flat config keys (unknown keys are errors); ``source`` names them in errors."""
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise MedslimError(f"unknown key(s) {', '.join(unknown)} in {source}; allowed: {', '.join(_TYPES)}")
    return {k: _typed(k, v, source) for k, v in data.items()}


def config_from_dict(data: Mapping[str, Any], source: str) -> FinetuneConfig:
    """The validated config a ``MEDSLIM_CONFIG`` holding ``data`` gives (schedule preset < ``data``)."""
    return resolve_config({}, None, {}, from_file=read_config_dict(data, source), source=source)


def resolve_config(fixed: Mapping[str, Any] | None = None, config_file: str | Path | None = None,
                   environ: Mapping[str, str] | None = None, from_file: Mapping[str, Any] | None = None,
                   source: str | None = None) -> FinetuneConfig:
    """Merge preset < ``fixed`` (trainer variant) < file (or ``from_file``, already read) <
    environment into a validated config.

    Raises:
        MedslimError: unknown keys, wrong types, out-of-range values, or a file contradicting ``fixed``.
    """
    fixed = dict(fixed or {})
    environ = environ or {}
    if from_file is None:
        from_file = read_config_file(config_file) if config_file else {}
    source = source or str(config_file)
    for key, value in from_file.items():
        if key in fixed and fixed[key] != value:
            raise MedslimError(f"the trainer fixes {key}={fixed[key]!r} but {source} sets {value!r}; "
                               "remove it from the config or use nnUNetTrainerMedslim")
    schedule = from_file.get("schedule", fixed.get("schedule", "thesis"))
    if schedule not in SCHEDULES:
        raise MedslimError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    merged: dict[str, Any] = {**SCHEDULES[schedule], **fixed, **from_file}
    for var, key in ENV_OVERRIDES.items():
        if environ.get(var):
            try:
                merged[key] = int(environ[var])
            except ValueError:
                raise MedslimError(f"{var} must be an integer, got '{environ[var]}'") from None
    return FinetuneConfig(**merged)
