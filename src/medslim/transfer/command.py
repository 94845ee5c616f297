"""Library functions behind ``medslim transfer select`` and ``medslim transfer run``.

Both validate everything before training, then write a new output folder atomically
(``medslim.atomic``), so a failed run leaves no folder behind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
from torch import nn

from medslim.atomic import atomic_folder, check_output_folder
from medslim.classify.data import MedMNIST, load_medmnist
from medslim.classify.models import build_classifier, is_checkpoint_path, load_checkpoint, save_classifier
from medslim.errors import MedslimError
from medslim.transfer.divergence import MEASURES
from medslim.transfer.pipeline import (PipelineProgress, TransferConfig, TransferResult, choose_layers,
                                       initial_finetune, run_transfer, validate)


@dataclass(frozen=True)
class DataSpec:
    """Target data: a MedMNIST ``.npz``, the image size, and optional seeded subsets (for quick runs)."""

    path: Path
    size: int = 28
    max_train: int | None = None
    max_test: int | None = None
    test_split: str = "test"


def load_source(source: str, target_classes: int) -> tuple[nn.Module, str, int]:
    """(source model with its own head, architecture name, input channels). An architecture name
    (no checkpoint) gives a randomly initialised source sized for the target."""
    if is_checkpoint_path(source):
        ckpt = load_checkpoint(source)
        return build_classifier(ckpt), ckpt["arch"], ckpt["in_channels"]
    return build_classifier(source, target_classes, 3), source, 3


def load_data(spec: DataSpec, channels: int, seed: int) -> tuple[MedMNIST, MedMNIST]:
    train = load_medmnist(spec.path, "train", spec.size, channels)
    test = load_medmnist(spec.path, spec.test_split, spec.size, channels)
    if spec.max_train and spec.max_train < len(train):
        train = train.subset(spec.max_train, seed)
    if spec.max_test and spec.max_test < len(test):
        test = test.subset(spec.max_test, seed)
    return train, test


def plot_divergences(table: pd.DataFrame, path: Path, title: str) -> None:
    """Bar per candidate layer (module order), coloured by stage, selected layers outlined (thesis Fig. 3.2)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(table["stage"]))
    cmap = plt.get_cmap("tab10")
    colors = [cmap(stages.index(s) % 10) for s in table["stage"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(table)), 3.6), dpi=100)
    selected = table["selected"] if "selected" in table else [False] * len(table)
    ax.bar(table["index"] + 1, table["divergence"], color=colors,
           edgecolor=["black" if s else "none" for s in selected], linewidth=1.6)
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap(i % 10), label=s) for i, s in enumerate(stages)]
    ax.set_xlabel("layer (module order; outlined = selected)")
    ax.set_ylabel("mean per-filter divergence")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=handles, fontsize=7, ncol=min(len(stages), 6), loc="upper right")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


@dataclass
class SelectOutcome:
    layers: list[str]
    divergences: pd.DataFrame
    output: Path


def select_command(source: str, data: DataSpec, output: Path, config: TransferConfig, overwrite: bool = False,
                   progress: PipelineProgress | None = None) -> SelectOutcome:
    """Steps 1–4 of Algorithm 1: initial fine-tune, divergences, selection → ``output`` with
    ``divergences.csv``, ``selection.json`` and ``divergence.png``."""
    if config.method not in MEASURES:
        raise MedslimError(f"select needs a divergence measure ({' | '.join(MEASURES)}), got '{config.method}'")
    check_output_folder(output.expanduser(), overwrite)
    model = load_source(source, 2)
    train, _ = load_data(data, model[2], config.train.seed)
    validate(model[0], config)
    tuned = initial_finetune(model[0], train, config, train.num_classes, progress)
    layers, table = choose_layers(model[0], config, tuned[0])

    with atomic_folder(output, overwrite) as tmp:
        table.to_csv(tmp / "divergences.csv", index=False)
        _write_json(tmp / "selection.json", {"source": source, "data": str(data.path), "layers": layers,
                                             "config": config.to_dict(), "initial": tuned[1]})
        plot_divergences(table, tmp / "divergence.png", f"{config.method} ({config.direction}), {source} → {data.path.stem}")
    return SelectOutcome(layers, table, output.expanduser().resolve())


@dataclass
class RunOutcome:
    results: list[TransferResult]
    table: pd.DataFrame
    output: Path


def result_row(r: TransferResult) -> dict:
    return {"method": r.method, "accuracy": r.test["accuracy"], "auc": r.test["auc"], "n_test": r.test["n"],
            "trainable_params": r.trainable_params, "total_params": r.total_params,
            "layers": "all" if r.method in ("full", "l2sp") else ",".join(r.layers) or "(head only)",
            "seconds": round(r.seconds, 2)}


def run_command(source: str, data: DataSpec, output: Path, methods: Sequence[str], config: TransferConfig,
                overwrite: bool = False, save_models: bool = True,
                progress: PipelineProgress | None = None) -> RunOutcome:
    """Run each of ``methods`` (shared initial fine-tune for the divergence methods) and write
    ``results.json``, ``results.csv``, ``divergences_<measure>.csv``/``.png`` and ``model_<method>.pt``."""
    if not methods:
        raise MedslimError("no method given")
    configs = [replace(config, method=m) for m in methods]
    check_output_folder(output.expanduser(), overwrite)
    source_model, arch, channels = load_source(source, 2)
    train, test = load_data(data, channels, config.train.seed)
    for c in configs:
        validate(source_model, c)
    tuned = None
    results = []
    for c in configs:
        if c.method in MEASURES and tuned is None:
            tuned = initial_finetune(source_model, train, c, train.num_classes, progress)
        results.append(run_transfer(source_model, train, test, c, train.num_classes, tuned, progress))
    table = pd.DataFrame([result_row(r) for r in results])

    with atomic_folder(output, overwrite) as tmp:
        table.to_csv(tmp / "results.csv", index=False)
        _write_json(tmp / "results.json", {
            "source": source, "data": str(data.path), "train_items": len(train), "test_items": len(test),
            "test_split": data.test_split, "config": config.to_dict(), "results": [r.to_dict() for r in results]})
        for r in results:
            if r.divergences is not None:
                r.divergences.to_csv(tmp / f"divergences_{r.method}.csv", index=False)
                plot_divergences(r.divergences, tmp / f"divergence_{r.method}.png",
                                 f"{r.method} ({config.direction}), {source} → {data.path.stem}")
            if save_models:
                save_classifier(r.model, tmp / f"model_{r.method}.pt", arch, train.num_classes,
                                {"method": r.method, "test": r.test, "source": source, "layers": r.layers})
    return RunOutcome(results, table, output.expanduser().resolve())
