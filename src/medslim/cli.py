"""``medslim`` command line: thin shells over the library (one public function per command).

Every failure is one line on stderr: exit code 2 for user errors (``MedslimError``, Click usage
errors), 1 for bugs (``medslim --debug ...`` shows the traceback); see :mod:`medslim.cli_common`.
"""
from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from medslim.cli_common import MedslimGroup, console, global_options, out_console
from medslim.cli_prune2d import prune2d
from medslim.cli_sweep import sweep
from medslim.cli_transfer import transfer_app
from medslim.errors import MedslimError

app = typer.Typer(name="medslim", cls=MedslimGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Compress pretrained nnU-Net / TotalSegmentator models: Tucker-2 + HVS channel pruning.")
app.callback()(global_options)  # medslim --debug COMMAND ...


@app.command()
def compress(
    model: str = typer.Argument(..., help="nnU-Net results folder, or a TotalSegmentator task (total_fast, total_part1..5)"),
    output: Path = typer.Option(..., "-o", "--output", help="new results folder to write"),
    df: float = typer.Option(0.3, "--df", help="rank ratio DF in (0, 1] (thesis: 'downsampling factor')"),
    prune: Optional[float] = typer.Option(None, "--prune", help="fraction ρ of channels removed (per layer, or of all candidates with --selection global), in [0, 1); default 0.5, 0 with --decomposition cp"),
    criterion: str = typer.Option("hvs", "--criterion", help="hvs | nisp | l1 | l2 | consumer_l1 | norton | random | hvs_data, taylor, relief (need --calibration)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="relief only, in (0, 1]: each layer keeps the fewest channels holding α of its relief score (instead of --prune)"),
    decomposition: str = typer.Option("tucker", "--decomposition", help="tucker (Tucker-2, ranks from --rank-policy) | cp (NORTON per-filter CP at --cp-rank; --prune then removes filters of the CP blocks, e.g. with --criterion norton)"),
    cp_rank: int = typer.Option(3, "--cp-rank", help="rank-1 terms per filter for --decomposition cp and the norton criterion"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="folder of nnU-Net images (<case>_0000.nii.gz) for data-aware criteria"),
    calibration_patches: int = typer.Option(8, "--calibration-patches", help="patches cut from --calibration (seeded by --seed)"),
    prune_site: str = typer.Option("outer", "--prune-site", help="outer | rank | all"),
    selection: str = typer.Option("layer", "--selection", help="layer: remove ρ per layer | global: ρ of all candidate channels, ranked together"),
    rank_policy: str = typer.Option("df", "--rank-policy", help="df | energy | latency | budget | vbmf"),
    energy: float = typer.Option(0.9, "--energy", help="spectral energy kept per mode (rank policy 'energy')"),
    latency_budget: float = typer.Option(0.5, "--latency-budget", help="rank policy 'latency': conv time as a fraction of the dense convs' measured time"),
    budget: float = typer.Option(0.1, "--budget", help="rank policy 'budget': parameters or FLOPs of the decomposable convs as a fraction of dense"),
    budget_target: str = typer.Option("params", "--budget-target", help="params | flops (rank policy 'budget')"),
    rank_multiple: int = typer.Option(1, "--rank-multiple", help="round ranks up to a multiple (8 suits CPU SIMD)"),
    guard: str = typer.Option("params", "--guard", help="decompose a layer only if it gets smaller: params | params+flops | latency (measured faster here) | none"),
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

    if alpha is not None and prune is not None:
        raise MedslimError("--alpha and --prune both set how many channels stay; give one")
    if prune is None:
        prune = 0.0 if decomposition == "cp" else 0.5
    config = CompressConfig(df=df, prune_ratio=prune, criterion=criterion, decomposition=decomposition, cp_rank=cp_rank, prune_site=prune_site,
                            rank_policy=rank_policy, energy=energy, method=method, engine=engine,
                            rank_min=rank_min, seed=seed, latency_budget=latency_budget,
                            rank_multiple=rank_multiple, guard=None if guard == "none" else guard,
                            budget=budget, budget_target=budget_target, selection=selection,
                            with_calibration=calibration is not None, alpha=alpha)
    check_output_folder(output.expanduser(), overwrite)
    loaded = load_model(model, fold, checkpoint)
    patches = None
    if calibration is not None:
        from medslim.score.calibration import calibration_patches as cut_patches

        patches = cut_patches(loaded, calibration, calibration_patches, seed)
    report = compress_model(loaded, config, output, overwrite=overwrite, console=console, calibration=patches)
    print_report(report)
    out_console.print(f"wrote {output}")


@app.command()
def demo(
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the compressed model (default: a temp folder)"),
    df: Optional[float] = typer.Option(None, "--df", help="default: the embedded compressed model's DF"),
    prune: Optional[float] = typer.Option(None, "--prune", help="default: the embedded compressed model's ρ"),
) -> None:
    """Compress the embedded reference model (nnU-Net, MSD Hippocampus), then segment its demo
    cases with the original, the compressed model before fine-tuning, and the embedded
    compressed + fine-tuned model: Dice, NSD at 1 mm, parameters, FLOPs."""
    from rich.table import Table

    from medslim.api import run_demo

    report = run_demo(output, df=df, prune=prune, console=console)
    print_report(report)
    demo = report["demo"]
    table = Table(title=f"{len(demo['cases'])} embedded test cases (never used in training)")
    for col in ("model", "Dice", "NSD @1 mm", "params", "FLOPs/patch"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in demo["models"]:
        table.add_row(row["model"], f"{row['dice']:.3f}", f"{row['nsd1']:.3f}", f"{row['params']:,}",
                      f"{row['flops'] / 1e9:.2f} G")
    out_console.print(table)


@app.command()
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
def predict(
    model: str = typer.Argument(..., help="nnU-Net results folder (e.g. a compressed TotalSegmentator model), or a TotalSegmentator task"),
    input: Path = typer.Option(..., "-i", "--input", help="one NIfTI image, or a folder of nnU-Net images (<case>_0000.nii.gz)"),
    output: Path = typer.Option(..., "-o", "--output", help="folder (per-structure files / nnU-Net label maps), or with --ml a .nii.gz file"),
    ml: bool = typer.Option(False, "--ml", help="one multi-label map instead of one file per structure (TotalSegmentator's --ml)"),
    roi_subset: Optional[str] = typer.Option(None, "--roi-subset", help="comma-separated structure names to write (single image)"),
    fold: str = typer.Option("0", "--fold", "-f", help="checkpoint fold"),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="checkpoint file name"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnxruntime | openvino | nnunet (nnU-Net's own predictor)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the runtime's choice)"),
    disable_tta: bool = typer.Option(False, "--disable-tta", help="no test-time mirroring (as nnUNetv2_predict --disable_tta)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
) -> None:
    """Segment with nnU-Net's preprocessing and sliding window on the fastest installed runtime
    (--backend nnunet: nnU-Net's own predictor). One NIfTI image gives TotalSegmentator's
    outputs (<structure>.nii.gz per class, or --ml); a folder gives nnU-Net label maps."""
    from medslim.atomic import atomic_folder, check_output_folder
    from medslim.load import load_model
    from medslim.load.images import check_images_fit
    from medslim.predict import predict_folder, segment_image

    dev, options = _runtime_choice(device, backend, threads)
    loaded = load_model(model, fold, checkpoint)  # validates the folder; resolves TotalSegmentator tasks
    check_images_fit(input, loaded.num_input_channels, len(loaded.patch_size), f"model {loaded.folder}")
    if input.is_dir():
        if ml or roi_subset:
            raise MedslimError("--ml and --roi-subset apply to a single image; a folder gives nnU-Net label maps")
        check_output_folder(output.expanduser(), overwrite)
        with atomic_folder(output, overwrite) as tmp:
            predict_folder(loaded.folder, input, tmp, fold=loaded.fold, device=dev, checkpoint_name=checkpoint,
                           backend=backend, options=options, mirroring=not disable_tta, model=loaded)
    else:
        segment_image(loaded.folder, input, output, ml=ml, fold=loaded.fold, device=dev, checkpoint_name=checkpoint,
                      roi_subset=[r.strip() for r in roi_subset.split(",") if r.strip()] if roi_subset else None,
                      overwrite=overwrite, backend=backend, options=options, mirroring=not disable_tta, model=loaded)
    out_console.print(f"wrote {output}", highlight=False, soft_wrap=True)


def _runtime_choice(device: str, backend: str, threads: int | None):
    """``(torch device or None, RuntimeOptions)`` from the flags, checked before any work."""
    import torch

    from medslim.infer import RuntimeOptions, resolve_backend
    from medslim.predict import default_device

    if device not in ("auto", "cpu", "cuda"):
        raise MedslimError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise MedslimError("--device cuda: no CUDA device is available")
    if threads is not None and threads < 1:
        raise MedslimError(f"--threads must be ≥ 1, got {threads}")
    if device == "auto" and backend in ("onnxruntime", "openvino"):
        device = "cpu"  # the exported runtimes run on the CPU
    dev = None if device == "auto" else torch.device(device)
    if backend != "nnunet":
        resolve_backend(backend, (dev or default_device()).type)
    return dev, RuntimeOptions(threads=threads)


@app.command()
def benchmark(
    model: str = typer.Argument(..., help="nnU-Net results folder (e.g. a compressed model) or a TotalSegmentator task"),
    image: Path = typer.Option(..., "-i", "--input", help="one NIfTI image to segment (e.g. a CT)"),
    vs: Optional[str] = typer.Option(None, "--vs", help="the original model, timed in the same run"),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnxruntime | openvino"),
    vs_backend: Optional[str] = typer.Option(None, "--vs-backend", help="backend of --vs (default: --backend)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the runtime's choice)"),
    runs: int = typer.Option(3, "--runs", help="counted runs per model"),
    warmup: int = typer.Option(1, "--warmup", help="uncounted runs first"),
    tta: bool = typer.Option(False, "--tta", help="test-time mirroring (TotalSegmentator's 3 mm model has none)"),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="per-layer profile of one patch"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="JSON report to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing report"),
) -> None:
    """Time whole-volume inference (preprocessing, network, export; peak RSS; a per-layer
    profile), each run a fresh process, against --vs in the same run."""
    import json

    from rich.table import Table

    from medslim.atomic import atomic_file, check_output_file
    from medslim.infer.benchmark import BenchmarkJob, benchmark as run_benchmark, model_folder, table_rows

    if not image.is_file() or not image.name.endswith((".nii", ".nii.gz")):
        raise MedslimError(f"input {image} is not a NIfTI file (.nii or .nii.gz)")
    if output is not None:
        check_output_file(output.expanduser(), overwrite)
    # this process stays free of torch and weights: Linux carries a parent's peak RSS into its children
    models = [model_folder(model)] + ([model_folder(vs)] if vs else [])
    jobs = [BenchmarkJob(str(m), str(image.resolve()), b, threads, tta, profile=profile)
            for m, b in zip(models, [backend, vs_backend or backend])]
    jobs = jobs[::-1] if vs else jobs  # the original first: ratios are original / compressed
    summary = run_benchmark(jobs, runs, warmup, progress=lambda msg: console.print(msg, highlight=False))
    table = Table(title=f"medslim benchmark: {image.name}, median (min–max) of {runs} runs, whole process")
    for col in ("model", "backend", "params", "FLOPs/patch", "wall s", "peak RSS MB", "stages (median s)"):
        table.add_column(col, overflow="fold")
    for row in table_rows(summary):
        table.add_row(*row)
    out_console.print(table)
    for r in summary.get("ratios", []):
        out_console.print(f"{Path(r['model']).name} vs {Path(r['baseline']).name}: ×{r['speedup_wall']:.2f} faster "
                          f"whole process (per-run {r['speedup_wall_range'][0]:.2f}–{r['speedup_wall_range'][1]:.2f}), "
                          f"network ×{r['speedup_network']:.2f}, peak RSS ×{r['rss_ratio']:.2f}, "
                          f"params ÷{r['params_ratio']:.1f}, FLOPs ÷{r['flops_ratio']:.1f}", highlight=False)
    for j in summary["jobs"]:
        for p in (j.get("profile") or [])[:5]:
            out_console.print(f"  {Path(j['job']['model']).name}: {p['ms']:8.1f} ms {100 * p['share']:5.1f} %  "
                              f"{p['op']} {p['layer']}", highlight=False, markup=False)
    if output is not None:
        with atomic_file(output, overwrite) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        out_console.print(f"wrote {output}")


@app.command()
def report(
    sweep_dir: Path = typer.Argument(..., help="sweep folder written by medslim sweep (sweep.json, cells/)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for the report (default: SWEEP_DIR)"),
    against: str = typer.Option("hvs", "--against", help="method the other compressed methods are compared with, "
                                "paired by seed ('' for none)"),
    restore: Optional[Path] = typer.Option(None, "--restore", help="cells.csv of an earlier report: fills cells "
                                           "pending in SWEEP_DIR (e.g. after the sweep folder was lost)"),
) -> None:
    """Write report.md and a self-contained report.html (cells, per-group mean ± std and paired Δ
    vs the control, methods paired against --against, Pareto fronts, per-layer ranks, per-class
    scores, failures) for a sweep."""
    from medslim.report import write_report

    paths = write_report(sweep_dir, output, against=against or None, restore=restore)
    out_console.print(f"wrote {paths['markdown']}, {paths['html']} and {paths['figures']}/", highlight=False,
                      soft_wrap=True)


@app.command("export-bundle")
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


# compress-bundle and bundle-config: settings without calibration images (weight-only criteria)
_BUNDLE_DF = typer.Option(0.3, "--df", help="rank ratio DF in (0, 1] (thesis: 'downsampling factor')")
_BUNDLE_PRUNE = typer.Option(0.5, "--prune", help="fraction ρ of channels removed per layer, in [0, 1)")
_BUNDLE_CRITERION = typer.Option("hvs", "--criterion", help="hvs | nisp | l1 | l2 | consumer_l1 | norton | random")
_BUNDLE_SEED = typer.Option(0, "--seed", help="seed (random criterion)")


def _bundle_compression(df: float, prune: float, criterion: str, seed: int):
    """The validated ``CompressConfig`` (a data-aware criterion is refused: no --calibration here)."""
    from medslim.compress import CompressConfig
    from medslim.score.registry import check_criterion

    check_criterion(criterion, calibration=prune == 0)
    return CompressConfig(df=df, prune_ratio=prune, criterion=criterion, seed=seed)


@app.command("compress-bundle")
def compress_bundle(
    bundle: Path = typer.Argument(..., help="MONAI bundle folder (configs/inference.json with a network_def of MONAI's UNet, SegResNet, DynUNet or BasicUNet; models/model.pt)"),
    output: Path = typer.Option(..., "-o", "--output", help="new bundle folder (must not exist)"),
    df: float = _BUNDLE_DF, prune: float = _BUNDLE_PRUNE, criterion: str = _BUNDLE_CRITERION, seed: int = _BUNDLE_SEED,
) -> None:
    """Compress a MONAI bundle's network into a new bundle whose configs rebuild it
    (medslim.bundle.network.CompressedNetwork: the original network_def + the spec)."""
    from medslim.bundle.compress import compress_bundle as write_bundle

    report = write_bundle(bundle, output, _bundle_compression(df, prune, criterion, seed), console=console)
    print_report(report)
    if report["not_copied"]:
        out_console.print(f"not copied (weights of the original network): {', '.join(report['not_copied'])}",
                          highlight=False, soft_wrap=True)
    out_console.print(f"wrote {output} (from {bundle})", highlight=False, soft_wrap=True)


@app.command("bundle-config")
def bundle_config(
    output: Path = typer.Option(..., "-o", "--output", help="file to write, e.g. BUNDLE/configs/compress.json (must not exist)"),
    df: float = _BUNDLE_DF, prune: float = _BUNDLE_PRUNE, criterion: str = _BUNDLE_CRITERION, seed: int = _BUNDLE_SEED,
) -> None:
    """Write configs/compress.json for any MONAI bundle: then
    python -m monai.bundle run compress --config_file "['configs/inference.json','configs/compress.json']"
    writes BUNDLE_compressed (medslim_output overrides it)."""
    from medslim.bundle.workflows import compress_config

    _bundle_compression(df, prune, criterion, seed)  # refuse bad settings now
    if output.exists():
        raise MedslimError(f"{output} already exists; remove it or choose another file")
    if not output.parent.is_dir():
        raise MedslimError(f"folder {output.parent} does not exist")
    settings = {"df": df, "prune_ratio": prune, "criterion": criterion, "seed": seed}
    output.write_text(json.dumps(compress_config(settings), indent=4) + "\n")
    out_console.print(f"wrote {output}", highlight=False, soft_wrap=True)


@app.command("nnunet-path")
def nnunet_path() -> None:
    """Print the folder to put in nnUNet_extTrainer (medslim's nnU-Net trainers)."""
    import nnunet_plugin

    print(Path(nnunet_plugin.__file__).resolve().parent)


app.command("prune2d")(prune2d)
app.command("sweep")(sweep)
app.add_typer(transfer_app, name="transfer", help="Layer selection for transfer learning (thesis ch. 3): select | run.")


def print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title="medslim compression", show_lines=False)
    table.add_column("layer", overflow="fold")
    for col in ("in", "out", "ranks (in, out)", "params"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in report["layers"]:
        ranks = "dense" if row["ranks"] is None else ", ".join("-" if r is None else str(r) for r in row["ranks"])
        ranks = f"CP {row['cp_rank']}" if row.get("cp_rank") else ranks
        table.add_row(row["layer"], f"{row['in'][0]}→{row['in'][1]}", f"{row['out'][0]}→{row['out'][1]}", ranks,
                      f"{row['params'][0]:,}→{row['params'][1]:,}")
    out_console.print(table)
    p, f = report["params"], report["flops"]
    out_console.print(f"parameters {p['original']:,} → {p['compressed']:,}  (×{p['ratio']:.2f}, −{100 * p['reduction']:.1f} %)")
    out_console.print(f"FLOPs/patch {report['input_shape'][2:]} {f['original'] / 1e9:.2f} G → {f['compressed'] / 1e9:.2f} G"
                      f"  (×{f['ratio']:.2f}, −{100 * f['reduction']:.1f} %)")
    out_console.print("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items()))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """The console script: every failure is one stderr line (see ``MedslimGroup``); exits.
    SIGTERM (``kill``, a job scheduler's time limit) is handled as Ctrl-C: outputs being
    written are removed (``medslim.atomic``), exit code 130."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # raised by importing torch_pruning
    signal.signal(signal.SIGTERM, _interrupt)
    app(prog_name="medslim")


if __name__ == "__main__":
    sys.exit(main())
