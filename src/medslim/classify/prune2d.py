"""Prune a 2D classifier (thesis chapter 4), fine-tune, evaluate, write a results folder:
the library behind ``medslim prune2d``.

The output folder (written atomically: it appears complete or not at all)::

    results.json, results.csv        accuracy before/after, Δ vs unpruned and vs control, params, FLOPs
                                     (results.json also: the calibration images' training-split indices)
    ratio_<r>/pruned_spec.json       base architecture + kept channels (CompressionSpec)
    ratio_<r>/model.pt               state_dict of the pruned (fine-tuned) model
    accuracy_vs_ratio.png, density.png, input_map.png

Reload a pruned model with ``medslim.prune.classifier_io.load_pruned_classifier(folder/ratio_<r>)``.
"""
from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medslim.errors import MedslimError, did_you_mean

if TYPE_CHECKING:
    from torch import Tensor

    from medslim.classify.data import MedMNIST

FT_LR, FT_BATCH = 1e-4, 32  # SPEC §6 / thesis §4.5.2: AdamW, lr 1e-4, batch 32
WHILE_TRAINING = ("lobster", "serene", "dprp")  # methods that compress during the fine-tune
CALIBRATION_IMAGES = 64  # default --calibration-images: 28-px images are cheap to score


def _ratio_dir(r: float) -> str:
    return f"ratio_{r:.2f}"


def finetune_config(epochs: int, seed: int, lr: float = FT_LR, batch_size: int = FT_BATCH):
    """The post-pruning fine-tune (and control): AdamW, constant lr, weight decay 0.01."""
    from medslim.classify import TrainConfig

    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw", weight_decay=0.01,
                       milestones=(), seed=seed)


@dataclass(frozen=True)
class Calibration:
    """Images a data-aware criterion scores with: ``images`` ``[N, C, size, size]`` (as the model
    reads them), their ``labels`` ``[N]``, and their ``indices`` in the training split."""

    images: "Tensor"
    labels: "Tensor"
    indices: tuple[int, ...]


def check_calibration_images(n: int) -> None:
    """Raise a user error unless ``n`` (``--calibration-images``) is an integer ≥ 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MedslimError(f"--calibration-images must be an integer ≥ 1, got {n!r}")


def draw_calibration(train: "MedMNIST", n: int, seed: int = 0) -> Calibration:
    """``n`` images drawn without replacement (seeded, sorted indices) from ``train``, the
    training split: never the test split the accuracy is measured on.

    Raises:
        MedslimError: ``n`` < 1 or more than the split holds.
    """
    import numpy as np
    import torch

    check_calibration_images(n)
    if n > len(train):
        raise MedslimError(f"--calibration-images {n} exceeds the {len(train)} images of {train.name}; "
                           f"use at most {len(train)}")
    idx = sorted(int(i) for i in np.random.default_rng(seed).choice(len(train), n, replace=False))
    return Calibration(torch.stack([train[i][0] for i in idx]), train.labels[idx].clone(), tuple(idx))


def run_prune2d(source: str, data: Path, output: Path, ratios: Sequence[float], criterion: str = "hvs",
                scope: str = "layer", finetune_epochs: int = 0, seed: int = 0, size: int = 28,
                include_linear: bool = False, control: bool = True, max_train: int | None = None,
                overwrite: bool = False, console: Console | None = None,
                calibration_images: int = CALIBRATION_IMAGES, regularizer: str | None = None,
                reg_lambda: float = 1e-3, reg_tolerance: float = 0.05, dprp_epsilon: float = 0.01) -> dict[str, Any]:
    """Prune ``source`` at each ratio, optionally fine-tune, evaluate on the test split, write ``output``.

    Data-aware criteria (``hvs_data``, ``relief``, ``taylor``) score with ``calibration_images``
    images of the training split (seeded by ``seed``; ``taylor`` with their labels); the others
    ignore it. With ``regularizer`` the fine-tune itself compresses instead of a criterion at
    ``ratios`` (one run): ``lobster`` | ``serene`` (:mod:`medslim.classify.sparsify`; λ
    ``reg_lambda``, validation-loss tolerance ``reg_tolerance`` on the validation split; the
    run's ratio is the fraction of candidate channels SeReNe removed, 0 for LOBSTER, which
    reports its weight sparsity) or ``dprp`` (:mod:`medslim.classify.dprp`, ε ``dprp_epsilon``;
    ratio 0: it cuts ranks, not channels).

    Raises:
        MedslimError: bad options, unreadable data/model, a model without prunable layers, more
            calibration images than training images, or an existing non-empty output folder
            (checked before any work).
    """
    from medslim.atomic import atomic_folder, check_output_folder
    from medslim.classify import build_classifier, evaluate, fit, load_checkpoint, load_medmnist
    from medslim.classify.models import is_checkpoint_path
    from medslim.measure import count_flops, count_parameters
    from medslim.prune.classifier import SCOPES, classifier_layers, prune_classifier
    from medslim.prune.classifier_io import save_pruned_classifier
    from medslim.score import NEEDS_CALIBRATION, check_criterion
    from medslim.score.input_map import hvs_input_map

    if regularizer is not None:
        if regularizer not in WHILE_TRAINING:
            raise MedslimError(f"unknown regularizer '{regularizer}'; choose one of {', '.join(WHILE_TRAINING)}"
                               f"{did_you_mean(regularizer, WHILE_TRAINING)}")
        if ratios:
            raise MedslimError("--ratio does not apply with --regularizer: the method sets the compression (threshold or ε)")
        if finetune_epochs < 1:
            raise MedslimError("--regularizer compresses while fine-tuning: give --finetune-epochs ≥ 1")
        if not 0.0 < reg_lambda < 1.0 or reg_tolerance < 0 or not 0.0 < dprp_epsilon < 1.0:
            raise MedslimError(f"--reg-lambda and --dprp-epsilon must be in (0, 1) and --reg-tolerance ≥ 0 "
                               f"(got {reg_lambda}, {dprp_epsilon}, {reg_tolerance})")
        criterion, ratios = regularizer, [0.0]
    ratios = sorted(set(float(r) for r in ratios))
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise MedslimError(f"pruning ratios must be in [0, 1), got {', '.join(str(r) for r in ratios) or 'none'}")
    check_calibration_images(calibration_images)
    if regularizer is None:
        check_criterion(criterion, calibration=True)  # data-aware criteria: images from the training split
    needs_data = criterion in NEEDS_CALIBRATION or regularizer == "serene"
    if scope not in SCOPES:
        raise MedslimError(f"unknown scope '{scope}' (expected one of {', '.join(SCOPES)}){did_you_mean(scope, SCOPES)}")
    if finetune_epochs < 0:
        raise MedslimError(f"--finetune-epochs must be ≥ 0, got {finetune_epochs}")
    output = Path(output).expanduser()
    check_output_folder(output, overwrite)
    ckpt = load_checkpoint(source) if is_checkpoint_path(source) else None  # read once
    in_channels = ckpt["in_channels"] if ckpt else 3
    arch = ckpt["arch"] if ckpt else source
    test = load_medmnist(data, "test", size=size, channels=in_channels)
    full_train = (load_medmnist(data, "train", size=size, channels=in_channels)
                  if finetune_epochs or needs_data else None)
    calib = draw_calibration(full_train, calibration_images, seed) if needs_data else None
    if calib and console:
        console.print(f"{criterion}: scoring with {len(calib.indices)} training images of {full_train.name} "
                      f"(seed {seed})", highlight=False)
    train = full_train if finetune_epochs else None
    if train is not None and max_train is not None and max_train < len(train):
        train = train.subset(max_train, seed=seed)
    model = build_classifier(ckpt or source, test.num_classes, in_channels).eval()
    if not classifier_layers(model, include_linear=include_linear):
        raise MedslimError(f"{source} has no prunable layer (the stem convolution and the head are never pruned)")
    input_shape = (1, in_channels, size, size)
    _check_runs(model, input_shape, source)
    if ckpt and ckpt["num_classes"] != test.num_classes and console:
        console.print(f"warning: {source} has {ckpt['num_classes']} outputs, {data} "
                      f"{test.num_classes} classes; the head is new (untrained)", highlight=False)
    cfg = finetune_config(finetune_epochs, seed)

    result: dict[str, Any] = {
        "model": str(source), "arch": arch, "data": str(data), "criterion": criterion, "scope": scope, "seed": seed,
        "input_shape": list(input_shape), "include_linear": include_linear, "n_test": len(test),
        "finetune": {**cfg.to_dict(), "n_train": len(train) if train is not None else 0},
        "calibration": {"split": "train", "n": len(calib.indices), "indices": list(calib.indices)} if calib else None,
        "original": {"accuracy": evaluate(model, test)["accuracy"], "params": count_parameters(model),
                     "flops": count_flops(model, input_shape)},
        "control": None, "runs": []}
    steps_per_ft = finetune_epochs * -(-len(train) // cfg.batch_size) if train is not None else 0
    total = len(ratios) * (1 + steps_per_ft) + (steps_per_ft if control and train is not None else 0)
    with atomic_folder(output, overwrite) as tmp, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("prune2d", total=max(1, total))
        tick = lambda *a: bar.advance(task)  # noqa: E731
        if control and train is not None:
            bar.update(task, description="control: unpruned + same fine-tune")
            twin = copy.deepcopy(model)
            fit(twin, train, cfg, progress=tick)
            result["control"] = {"accuracy": evaluate(twin, test)["accuracy"]}
            del twin
        maps = {"unpruned": hvs_input_map(model, input_shape)}
        for r in ratios:
            last = r == ratios[-1]
            ranks = {}
            if regularizer is not None:
                bar.update(task, description=f"fine-tune with {regularizer}")
                val = load_medmnist(data, "val", size=size, channels=in_channels)
                pruned, report, extra, ranks = while_training(
                    regularizer, model, train, val, cfg, input_shape, calib.images if calib else None,
                    reg_lambda, reg_tolerance, dprp_epsilon)
                r = report.ratio
                run = {"ratio": r, "accuracy_pruned": None, "accuracy_finetuned": evaluate(pruned, test)["accuracy"],
                       "regularizer": extra,
                       **{k: v for k, v in report.to_dict().items() if k not in ("ratio", "criterion", "scope", "seed",
                                                                                 "input_shape", "members")}}
            else:
                bar.update(task, description=f"ratio {r:.2f}: {criterion} pruning")
                pruned, report = prune_classifier(model, r, criterion, input_shape, scope, seed,
                                                  include_linear=include_linear,
                                                  calibration=calib.images if calib else None,
                                                  calibration_target=calib.labels if calib else None)
                run = {"ratio": r, "accuracy_pruned": evaluate(pruned, test)["accuracy"], "accuracy_finetuned": None,
                       **{k: v for k, v in report.to_dict().items() if k not in ("ratio", "criterion", "scope", "seed",
                                                                                 "input_shape", "members")}}
            bar.advance(task)
            if train is not None and regularizer is None:
                bar.update(task, description=f"ratio {r:.2f}: fine-tune")
                fit(pruned, train, cfg, progress=tick)
                run["accuracy_finetuned"] = evaluate(pruned, test)["accuracy"]
            final = run["accuracy_finetuned"] if run["accuracy_finetuned"] is not None else run["accuracy_pruned"]
            run["delta_vs_original"] = final - result["original"]["accuracy"]
            run["delta_vs_control"] = final - result["control"]["accuracy"] if result["control"] else None
            result["runs"].append(run)
            sub = tmp / _ratio_dir(r)
            sub.mkdir()
            save_pruned_classifier(pruned.eval(), sub, arch=arch, num_classes=test.num_classes, in_channels=in_channels,
                                   input_shape=input_shape, kept=report.kept, ranks=ranks,
                                   provenance={"criterion": criterion, "scope": scope, "ratio": r, "seed": seed,
                                               "finetune_epochs": finetune_epochs,
                                               **({"calibration_images": len(calib.indices)} if calib else {})})
            if last:
                maps[f"pruned r={r:.2f}"] = hvs_input_map(pruned, input_shape)
        _write(tmp, result, maps, test[0][0])
    return result


def while_training(method: str, model, train, val, cfg, input_shape: tuple[int, ...], calibration,
                    reg_lambda: float, reg_tolerance: float, dprp_epsilon: float) -> tuple[Any, Any, dict, dict]:
    """(model, ``ClassifierPruneReport``, the method's own report, Tucker ranks) of a fine-tune
    that compresses: LOBSTER/SeReNe or DPRP."""
    from medslim.classify.dprp import dprp_classifier
    from medslim.classify.sparsify import sparsify_classifier
    from medslim.prune.classifier import ClassifierPruneReport, classifier_layers

    if method != "dprp":
        sparse = sparsify_classifier(model, method, train, val, cfg, input_shape, calibration, reg_lambda, reg_tolerance)
        return sparse.model, sparse.prune_report, {k: v for k, v in sparse.report.items()
                                                   if k not in ("fit", "per_layer")}, {}
    result = dprp_classifier(model, train, cfg, eps=dprp_epsilon)
    report = ClassifierPruneReport.measure(model, result.model, classifier_layers(model), input_shape, ratio=0.0,
                                           criterion="dprp", scope="layer", seed=cfg.seed, kept={}, members={})
    return result.model, report, {k: v for k, v in result.report.items() if k != "fit"}, result.ranks


def _check_runs(model, input_shape: tuple[int, ...], source: str) -> None:
    """Raise a user error if ``model`` cannot take ``input_shape`` (e.g. vgg16 below 32 px)."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    except RuntimeError as e:
        raise MedslimError(f"{source} cannot run on {input_shape[2]}×{input_shape[3]} inputs "
                           f"({str(e).splitlines()[0]}); try a larger --size (vgg16 needs ≥ 32)") from None


def _write(folder: Path, result: dict, maps: dict, image) -> None:
    """results.json / results.csv and the three plots."""
    from medslim.prune.classifier_plots import plot_accuracy, plot_density, plot_input_maps

    (folder / "results.json").write_text(json.dumps(result, indent=1))
    cols = ["ratio", "accuracy_pruned", "accuracy_finetuned", "delta_vs_original", "delta_vs_control",
            "param_reduction", "flop_reduction", "mean_candidate_density"]
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*cols, "params", "flops"])
        for run in result["runs"]:
            w.writerow([*(run[c] for c in cols), run["params"][1], run["flops"][1]])
    runs = result["runs"]
    ratios = [x["ratio"] for x in runs]
    curves = {}
    if runs[0]["accuracy_pruned"] is not None:  # a regulariser prunes while fine-tuning: no "pruned" state
        curves[f"{result['criterion']} (pruned)"] = (ratios, [x["accuracy_pruned"] for x in runs], None)
    if runs[0]["accuracy_finetuned"] is not None:
        curves[f"{result['criterion']} + fine-tune"] = (ratios, [x["accuracy_finetuned"] for x in runs], None)
    plot_accuracy(curves, folder / "accuracy_vs_ratio.png", baseline=result["original"]["accuracy"],
                  control=(result["control"] or {}).get("accuracy"), title=Path(result["data"]).stem)
    layers = [row["layer"] for row in runs[0]["layers"]]
    plot_density({f"r = {x['ratio']:.2f}": [row["density"] for row in x["layers"]] for x in runs},
                 layers, folder / "density.png", title=f"{result['criterion']}, {result['scope']} scope")
    plot_input_maps(maps, folder / "input_map.png", image=image)
