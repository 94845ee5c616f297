"""Fine-tune settings for the nnU-Net trainers: schedule presets, a flat JSON config file
(``MEDSLIM_CONFIG``), validated before any training starts.

Precedence, lowest first: schedule preset < the trainer variant's fixed keys < config file <
environment (``MEDSLIM_EPOCHS``, ``MEDSLIM_ITERS``, ``MEDSLIM_SEED``). A config file may not
contradict a key the trainer variant fixes (e.g. ``df`` of ``nnUNetTrainerMedslim_DF0p3_P0p5``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medslim.compress import CompressConfig, CompressionSettings
from medslim.errors import MedslimError
from medslim.network import is_compressed

# Thesis: Adam, lr 1e-4, 200 updates (4 epochs x 50). Weber et al. 2025: AdamW, lr 1e-5,
# 50 epochs (nnU-Net epochs of 250 iterations), rank_min 8.
SCHEDULES: dict[str, dict[str, Any]] = {
    "thesis": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "epochs": 4, "iterations": 50},
    "weber": {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 1e-2, "epochs": 50, "iterations": 250,
              "rank_min": 8},
}
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "poly")
ENV_OVERRIDES = {"MEDSLIM_EPOCHS": "epochs", "MEDSLIM_ITERS": "iterations", "MEDSLIM_SEED": "seed"}

_COMPRESS_KEYS = tuple(f.name for f in fields(CompressionSettings))


@dataclass(frozen=True)
class FinetuneConfig(CompressionSettings):
    """One fine-tune run: whether/how to compress (the ``CompressionSettings`` fields, flat as
    in the JSON config), and the schedule.

    ``epochs`` x ``iterations`` optimizer updates; ``val_iterations`` batches of nnU-Net's
    pseudo-Dice per epoch. ``dataset_name``/``plans_name``/``configuration``, when given, must
    match the plans the trainer is started with."""

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
    dataset_name: str | None = None
    plans_name: str | None = None
    configuration: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise MedslimError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise MedslimError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise MedslimError(f"unknown lr_schedule '{self.lr_schedule}'; choose one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 < self.lr <= 1.0:
            raise MedslimError(f"lr must be in (0, 1], got {self.lr}")
        if self.weight_decay < 0:
            raise MedslimError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("epochs", "iterations", "val_iterations", "save_every"):
            if getattr(self, key) < 1:
                raise MedslimError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rank_min < 1:
            raise MedslimError(f"rank_min must be >= 1, got {self.rank_min}")
        if self.compress:
            self.compression()  # CompressConfig validates df, prune_ratio, criterion, site, ...

    def compression(self) -> CompressConfig:
        """The ``CompressConfig`` these settings describe."""
        return CompressConfig(seed=self.seed, **{k: getattr(self, k) for k in _COMPRESS_KEYS})

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
                       else (str, type(None)) if "None" in _t else (str,))


def _typed(key: str, value: Any, source: str) -> Any:
    ok = _TYPES[key]
    kind = "a number" if float in ok else "a string or null" if type(None) in ok else f"a {ok[0].__name__}"
    if (isinstance(value, bool) and bool not in ok) or not isinstance(value, ok):
        raise MedslimError(f"{source}: '{key}' must be {kind}, got {value!r}")
    return float(value) if float in ok else value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and type-check a flat JSON config (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise MedslimError(f"MEDSLIM_CONFIG file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MedslimError(f"MEDSLIM_CONFIG file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MedslimError(f"MEDSLIM_CONFIG file {path} must hold a JSON object")
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise MedslimError(f"unknown key(s) {', '.join(unknown)} in {path}; allowed: {', '.join(_TYPES)}")
    return {k: _typed(k, v, str(path)) for k, v in data.items()}


def resolve_config(fixed: Mapping[str, Any] | None = None, config_file: str | Path | None = None,
                   environ: Mapping[str, str] | None = None) -> FinetuneConfig:
    """Merge preset < ``fixed`` (trainer variant) < file < environment into a validated config.

    Raises:
        MedslimError: unknown keys, wrong types, out-of-range values, or a file contradicting ``fixed``.
    """
    fixed = dict(fixed or {})
    environ = environ or {}
    from_file = read_config_file(config_file) if config_file else {}
    for key, value in from_file.items():
        if key in fixed and fixed[key] != value:
            raise MedslimError(f"the trainer fixes {key}={fixed[key]!r} but {config_file} sets {value!r}; "
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
