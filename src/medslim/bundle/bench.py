"""Compressed bundle vs its controls, through the bundle's own workflows (``scripts/bench_bundle.py``).

For a trained MONAI bundle with a ``train.json`` (the reference of
:mod:`medslim.bundle.hippocampus`), three or four models, each scored on the test cases by the bundle's
``python -m monai.bundle run evaluating`` (:func:`medslim.bundle.hippocampus_run.evaluate`), then
by medslim's evaluator on the saved label maps (Dice; NSD at 1 and 3 mm, as the nnU-Net reports)::

    original     the trained bundle as given
    control      the original + the fine-tune: train.json + finetune.json (starts from models/model.pt)
    compressed   `medslim compress-bundle` of the original + the same fine-tune (+ distill.json if kd_weight > 0)
    scratch      the compressed architecture trained from its fresh initialisation by train.json
                 alone, for ``scratch_epochs`` (> 0; the fair budget is the reference's own)

The fine-tune is the bundle's own training workflow for ``epochs`` epochs with each seed; its
``CheckpointSaver`` keeps the weights with the best mean Dice on the **validation** cases, so the
**test** cases serve only for reporting. Per seed, the paired differences compressed − control (and − scratch);
the verdict: is the compressed bundle's mean test Dice within 1 point of the control's
(:mod:`medslim.bundle.bench_report`).

Work folders are copies (``WORK/original``, ``WORK/compressed``, ``WORK/<model>_s<seed>``, logs
under each ``eval/``); the input bundle is only read. ``bench_report.write_results`` writes
``results.json``, ``results.csv`` (one row per run) and ``summary.md`` (``summary_markdown``,
whose numbers all come from ``results.json``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medslim.bundle import hippocampus_run as run
from medslim.bundle.bench_report import compare
from medslim.bundle.compress import write_config
from medslim.bundle.workflows import DISTILL_FILE, FINETUNE_FILE, finetune_overlay
from medslim.compress import CompressConfig
from medslim.errors import MedslimError

SCORES = {"dice": (3.0, "dice"), "nsd1": (1.0, "nsd"), "nsd3": (3.0, "nsd")}
"""Metric prefix → (NSD tolerance in mm of the scoring, field of ``medslim.evaluate.summarize``)."""



@dataclass(frozen=True)
class BenchConfig:
    """The fine-tune budget (``epochs``, validation every ``val_interval``), its ``seeds``, the
    compression (``medslim compress-bundle`` settings), the distillation weight, the budget of
    the from-scratch control (``scratch_epochs``; 0: none), and limits on the
    training/validation/test cases (the first N of each list; tests only)."""

    epochs: int
    val_interval: int
    seeds: tuple[int, ...]
    df: float = 0.3
    prune: float = 0.5
    criterion: str = "hvs"
    compress_seed: int = 0
    kd_weight: float = 0.0
    scratch_epochs: int = 0
    train_cases: int | None = None
    val_cases: int | None = None
    test_cases: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.val_interval < 1 or self.epochs % self.val_interval:
            raise MedslimError(f"--epochs ({self.epochs}) must be a positive multiple of --val-interval "
                               f"({self.val_interval}): the last epoch must validate")
        if self.scratch_epochs < 0 or self.scratch_epochs % self.val_interval:
            raise MedslimError(f"--scratch-epochs ({self.scratch_epochs}) must be 0 or a positive multiple of "
                               f"--val-interval ({self.val_interval})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MedslimError(f"--seeds must name one or more different seeds, got {list(self.seeds)}")
        if not self.kd_weight >= 0:
            raise MedslimError(f"--kd-weight must be >= 0, got {self.kd_weight}")
        for name in ("train_cases", "val_cases", "test_cases"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MedslimError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        self.compression()  # refuses bad compression settings now

    def compression(self) -> CompressConfig:
        return CompressConfig(df=self.df, prune_ratio=self.prune, criterion=self.criterion, seed=self.compress_seed)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def copy_bundle(src: Path, dst: Path) -> Path:
    """A copy of the bundle ``src`` at ``dst`` without its ``eval/`` (an earlier run's records
    and predictions, which a workflow's checks would otherwise take for its own)."""
    src = Path(src)
    shutil.copytree(src, dst, ignore=lambda folder, names: ["eval"] if Path(folder) == src else [])
    return Path(dst)


def compress(original: Path, out: Path, config: BenchConfig) -> str:
    """Compress the bundle ``original`` into ``out`` with the settings of ``config``, in this
    process (:func:`~medslim.bundle.compress.compress_bundle`, what ``medslim compress-bundle``
    calls: a new process would cost as much again in imports as the compression itself);
    returns the equivalent command."""
    from medslim.bundle.compress import compress_bundle

    compress_bundle(original, out, config.compression())
    return (f"medslim compress-bundle {original} -o {out} --df {config.df:g} --prune {config.prune:g} "
            f"--criterion {config.criterion} --seed {config.compress_seed}  # run in-process: compress_bundle")


def network_size(bundle: Path) -> dict[str, Any]:
    """Parameters and FLOPs of one patch of an uncompressed bundle's network, counted as
    ``compress-bundle`` counts its ``"before"`` (``medslim.measure``; patch from ``read_bundle``)."""
    from medslim.bundle.source import read_bundle
    from medslim.measure import count_flops, count_parameters

    source = read_bundle(bundle)
    return {"params": count_parameters(source.network), "flops": count_flops(source.network, source.input_shape),
            "input_shape": source.input_shape}


def compressed_size(bundle: Path) -> dict[str, Any]:
    """Parameters and FLOPs after compression, from the compressed bundle's ``metadata.json``
    (``"medslim"``), with its ``"before"`` numbers."""
    report = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())["medslim"]["report_summary"]
    return {"params": report["params"]["compressed"], "flops": report["flops"]["compressed"],
            "input_shape": report["input_shape"],
            "before": {"params": report["params"]["original"], "flops": report["flops"]["original"]}}


def finetune_files(model: str, kd_weight: float) -> tuple[list[str], dict[str, Any]]:
    """The config files of a training run (``train.json`` and its overlays) and its overrides:
    the compressed model adds ``distill.json`` when ``kd_weight`` > 0; the scratch control has
    ``train.json`` alone, so its network starts from the rebuilt class's fresh weights."""
    if model == "scratch":
        return ["configs/train.json"], {}
    files = ["configs/train.json", f"configs/{FINETUNE_FILE}"]
    if model == "compressed" and kd_weight > 0:
        return files + [f"configs/{DISTILL_FILE}"], {"medslim_kd_weight": kd_weight}
    return files, {}


def finetune(bundle: Path, model: str, seed: int, config: BenchConfig) -> dict[str, Any]:
    """Train ``bundle`` in place with its own training workflow (:func:`finetune_files`) for
    ``config.epochs`` (the scratch control: ``config.scratch_epochs``); returns the training
    record (``eval/train_summary.json``, command, wall time).

    Raises:
        MedslimError: the workflow failed, or saved no checkpoint (``models/model.pt`` unchanged).
    """
    weights = Path(bundle) / "models" / "model.pt"
    before = _digest(weights)
    files, overrides = finetune_files(model, config.kd_weight)
    epochs = config.scratch_epochs if model == "scratch" else config.epochs
    record = run.train(bundle, epochs, seed, config.val_interval, config.train_cases, config.val_cases,
                       files, overrides)
    if _digest(weights) == before:
        raise MedslimError(f"the fine-tune of {bundle} saved no checkpoint (models/model.pt is unchanged); "
                           "its CheckpointSaver saves on validation: check val_interval and the validation cases")
    return record


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dataset_dir(bundle: Path) -> Path:
    """The bundle's ``dataset_dir`` (``train.json``), where its workflows read images and labels.

    Raises:
        MedslimError: it is not a plain path to a folder.
    """
    value = json.loads((Path(bundle) / "configs" / "train.json").read_text()).get("dataset_dir")
    if not isinstance(value, str) or value[:1] in "$@%" or not Path(value).is_dir():
        raise MedslimError(f"dataset_dir of {bundle}/configs/train.json is {value!r}, not a data folder; "
                           "set it to the dataset's folder")
    return Path(value)


def class_names(bundle: Path) -> dict[int, str]:
    """Foreground label → name, from ``metadata.json``'s output ``channel_def``."""
    meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): str(v) for k, v in channels.items() if int(k) > 0}


def score(bundle: Path, data_dir: Path, test_cases: int | None) -> dict[str, Any]:
    """``run evaluating`` on the test cases (:func:`~medslim.bundle.hippocampus_run.evaluate`),
    then medslim's evaluator on its label maps: ``metrics`` maps ``<prefix>_<class>`` and
    ``<prefix>_mean`` (prefixes of :data:`SCORES`; means as ``medslim evaluate``: per case over
    the classes present, then over cases) to a value."""
    from medslim.evaluate import score_cases, summarize

    result = run.evaluate(bundle, data_dir, test_cases)
    names = class_names(bundle)
    pred, ref, cases = Path(bundle) / "eval" / "predictions", Path(data_dir) / "labelsTr", result["test_cases"]
    summaries = {tol: summarize(score_cases(pred, ref, cases, list(names), tol), tol)
                 for tol in sorted({tol for tol, _ in SCORES.values()})}
    metrics: dict[str, float | None] = {}
    for prefix, (tol, field) in SCORES.items():
        summary = summaries[tol]
        metrics.update({f"{prefix}_{name}": summary["classes"][str(label)][field]["mean"]
                        for label, name in names.items()})
        metrics[f"{prefix}_mean"] = summary["overall"][field]["mean"]
    return {"test_cases": cases, "metrics": metrics, "dice_monai_mean": result["dice_monai"]["mean"],
            "per_case_dice": result["dice"]["per_case"], "eval_wall_s": result["wall_time_s"],
            "evaluate_command": result["command"]}


def _row(model: str, size: Mapping[str, Any], training: Mapping[str, Any] | None, trained_by: str,
         kd_weight: float | None, scored: Mapping[str, Any]) -> dict[str, Any]:
    t = training or {}
    return {"model": model, "seed": t.get("seed"), "trained_by": trained_by, "epochs": t.get("epochs"),
            "val_interval": t.get("val_interval"), "kd_weight": kd_weight, "params": size["params"],
            "flops": size["flops"], "train_wall_s": t.get("wall_time_s"), "best_val_dice": t.get("best_val_mean_dice"),
            "best_val_epoch": t.get("best_val_epoch"), "train_cases": t.get("train_cases"),
            "val_cases": t.get("val_cases"), "train_command": t.get("command"), **scored}


def run_benchmark(reference: Path, work: Path, config: BenchConfig) -> dict[str, Any]:
    """Compress, fine-tune and score as the module docstring says, in the empty or new folder
    ``work``; returns the results (``write_results`` writes them). The reference labels are
    ``labelsTr/`` of the bundle's ``dataset_dir``.

    Raises:
        MedslimError: ``reference`` is not a trained bundle with ``configs/train.json`` and
            ``evaluate.json``, or its ``dataset_dir`` is not a folder; ``work`` is not empty; a
            workflow fails; the test cases overlap a run's training or validation cases, or
            differ between runs.
    """
    reference, work = Path(reference).resolve(), Path(work).resolve()
    for need in ("models/model.pt", "configs/train.json", "configs/evaluate.json"):
        if not (reference / need).is_file():
            raise MedslimError(f"{reference} is not a trained bundle with its training workflow ({need} is missing)")
    data_dir = dataset_dir(reference)
    check_work(work)
    work.mkdir(parents=True, exist_ok=True)
    original = copy_bundle(reference, work / "original")
    compressed = work / "compressed"
    compress_command = compress(original, compressed, config)  # before original/eval/ exists: not copied
    sizes = {"original": network_size(original), "compressed": compressed_size(compressed)}
    ref_record = reference / "eval" / "train_summary.json"
    ref_training = json.loads(ref_record.read_text()) if ref_record.is_file() else None
    runs = [_row("original", sizes["original"], ref_training, "reference training", None,
                 score(original, data_dir, config.test_cases))]
    arms = [("control", original), ("compressed", compressed)] + [("scratch", compressed)] * (config.scratch_epochs > 0)
    trained_by = {"control": "fine-tune", "compressed": "fine-tune", "scratch": "from scratch"}
    for seed in config.seeds:
        for model, base in arms:
            bundle = copy_bundle(base, work / f"{model}_s{seed}")
            if model == "control":
                write_config(bundle / "configs" / FINETUNE_FILE, finetune_overlay())
            kd = config.kd_weight if model == "compressed" else 0.0
            training = finetune(bundle, model, seed, config)
            size = sizes["original" if model == "control" else "compressed"]
            runs.append(_row(model, size, training, "fine-tune + KD" if kd > 0 else trained_by[model], kd,
                             score(bundle, data_dir, config.test_cases)))
    check_cases(runs)
    first, tuned = runs[0], runs[1:]
    commands = [c for c in (first["train_command"], compress_command, first["evaluate_command"]) if c]
    commands += [c for r in tuned for c in (r["train_command"], r["evaluate_command"])]
    return {
        "reference": str(reference), "data_dir": str(data_dir), "config": config.to_dict(),
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default")},
        "classes": {str(k): v for k, v in class_names(original).items()}, "sizes": sizes,
        "cases": {"test": first["test_cases"], "training": tuned[0]["train_cases"],
                  "validation": tuned[0]["val_cases"]},
        "commands": commands, "runs": runs, **compare(runs),
    }


def check_work(work: Path) -> None:
    """Raises ``MedslimError`` unless ``work`` is new or an empty folder."""
    work = Path(work)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise MedslimError(f"work folder {work} exists and is not empty; choose a new one")


def check_cases(runs: Sequence[Mapping[str, Any]]) -> None:
    """Every run scored the same test cases, none of which it trained or validated on; the
    fine-tunes used the same training and validation cases.

    Raises:
        MedslimError: otherwise (the bundle's datalist mixes the splits, or a run was limited differently).
    """
    test = runs[0]["test_cases"]
    for r in runs:
        if r["test_cases"] != test:
            raise MedslimError(f"{r['model']} (seed {r['seed']}) scored {r['test_cases']}, the original {test}")
        seen = set(r["train_cases"] or []) | set(r["val_cases"] or [])
        if seen & set(test):
            raise MedslimError(f"{r['model']} (seed {r['seed']}) trained or validated on test cases "
                               f"{sorted(seen & set(test))}; the datalist must keep the test split apart")
    tuned = [(r["train_cases"], r["val_cases"]) for r in runs if r["trained_by"] != "reference training"]
    if any(t != tuned[0] for t in tuned):
        raise MedslimError("the fine-tunes used different training or validation cases")
