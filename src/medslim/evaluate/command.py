"""``medslim evaluate``: score predictions, or predict with one or two models first."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console

from medslim.errors import MedslimError
from medslim.evaluate.folder import score_dataset
from medslim.evaluate.layouts import dataset_json_class_map, find_cases, reference_cases, select_classes
from medslim.evaluate.outputs import Table, check_output, markdown_table, summarize, to_frame, write_outputs

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class EvaluationResult:
    """Rows per case and class (``table``: one array per column of per_case.csv), their
    summary, its Markdown table, and the output folder (``None`` when nothing was written)."""
    table: Table
    summary: dict[str, Any]
    markdown: str
    output: Path | None

    @property
    def per_case(self) -> pd.DataFrame:
        """The rows as a pandas frame (as :func:`medslim.evaluate.evaluate_folder` returns)."""
        return to_frame(self.table)


def _one_of(a: Any, b: Any, names: str) -> None:
    if (a is None) == (b is None):
        raise MedslimError(f"give exactly one of {names}")


def _check_images(images: Path | None, cases: Sequence[str] | None, models: Sequence[Path], fold: str) -> Path:
    """``images`` as a folder every model in ``models`` can be run on (channels, 2D/3D)."""
    if images is None:
        raise MedslimError("--model/--ref-model need --images (nnU-Net <case>_0000.nii.gz files)")
    from medslim.load import load_results_folder
    from medslim.load.images import check_images_fit
    from medslim.predict import check_image_folder

    images = check_image_folder(images)
    if cases:
        missing = [c for c in cases if not (images / f"{c}_0000.nii.gz").exists()]
        if missing:
            raise MedslimError(f"{len(missing)} reference case(s) have no image in {images}: {', '.join(missing[:5])}")
    for m in models:
        loaded = load_results_folder(m, fold)
        check_images_fit(images, loaded.num_input_channels, len(loaded.patch_size), f"model {m}")
    return images


def evaluate_command(pred: str | Path | None = None, ref: str | Path | None = None, *,
                     model: str | Path | None = None, ref_model: str | Path | None = None,
                     images: str | Path | None = None, output: str | Path | None = None,
                     tolerance: float = 3.0, classes: Sequence[str] | None = None, split: str | None = None,
                     dataset_json: str | Path | None = None, workers: int | None = None, fold: str = "0",
                     overwrite: bool = False, console: Console | None = None) -> EvaluationResult:
    """Score predictions (``pred``, or ``model`` run on ``images``) against references
    (``ref``, or ``ref_model`` run on ``images``: fidelity of one model to another), then
    write ``output`` (per_case.csv, summary.json, summary.md) when given.

    Models are nnU-Net results folders (original or compressed), run by nnU-Net's own
    predictor; their ``dataset.json`` names the classes unless ``dataset_json`` is given.
    All inputs are validated before any prediction or scoring; inputs are never modified.

    Raises:
        MedslimError: conflicting or missing options, and everything :func:`find_cases` and
            :func:`medslim.evaluate.evaluate_case` reject.
    """
    _one_of(pred, model, "--pred or --model")
    _one_of(ref, ref_model, "--ref or --ref-model")
    if not tolerance >= 0:
        raise MedslimError(f"--tolerance must be >= 0 mm, got {tolerance}")
    if output is not None:
        check_output(output, overwrite)
    for m in (model, ref_model):
        if m is not None and not (Path(m) / "dataset.json").is_file():
            raise MedslimError(f"{m} is not an nnU-Net results folder (no dataset.json)")
    if dataset_json is None and (model or ref_model) is not None:
        dataset_json = Path(model or ref_model) / "dataset.json"
    work = Path(tempfile.mkdtemp(prefix="medslim-eval-"))
    try:
        if model is not None or ref_model is not None:
            img = _check_images(images, list(reference_cases(ref, split)[1]) if ref is not None else None,
                                [Path(m) for m in (model, ref_model) if m is not None], fold)
            select_classes(dataset_json_class_map(dataset_json), classes)  # fail before minutes of prediction
            from medslim.predict import predict_folder

            for which, m in (("pred", model), ("ref", ref_model)):
                if m is not None:
                    (console or Console(stderr=True)).print(f"predicting {img} with {m}", markup=False, highlight=False)
                    predict_folder(m, img, work / which, fold=fold)
            pred = work / "pred" if model is not None else pred
            ref = work / "ref" if ref_model is not None else ref
        data = find_cases(pred, ref, split, dataset_json)
        per_case = score_dataset(data, labels=select_classes(data.classes, classes), tolerance=tolerance,
                                 workers=workers, console=console)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(per_case, tolerance)
    inputs = {"inputs": {"pred": str(model or pred), "ref": str(ref_model or ref), "layout": data.layout,
                         "mode": "fidelity" if ref_model is not None else "reference", "split": split}}
    written = write_outputs(output, per_case, summary, inputs, overwrite) if output is not None else None
    return EvaluationResult(per_case, summary, markdown_table(summary), written)

