"""A sweep file (YAML) and the cells it expands to.

Every cell is one compress → fine-tune → predict → evaluate run with the stock nnU-Net
trainer; the controls are cells of the same sweep, added per seed and per fine-tune variant:

- ``original``: the pretrained model as it is (no training; one cell, seed-independent);
- ``control``: the original + the identical fine-tune (``compress: false``);
- ``compressed``: one per grid point (the grid's compression keys);
- ``scratch``: the compressed architecture from random init, the same budget;
- ``scratch_full``: the same with ``full_updates`` updates (the original's full budget).

A cell's id is readable and stable (kind, the grid values that vary, seed), so a restarted
sweep finds its finished cells by name. All settings are validated through
``FinetuneConfig`` when the file is read, before any cell runs.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medslim.compress import CompressionSettings
from medslim.errors import MedslimError
from medslim.mapping_file import read_mapping
from medslim.finetune.config import SCHEDULES, FinetuneConfig, config_from_dict

KINDS = ("original", "control", "compressed", "scratch", "scratch_full")
CONTROLS = ("original", "control", "scratch", "scratch_full")
# what a cell's method is made of (controls do not vary with these): compression settings and
# the methods that compress while training (sensitivity regularisers, DPRP)
COMPRESSION_KEYS = (frozenset(CompressionSettings.__dataclass_fields__) | {"compress", "init", "alpha", "regularizer", "dprp"}
                    | {k for k in FinetuneConfig.__dataclass_fields__ if k.startswith(("reg_", "dprp_"))})
TOP_KEYS = {"name", "model", "data", "dataset", "plans", "configuration", "fold", "finetune", "seeds", "grid",
            "variants", "controls", "full_updates", "evaluate"}


@dataclass(frozen=True)
class Cell:
    """One run of the sweep. ``settings`` is the flat ``MEDSLIM_CONFIG`` of its fine-tune
    (``None`` for ``original``, which is only evaluated)."""

    id: str
    kind: str
    group: str
    method: str
    seed: int
    settings: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "group": self.group, "method": self.method, "seed": self.seed,
                "settings": self.settings}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file; paths are absolute (relative ones are read from the file's folder)."""

    name: str
    model: Path
    data: dict[str, Any]
    dataset: str
    plans: str
    configuration: str
    fold: int
    finetune: dict[str, Any]
    seeds: tuple[int, ...]
    grid: dict[str, list[Any]]
    variants: tuple[dict[str, Any], ...]
    controls: tuple[str, ...]
    full_updates: int
    evaluate: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["model"], out["seeds"], out["controls"] = str(self.model), list(self.seeds), list(self.controls)
        return json.loads(json.dumps(out, default=str))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file.

    Raises:
        MedslimError: unreadable YAML, unknown keys, or any cell whose settings
            ``FinetuneConfig`` rejects (e.g. an unknown criterion) — before any work.
    """
    path = Path(path)
    raw = read_mapping(path, "sweep file", fmt="yaml")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise MedslimError(f"unknown key(s) {', '.join(unknown)} in {path}; allowed: {', '.join(sorted(TOP_KEYS))}")
    base = path.parent.resolve()

    def resolve(value: Any) -> Any:
        return str((base / value).resolve()) if isinstance(value, str) and not value.startswith("/") else value

    from medslim.api import DEFAULT_MODEL

    model = raw.get("model", "default")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise MedslimError(f"{path}: 'grid' must map setting names to non-empty lists of values")
    variants = raw.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise MedslimError(f"{path}: 'variants' must be a list of mappings (settings of one point each)")
    controls = tuple(raw.get("controls", CONTROLS))
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise MedslimError(f"{path}: unknown control(s) {', '.join(map(str, bad))}; choose from {', '.join(CONTROLS)}")
    seeds = tuple(raw.get("seeds", [12345]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise MedslimError(f"{path}: 'seeds' must be a non-empty list of integers")
    data = {k: (resolve(v) if k != "prepare" else v) for k, v in (raw.get("data") or {}).items()}
    spec = SweepSpec(
        name=str(raw.get("name", path.stem)), model=DEFAULT_MODEL if model == "default" else Path(resolve(model)),
        data=data, dataset=str(raw.get("dataset", "Dataset004_Hippocampus")),
        plans=str(raw.get("plans", "nnUNetPlansSmall")), configuration=str(raw.get("configuration", "3d_fullres")),
        fold=int(raw.get("fold", 0)), finetune=dict(raw.get("finetune") or {}), seeds=seeds, grid=grid,
        variants=tuple(dict(v) for v in variants),
        controls=controls, full_updates=int(raw.get("full_updates", 2000)), evaluate=dict(raw.get("evaluate") or {}))
    for cell in expand(spec):
        if cell.settings is not None:
            config_from_dict(cell.settings, f"{path} (cell {cell.id})")
    return spec


def _label(key: str, value: Any) -> str:
    return f"{key}-{value}"


def _method(settings: dict[str, Any]) -> str:
    """Series label: the criterion (``tucker`` when nothing is pruned), rank policy, ``kd``."""
    if settings.get("regularizer", "none") != "none":
        return str(settings["regularizer"])
    if settings.get("dprp"):
        return "dprp"
    parts = [str(settings.get("criterion", "hvs")) if settings.get("prune_ratio", 0.5) > 0 or settings.get("alpha")
             else "tucker"]
    if settings.get("decomposition", "tucker") != "tucker":
        parts.insert(0, str(settings["decomposition"]))
    if settings.get("rank_policy", "df") != "df":
        parts.append(str(settings["rank_policy"]))
    if settings.get("kd_weight", 0):
        parts.append("kd")
    return "+".join(parts)


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of ``spec``: the grid's compressed cells × seeds, and the controls. The
    points are the grid's cartesian product, each merged with every entry of ``variants``
    (settings that only make sense together, e.g. a rank policy and its budget)."""
    points = [{**dict(zip(spec.grid, values)), **variant}
              for values in itertools.product(*spec.grid.values()) for variant in spec.variants]
    cells: dict[str, Cell] = {}

    def add(kind: str, point: dict[str, Any], seed: int | None, settings: dict[str, Any] | None, method: str,
            label_keys: list[str]) -> None:
        group = "__".join([kind, *(_label(k, point[k]) for k in label_keys)])
        cid = group if seed is None else f"{group}__s{seed}"
        cells.setdefault(cid, Cell(cid, kind, group, method, seed if seed is not None else 0, settings))

    if "original" in spec.controls:
        add("original", {}, None, None, "original", [])
    for seed in spec.seeds:
        for point in points:
            finetune_only = {k: v for k, v in point.items() if k not in COMPRESSION_KEYS}
            keys = list(point)
            ft_keys = [k for k in keys if k not in COMPRESSION_KEYS]
            base = {**spec.finetune, **point, "seed": seed}
            if "control" in spec.controls:
                ctrl = {**spec.finetune, **finetune_only, "seed": seed, "compress": False}
                add("control", finetune_only, seed, ctrl, "control", ft_keys)
            # a method that compresses while training (compress: false) keeps it; its final
            # architecture is not known beforehand, so it has no from-scratch control
            compress = bool(point.get("compress", True))
            add("compressed", point, seed, {**base, "compress": compress}, _method(base), keys)
            if not compress:
                continue
            if "scratch" in spec.controls:
                add("scratch", point, seed, {**base, "compress": True, "init": "scratch"}, "scratch", keys)
            if "scratch_full" in spec.controls:
                iterations = int(base.get("iterations", _schedule_default(base, "iterations")))
                full = {**base, "compress": True, "init": "scratch",
                        "epochs": max(1, math.ceil(spec.full_updates / iterations))}
                add("scratch_full", point, seed, full, "scratch (full budget)", keys)
    return list(cells.values())


def _schedule_default(settings: dict[str, Any], key: str) -> Any:
    return SCHEDULES[settings.get("schedule", "thesis")].get(key, getattr(FinetuneConfig, key))
