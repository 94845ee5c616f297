"""The public functions the CLI commands expose (the CLI only parses flags and prints)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from medslim.compress import CompressConfig, Compressed, compress_network
from medslim.export.nnunet_folder import write_results_folder
from medslim.errors import MedslimError
from medslim.load.nnunet import NnUNetModel, load_results_folder
from medslim.network import is_compressed
from medslim.summary import summarize

DEFAULT_MODEL = Path(__file__).parent / "default_model" / "Dataset004_Hippocampus"
DEMO_CASES = Path(__file__).parent / "default_model" / "cases"
# the best compressed + fine-tuned model of a sweep (scripts/embed_compressed_model.py)
COMPRESSED_MODEL = Path(__file__).parent / "default_model" / "Dataset004_Hippocampus_medslim"


def compress_model(model: NnUNetModel, config: CompressConfig, output: str | Path, overwrite: bool = False,
                   console: Console | None = None, calibration: Tensor | None = None) -> dict[str, Any]:
    """Compress ``model`` and write the new results folder ``output``; returns the report
    (also saved as ``output/compression_report.json``). ``calibration``: ``[N, C, *patch]``
    patches for data-aware criteria (``medslim.score.calibration.calibration_patches``)."""
    if is_compressed(model.architecture):
        raise MedslimError(f"{model.folder} is already compressed by medslim; compress the original model instead")
    net = model.build_network()
    input_shape = [1, model.num_input_channels, *model.patch_size]
    compressed = compress_with_progress(net, config, input_shape, console, calibration)
    report = summarize(net, compressed, input_shape)
    report.update(model=str(model.folder), fold=model.fold, configuration=model.configuration_name,
                  settings=config.to_dict(), network_class=model.architecture["network_class_name"])
    write_results_folder(model, compressed.network.state_dict(), compressed.spec, report, output, overwrite)
    return report


def compress_with_progress(net: nn.Module, config: CompressConfig, input_shape: Sequence[int],
                           console: Console | None = None, calibration: Tensor | None = None) -> Compressed:
    """``compress_network`` with a transient progress bar (stage, layer) on ``console``
    (default: stderr)."""
    n_layers = sum(1 for _ in net.modules())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[layer]}"),
                  TimeElapsedColumn(), console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("compressing", total=n_layers, layer="")
        return compress_network(
            net, config, input_shape, calibration=calibration,
            progress=lambda stage, name: bar.update(task, advance=1, description=stage, layer=name))


def demo_settings() -> tuple[float, float]:
    """DF and ρ of the embedded compressed model (``COMPRESSED_MODEL``), else 0.3 and 0.5."""
    provenance = COMPRESSED_MODEL / "provenance.json"
    if not provenance.is_file():
        return 0.3, 0.5
    finetune = json.loads(provenance.read_text())["finetune"]
    return float(finetune["df"]), float(finetune["prune_ratio"])


def run_demo(output: str | Path | None, df: float | None = None, prune: float | None = None,
             console: Console | None = None) -> dict[str, Any]:
    """Compress the embedded reference model (default: with the embedded compressed model's
    settings), then segment the embedded test cases with the original, the compressed model
    before fine-tuning and the embedded compressed + fine-tuned model (when present); the
    report gains ``demo``: per model Dice, NSD at 1 mm, parameters and FLOPs."""
    from medslim.evaluate import evaluate_command
    from medslim.measure import count_flops, count_parameters
    from medslim.predict import predict_folder

    from medslim.atomic import check_output_folder

    defaults = demo_settings()
    config = CompressConfig(df=defaults[0] if df is None else df, prune_ratio=defaults[1] if prune is None else prune)
    if output is not None:  # before minutes of work: demo never replaces a user's folder
        check_output_folder(Path(output).expanduser(), overwrite=False, hint="choose a new or empty folder")
    work = Path(tempfile.mkdtemp(prefix="medslim-demo-"))
    try:
        out = Path(output).expanduser() if output is not None else work / "compressed"
        model = load_results_folder(DEFAULT_MODEL)
        report = compress_model(model, config, out, console=console)
        models = {"original": DEFAULT_MODEL,
                  f"compressed (DF {config.df:g}, ρ {config.prune_ratio:g}), before fine-tuning": out}
        if (COMPRESSED_MODEL / "fold_0" / "checkpoint_final.pth").is_file():
            ft = json.loads((COMPRESSED_MODEL / "provenance.json").read_text())
            models[f"embedded compressed + fine-tuned ({ft['updates']} updates)"] = COMPRESSED_MODEL
        rows = []
        for i, (name, folder) in enumerate(models.items()):
            pred = predict_folder(folder, DEMO_CASES / "imagesTs", work / f"pred_{i}", fold="0")
            summary = evaluate_command(pred=pred, ref=DEMO_CASES / "labelsTs", tolerance=1.0).summary
            loaded = load_results_folder(folder)
            net = loaded.build_network(load_weights=False)
            rows.append({"model": name, "folder": str(folder), "dice": summary["overall"]["dice"]["mean"],
                         "nsd1": summary["overall"]["nsd"]["mean"], "params": count_parameters(net),
                         "flops": count_flops(net, [1, loaded.num_input_channels, *loaded.patch_size])})
        report["demo"] = {"cases": summary["cases"], "models": rows}
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
