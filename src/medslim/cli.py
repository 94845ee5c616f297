"""``medslim`` command line: thin shells over the library (one public function per command).

User errors (``MedslimError``) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from medslim.cli_common import console, out_console, user_errors
from medslim.cli_prune2d import prune2d
from medslim.cli_transfer import transfer_app
from medslim.errors import MedslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress pretrained nnU-Net / TotalSegmentator models: Tucker-2 + HVS channel pruning.")


@app.command()
@user_errors
def compress(
    model: str = typer.Argument(..., help="nnU-Net results folder, or a TotalSegmentator task (total_fast, total_part1..5)"),
    output: Path = typer.Option(..., "-o", "--output", help="new results folder to write"),
    df: float = typer.Option(0.3, "--df", help="rank ratio DF in (0, 1] (thesis: 'downsampling factor')"),
    prune: float = typer.Option(0.5, "--prune", help="fraction ρ of channels removed per layer, in [0, 1)"),
    criterion: str = typer.Option("hvs", "--criterion", help="hvs | nisp | l1 | l2 | consumer_l1 | random"),
    prune_site: str = typer.Option("outer", "--prune-site", help="outer | rank | all"),
    rank_policy: str = typer.Option("df", "--rank-policy", help="df | energy"),
    energy: float = typer.Option(0.9, "--energy", help="spectral energy kept per mode (rank policy 'energy')"),
    method: str = typer.Option("hosvd", "--method", help="hosvd | hooi"),
    engine: str = typer.Option("channel", "--engine", help="HVS engine: channel (fast) | spatial (exact)"),
    rank_min: int = typer.Option(1, "--rank-min", help="smallest rank of any mode (Weber et al.: 8)"),
    fold: str = typer.Option("0", "--fold", "-f", help="checkpoint fold"),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="checkpoint file name"),
    seed: int = typer.Option(0, "--seed", help="seed (random criterion)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Decompose, score and prune a trained nnU-Net into a new results folder that stock
    nnUNetv2_predict loads."""
    from medslim.compress import CompressConfig
    from medslim.atomic import check_output_folder
    from medslim.load import load_model
    from medslim.api import compress_model

    config = CompressConfig(df=df, prune_ratio=prune, criterion=criterion, prune_site=prune_site,
                            rank_policy=rank_policy, energy=energy, method=method, engine=engine,
                            rank_min=rank_min, seed=seed)
    check_output_folder(output.expanduser(), overwrite)
    loaded = load_model(model, fold, checkpoint)
    report = compress_model(loaded, config, output, overwrite=overwrite, console=console)
    print_report(report)
    out_console.print(f"wrote {output}")


@app.command()
@user_errors
def demo(
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the compressed model (default: a temp folder)"),
    df: float = typer.Option(0.3, "--df"),
    prune: float = typer.Option(0.5, "--prune"),
) -> None:
    """Compress the embedded reference model (nnU-Net, MSD Hippocampus) and segment its demo
    cases with the original and the compressed model."""
    from medslim.api import run_demo

    report = run_demo(output, df=df, prune=prune, console=console)
    print_report(report)
    dice = report["demo_dice"]
    out_console.print(
        f"Dice on {len(dice['cases'])} embedded test cases (no fine-tuning): original {dice['original']:.3f}, "
        f"compressed {dice['compressed']:.3f}")


@app.command()
@user_errors
def evaluate(
    pred: Optional[Path] = typer.Option(None, "--pred", help="predicted label maps (nnU-Net or TotalSegmentator layout)"),
    ref: Optional[Path] = typer.Option(None, "--ref", help="reference label maps: nnU-Net folder, or TotalSegmentator root with meta.csv"),
    model: Optional[Path] = typer.Option(None, "--model", help="predict with this nnU-Net results folder first (instead of --pred)"),
    ref_model: Optional[Path] = typer.Option(None, "--ref-model", help="fidelity: score against this model's predictions (instead of --ref)"),
    images: Optional[Path] = typer.Option(None, "--images", help="nnU-Net images (<case>_0000.nii.gz) for --model/--ref-model"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for per_case.csv, summary.json, summary.md"),
    tolerance: float = typer.Option(3.0, "--tolerance", help="NSD tolerance in mm"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names or ids (default: all)"),
    split: Optional[str] = typer.Option(None, "--split", help="meta.csv split to score (TotalSegmentator layout)"),
    dataset_json: Optional[Path] = typer.Option(None, "--dataset-json", help="nnU-Net dataset.json naming the labels"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes (default min(2, CPUs))"),
    fold: str = typer.Option("0", "--fold", "-f", help="checkpoint fold for --model/--ref-model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Per-class Dice and NSD (DeepMind surfel method) of predictions against references."""
    from medslim.evaluate import evaluate_command

    result = evaluate_command(pred, ref, model=model, ref_model=ref_model, images=images, output=output,
                              tolerance=tolerance, classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                              split=split, dataset_json=dataset_json, workers=workers, fold=fold, overwrite=overwrite,
                              console=console)
    out_console.print(result.markdown, markup=False, highlight=False)
    if result.output is not None:
        out_console.print(f"wrote {result.output}")


@app.command()
@user_errors
def predict(
    model: str = typer.Argument(..., help="nnU-Net results folder (e.g. a compressed TotalSegmentator model), or a TotalSegmentator task"),
    input: Path = typer.Option(..., "-i", "--input", help="one NIfTI image, or a folder of nnU-Net images (<case>_0000.nii.gz)"),
    output: Path = typer.Option(..., "-o", "--output", help="folder (per-structure files / nnU-Net label maps), or with --ml a .nii.gz file"),
    ml: bool = typer.Option(False, "--ml", help="one multi-label map instead of one file per structure (TotalSegmentator's --ml)"),
    roi_subset: Optional[str] = typer.Option(None, "--roi-subset", help="comma-separated structure names to write (single image)"),
    fold: str = typer.Option("0", "--fold", "-f", help="checkpoint fold"),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="checkpoint file name"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
) -> None:
    """Segment with nnU-Net's predictor. One NIfTI image gives TotalSegmentator's outputs
    (<structure>.nii.gz per class, or --ml); a folder gives nnU-Net label maps."""
    import torch

    from medslim.atomic import atomic_folder, check_output_folder
    from medslim.load import load_model
    from medslim.predict import predict_folder, segment_image

    if device not in ("auto", "cpu", "cuda"):
        raise MedslimError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise MedslimError("--device cuda: no CUDA device is available")
    dev = None if device == "auto" else torch.device(device)
    loaded = load_model(model, fold, checkpoint)  # validates the folder; resolves TotalSegmentator tasks
    if input.is_dir():
        if ml or roi_subset:
            raise MedslimError("--ml and --roi-subset apply to a single image; a folder gives nnU-Net label maps")
        check_output_folder(output.expanduser(), overwrite)
        with atomic_folder(output, overwrite) as tmp:
            predict_folder(loaded.folder, input, tmp, fold=loaded.fold, device=dev, checkpoint_name=checkpoint)
    else:
        segment_image(loaded.folder, input, output, ml=ml, fold=loaded.fold, device=dev, checkpoint_name=checkpoint,
                      roi_subset=[r.strip() for r in roi_subset.split(",") if r.strip()] if roi_subset else None,
                      overwrite=overwrite)
    out_console.print(f"wrote {output}", highlight=False, soft_wrap=True)


@app.command("export-bundle")
@user_errors
def export_bundle(
    model: Path = typer.Argument(..., help="nnU-Net results folder (original or compressed by medslim)"),
    output: Path = typer.Option(..., "-o", "--output", help="new bundle folder (must not exist)"),
    fold: str = typer.Option("0", "--fold", "-f", help="checkpoint fold"),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="checkpoint file name"),
) -> None:
    """Write a MONAI bundle (configs, model.pt, model.ts, docs) that `python -m monai.bundle run` runs."""
    from medslim.export.bundle import export_bundle as write_bundle

    bundle = write_bundle(model, output, fold, checkpoint)
    out_console.print(f"wrote {bundle} (from {model}, fold {fold})", highlight=False, soft_wrap=True)


@app.command("nnunet-path")
def nnunet_path() -> None:
    """Print the folder to put in nnUNet_extTrainer (medslim's nnU-Net trainers)."""
    import nnunet_plugin

    print(Path(nnunet_plugin.__file__).resolve().parent)


app.command("prune2d")(prune2d)
app.add_typer(transfer_app, name="transfer", help="Layer selection for transfer learning (thesis ch. 3): select | run.")


def print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title="medslim compression", show_lines=False)
    table.add_column("layer", overflow="fold")
    for col in ("in", "out", "ranks (in, out)", "params"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in report["layers"]:
        ranks = "dense" if row["ranks"] is None else ", ".join("-" if r is None else str(r) for r in row["ranks"])
        table.add_row(row["layer"], f"{row['in'][0]}→{row['in'][1]}", f"{row['out'][0]}→{row['out'][1]}", ranks,
                      f"{row['params'][0]:,}→{row['params'][1]:,}")
    out_console.print(table)
    p, f = report["params"], report["flops"]
    out_console.print(f"parameters {p['original']:,} → {p['compressed']:,}  (×{p['ratio']:.2f}, −{100 * p['reduction']:.1f} %)")
    out_console.print(f"FLOPs/patch {report['input_shape'][2:]} {f['original'] / 1e9:.2f} G → {f['compressed'] / 1e9:.2f} G"
                      f"  (×{f['ratio']:.2f}, −{100 * f['reduction']:.1f} %)")
    out_console.print("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items()))


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # raised by importing torch_pruning
    app()


if __name__ == "__main__":
    sys.exit(main())
