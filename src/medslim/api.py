"""The public functions the CLI commands expose (the CLI only parses flags and prints)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medslim.compress import CompressConfig, compress_network
from medslim.export.nnunet_folder import write_results_folder
from medslim.errors import MedslimError
from medslim.load.nnunet import NnUNetModel, load_results_folder
from medslim.network import is_compressed
from medslim.summary import summarize

DEFAULT_MODEL = Path(__file__).parent / "default_model" / "Dataset004_Hippocampus"
DEMO_CASES = Path(__file__).parent / "default_model" / "cases"


def compress_model(model: NnUNetModel, config: CompressConfig, output: str | Path, overwrite: bool = False,
                   console: Console | None = None) -> dict[str, Any]:
    """Compress ``model`` and write the new results folder ``output``; returns the report
    (also saved as ``output/compression_report.json``)."""
    if is_compressed(model.architecture):
        raise MedslimError(f"{model.folder} is already compressed by medslim; compress the original model instead")
    net = model.build_network()
    input_shape = [1, model.num_input_channels, *model.patch_size]
    n_layers = sum(1 for _ in net.modules())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[layer]}"),
                  TimeElapsedColumn(), console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("compressing", total=n_layers, layer="")
        compressed = compress_network(
            net, config, input_shape,
            progress=lambda stage, name: bar.update(task, advance=1, description=stage, layer=name))
    report = summarize(net, compressed, input_shape)
    report.update(model=str(model.folder), fold=model.fold, configuration=model.configuration_name,
                  settings=config.to_dict(), network_class=model.architecture["network_class_name"])
    write_results_folder(model, compressed.network.state_dict(), compressed.spec, report, output, overwrite)
    return report


def run_demo(output: str | Path | None, df: float = 0.3, prune: float = 0.5,
             console: Console | None = None) -> dict[str, Any]:
    """Compress the embedded reference model, then segment the embedded test cases with the
    original and the compressed model; the report gains ``demo_dice``."""
    from medslim.evaluate import mean_dice_folder
    from medslim.predict import predict_folder

    from medslim.atomic import check_output_folder

    config = CompressConfig(df=df, prune_ratio=prune)
    if output is not None:  # before minutes of work: demo never replaces a user's folder
        check_output_folder(Path(output).expanduser(), overwrite=False, hint="choose a new or empty folder")
    work = Path(tempfile.mkdtemp(prefix="medslim-demo-"))
    try:
        out = Path(output).expanduser() if output is not None else work / "compressed"
        model = load_results_folder(DEFAULT_MODEL)
        report = compress_model(model, config, out, console=console)
        cases = sorted(p.name[: -len(".nii.gz")] for p in (DEMO_CASES / "labelsTs").glob("*.nii.gz"))
        dice = {"cases": cases}
        for name, folder in (("original", DEFAULT_MODEL), ("compressed", out)):
            pred = predict_folder(folder, DEMO_CASES / "imagesTs", work / f"pred_{name}", fold="0")
            dice[name] = mean_dice_folder(pred, DEMO_CASES / "labelsTs", cases, [1, 2])["mean"]
        report["demo_dice"] = dice
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
