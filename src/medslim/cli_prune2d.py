"""``medslim prune2d``: a thin shell over :func:`medslim.classify.prune2d.run_prune2d`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from medslim.classify.prune2d import CALIBRATION_IMAGES  # no torch at import time
from medslim.cli_common import console, out_console

if TYPE_CHECKING:
    from rich.console import Console

# Spelled out, not built from medslim.score.list_criteria(): that import (torch) would add ~2 s to
# `medslim --help`; tests/test_prune2d_data.py checks that this lists every registered criterion.
CRITERION_HELP = ("hvs | nisp | l1 | l2 | consumer_l1 | norton | random; data-aware, scored on --calibration-images "
                  "training images: hvs_data | relief | taylor")


def print_results(result: dict, out: Console) -> None:
    """The results as a rich table on ``out``."""
    from rich.table import Table

    table = Table(title=f"prune2d: {result['criterion']}, {result['scope']} scope")
    for col in ("ratio", "params", "FLOPs", "acc pruned", "acc fine-tuned", "Δ vs unpruned", "Δ vs control"):
        table.add_column(col, justify="right")
    o = result["original"]
    table.add_row("0 (unpruned)", f"{o['params']:,}", f"{o['flops'] / 1e6:.1f} M", f"{o['accuracy']:.3f}",
                  f"{result['control']['accuracy']:.3f} (control)" if result["control"] else "-", "", "")
    pp = lambda v: "-" if v is None else f"{100 * v:+.1f} pp"  # noqa: E731
    for run in result["runs"]:
        table.add_row(f"{run['ratio']:.2f}", f"{run['params'][1]:,} (−{100 * run['param_reduction']:.1f} %)",
                      f"{run['flops'][1] / 1e6:.1f} M (−{100 * run['flop_reduction']:.1f} %)",
                      "-" if run["accuracy_pruned"] is None else f"{run['accuracy_pruned']:.3f}",
                      "-" if run["accuracy_finetuned"] is None else f"{run['accuracy_finetuned']:.3f}",
                      pp(run["delta_vs_original"]), pp(run["delta_vs_control"]))
    out.print(table)


def prune2d(
    model: str = typer.Argument(..., help="classifier checkpoint (medslim save_classifier .pt) or a torchvision name (random init)"),
    data: Path = typer.Option(..., "--data", help="MedMNIST .npz file (test split evaluated, train split fine-tunes and calibrates)"),
    output: Path = typer.Option(..., "-o", "--output", help="new output folder"),
    ratio: Optional[list[float]] = typer.Option(None, "--ratio", help="fraction of channels removed, in [0, 1); repeat for several [default: 0.3]"),
    criterion: str = typer.Option("hvs", "--criterion", help=CRITERION_HELP),
    scope: str = typer.Option("layer", "--scope", help="layer (ρ per layer) | global (ρ of all candidate channels)"),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="AdamW lr 1e-4 batch 32 epochs after pruning"),
    seed: int = typer.Option(0, "--seed", help="seed of the random criterion, the calibration draw and the fine-tune"),
    calibration_images: int = typer.Option(CALIBRATION_IMAGES, "--calibration-images", help="training images the data-aware criteria score with (drawn with --seed)"),
    size: int = typer.Option(28, "--size", help="input side length (vgg16 needs ≥ 32)"),
    prune_linear: bool = typer.Option(False, "--prune-linear", help="also prune hidden Linear layers (VGG classifier)"),
    control: bool = typer.Option(True, "--control/--no-control", help="also fine-tune the unpruned model (the control)"),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="fine-tune on a seeded subset of this many images"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
    regularizer: Optional[str] = typer.Option(None, "--regularizer", help="lobster | serene | dprp: compress while fine-tuning (instead of --criterion at --ratio); needs --finetune-epochs"),
    reg_lambda: float = typer.Option(1e-3, "--reg-lambda", help="λ of lobster/serene"),
    reg_tolerance: float = typer.Option(0.05, "--reg-tolerance", help="lobster/serene: relative validation-loss increase each threshold step may cost"),
    dprp_epsilon: float = typer.Option(0.01, "--dprp-epsilon", help="dprp: cut a rank at the first singular-value ratio ≤ ε"),
) -> None:
    """Prune a 2D classifier with HVS (or another criterion), fine-tune, and report accuracy, params and FLOPs."""
    from medslim.classify.prune2d import run_prune2d

    ratios = ratio if ratio or regularizer else [0.3]
    result = run_prune2d(model, data, output, ratios or [], criterion, scope, finetune_epochs, seed, size,
                         prune_linear, control, max_train, overwrite, console=console,
                         calibration_images=calibration_images, regularizer=regularizer, reg_lambda=reg_lambda,
                         reg_tolerance=reg_tolerance, dprp_epsilon=dprp_epsilon)
    print_results(result, out_console)
    out_console.print(f"wrote {output}")
