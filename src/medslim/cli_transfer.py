"""``medslim transfer``: layer selection for transfer learning (thesis ch. 3, Algorithm 1).

Thin shells over :mod:`medslim.transfer.command`; bad input → one stderr line, exit code 2
(handled by the ``medslim`` app, :class:`medslim.cli_common.MedslimGroup`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from medslim.cli_common import console, out_console

if TYPE_CHECKING:
    from rich.progress import Progress


transfer_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Choose which layers to fine-tune by weight divergence (thesis ch. 3) and compare with baselines.")

SOURCE_HELP = "source classifier: a .pt from save_classifier (e.g. scripts/train_source_classifier.py), or resnet18 | vgg16 | timm:<name>"


def _ints(text: str) -> tuple[int, ...]:
    from medslim.errors import MedslimError

    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise MedslimError(f"expected comma-separated integers, got '{text}'") from None


def _config(method: str, k: int, rule: str, percentile: float, scope: str, direction: str, initial_epochs: int,
            layers: Optional[str], epochs: int, lr: float, milestones: str, optimizer: str, weight_decay: float,
            batch_size: int, alpha: float, beta: float, seed: int, train_bn: bool):
    from medslim.classify.train import TrainConfig
    from medslim.transfer.pipeline import TransferConfig

    train = TrainConfig(epochs=epochs, lr=lr, milestones=_ints(milestones), optimizer=optimizer,
                        weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    return TransferConfig(method=method, k=k, rule=rule, percentile=percentile, scope=scope, direction=direction,
                          initial_epochs=initial_epochs, train_bn=train_bn, l2sp_alpha=alpha, l2sp_beta=beta,
                          layers=tuple(s.strip() for s in (layers or "").split(",") if s.strip()), train=train)


class _Bars:
    """One rich bar per training phase: the initial fine-tune, then one per method."""

    def __init__(self, progress: Progress, initial_epochs: int, epochs: int):
        self.progress, self.epochs, self.task = progress, {"initial": initial_epochs}, None
        self.final_epochs = epochs

    def __call__(self, phase: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        if epoch == 0 and batch == 0 or self.task is None:
            total = self.epochs.get(phase, self.final_epochs) * batches
            self.task = self.progress.add_task(phase, total=total)
        self.progress.update(self.task, advance=1, description=f"{phase} · epoch {epoch + 1} · loss {loss:.3f}")


def _progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# options shared by both commands
_O = dict(
    data=typer.Option(..., "--data", help="target MedMNIST .npz (e.g. ../shared/data/medmnist/breastmnist.npz)"),
    output=typer.Option(..., "-o", "--output", help="new output folder"),
    k=typer.Option(3, "-k", "--k", help="layers to select (top_k, last-k, random-k)"),
    rule=typer.Option("top_k", "--rule", help="top_k | percentile"),
    percentile=typer.Option(90.0, "--percentile", help="percentile threshold in [0, 100] (rule percentile)"),
    scope=typer.Option("global", "--scope", help="global | blockwise (per stage)"),
    direction=typer.Option("t||s", "--direction", help="KL direction: t||s = KL(P_tuned‖P_source) | s||t"),
    initial_epochs=typer.Option(3, "--initial-epochs", help="epochs of the initial full fine-tune (step 1)"),
    epochs=typer.Option(40, "--epochs", help="epochs of the final fine-tune"),
    lr=typer.Option(1e-2, "--lr"),
    milestones=typer.Option("15,30", "--milestones", help="epochs where lr ×0.1 (comma-separated)"),
    optimizer=typer.Option("sgd", "--optimizer", help="sgd | adamw"),
    weight_decay=typer.Option(0.0, "--weight-decay"),
    batch_size=typer.Option(32, "--batch-size"),
    alpha=typer.Option(0.01, "--alpha", help="L2-SP α (method l2sp)"),
    beta=typer.Option(0.01, "--beta", help="L2-SP β on the head (method l2sp)"),
    seed=typer.Option(0, "--seed"),
    size=typer.Option(28, "--size", help="image side length (vgg16 needs ≥ 32)"),
    max_train=typer.Option(None, "--max-train", help="use a seeded random subset of this many training images"),
    max_test=typer.Option(None, "--max-test", help="use a seeded random subset of this many test images"),
    test_split=typer.Option("test", "--test-split", help="split scored: test | val"),
    train_bn=typer.Option(True, "--train-bn/--freeze-bn", help="also train the BatchNorm after each selected conv"),
    overwrite=typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
)


@transfer_app.command("select")
def select(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = _O["data"], output: Path = _O["output"],
    measure: str = typer.Option("kl", "--measure", help="kl | js | w1 | frobenius"),
    k: int = _O["k"], rule: str = _O["rule"], percentile: float = _O["percentile"], scope: str = _O["scope"],
    direction: str = _O["direction"], initial_epochs: int = _O["initial_epochs"], lr: float = _O["lr"],
    optimizer: str = _O["optimizer"], weight_decay: float = _O["weight_decay"], batch_size: int = _O["batch_size"],
    seed: int = _O["seed"], size: int = _O["size"], max_train: Optional[int] = _O["max_train"],
    overwrite: bool = _O["overwrite"],
) -> None:
    """Fine-tune briefly, rank layers by divergence from the source and select the top ones."""
    from rich.table import Table

    from medslim.transfer.command import DataSpec, select_command

    config = _config(measure, k, rule, percentile, scope, direction, initial_epochs, None, 1, lr, "", optimizer,
                     weight_decay, batch_size, 0.0, 0.0, seed, True)
    with _progress() as p:
        outcome = select_command(source, DataSpec(data, size, max_train), output, config, overwrite,
                                 _Bars(p, initial_epochs, 0))
    table = Table(title=f"{measure} divergence per layer ({direction})")
    for col in ("#", "layer", "stage", "divergence", "selected"):
        table.add_column(col, justify="right" if col in ("#", "divergence") else "left")
    for row in outcome.divergences.itertuples():
        table.add_row(str(row.index + 1), row.layer, row.stage, f"{row.divergence:.4g}", "✔" if row.selected else "")
    out_console.print(table)
    out_console.print(f"selected: {', '.join(outcome.layers)}", highlight=False, soft_wrap=True)
    out_console.print(f"wrote {outcome.output}", highlight=False, soft_wrap=True)


@transfer_app.command("run")
def run(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    data: Path = _O["data"], output: Path = _O["output"],
    method: str = typer.Option("kl", "--method", help="comma-separated: kl | js | w1 | frobenius | feature | full | "
                                                      "last-k | random-k | l2sp | layers"),
    layers: Optional[str] = typer.Option(None, "--layers", help="comma-separated layer names (method layers)"),
    k: int = _O["k"], rule: str = _O["rule"], percentile: float = _O["percentile"], scope: str = _O["scope"],
    direction: str = _O["direction"], initial_epochs: int = _O["initial_epochs"], epochs: int = _O["epochs"],
    lr: float = _O["lr"], milestones: str = _O["milestones"], optimizer: str = _O["optimizer"],
    weight_decay: float = _O["weight_decay"], batch_size: int = _O["batch_size"], alpha: float = _O["alpha"],
    beta: float = _O["beta"], seed: int = _O["seed"], size: int = _O["size"],
    max_train: Optional[int] = _O["max_train"], max_test: Optional[int] = _O["max_test"],
    test_split: str = _O["test_split"], train_bn: bool = _O["train_bn"],
    save_models: bool = typer.Option(True, "--save-models/--no-save-models", help="write model_<method>.pt files"),
    overwrite: bool = _O["overwrite"],
) -> None:
    """Algorithm 1 and/or baselines: fine-tune from the source on the target, report test accuracy."""
    from rich.table import Table

    from medslim.transfer.command import DataSpec, run_command

    names = [m.strip() for m in method.split(",") if m.strip()]
    configs = [_config(m, k, rule, percentile, scope, direction, initial_epochs, layers, epochs, lr, milestones,
                       optimizer, weight_decay, batch_size, alpha, beta, seed, train_bn) for m in names]
    spec = DataSpec(data, size, max_train, max_test, test_split)
    with _progress() as p:
        outcome = run_command(source, spec, output, names, configs[0] if configs else None, overwrite,
                              save_models, _Bars(p, initial_epochs, epochs))
    table = Table(title=f"transfer {source} → {data.name} ({outcome.results[0].test['n']} {test_split} images)")
    for col in ("method", "accuracy", "AUC", "trainable params", "layers"):
        table.add_column(col, justify="left" if col in ("method", "layers") else "right", overflow="fold")
    for row in outcome.table.itertuples():
        table.add_row(row.method, f"{row.accuracy:.4f}", "-" if row.auc is None or row.auc != row.auc else f"{row.auc:.4f}",
                      f"{row.trainable_params:,}", row.layers)
    out_console.print(table)
    out_console.print(f"wrote {outcome.output}", highlight=False, soft_wrap=True)
