"""One sweep cell: fine-tune with stock ``nnUNetv2_train``, predict the validation and test
cases with ``medslim.predict``, score with ``medslim.evaluate``; ``result.json`` (or
``error.json``) written atomically, so a cell without one has not finished."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from medslim.errors import MedslimError
from medslim.sweep.data import SweepContext
from medslim.sweep.grid import Cell

TRAINER = "nnUNetTrainerMedslim"
RESULT, ERROR, DEFINITION = "result.json", "error.json", "cell.json"

Trainer = Callable[[Cell, SweepContext, Path], dict[str, Any]]


def cell_dir(ctx: SweepContext, cell: Cell) -> Path:
    return ctx.sweep_dir / "cells" / cell.id


def write_json(path: Path, data: Any) -> None:
    """Write ``path`` atomically (a reader sees the old file or the whole new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def train_cell(cell: Cell, ctx: SweepContext, out: Path) -> dict[str, Any]:
    """Run ``nnUNetv2_train -tr nnUNetTrainerMedslim`` with the cell's settings as
    ``MEDSLIM_CONFIG``. A stopped earlier attempt with the same settings goes on from its last
    checkpoint (``--c``; the trainer saves one every ``save_every`` epochs) when the settings
    allow it (``FinetuneConfig.can_continue``); otherwise it is discarded first.

    Returns:
        ``{"folder": results folder, "train_seconds": wall, "cpu_seconds": CPU of the trainer
        and its data-augmentation workers, "resumed_at_epoch": None or the epoch it went on
        from}``. After a resume, the earlier epochs count with the time nnU-Net logged for
        them, and their CPU time at this attempt's CPU/wall ratio (an estimate).
    Raises:
        MedslimError: the trainer failed (its last error line).
    """
    from medslim.finetune.config import config_from_dict

    results = out / "nnUNet_results"
    folder = results / ctx.dataset / f"{TRAINER}__{ctx.plans}__{ctx.configuration}"
    config = out / "finetune.json"
    settings = {"final_validation": False, **(cell.settings or {}), "dataset_name": ctx.dataset,
                "plans_name": ctx.plans, "configuration": ctx.configuration}
    resumable = config_from_dict(settings, str(config)).can_continue
    earlier = _earlier_attempt(folder / f"fold_{ctx.fold}", config, settings) if resumable else None
    if earlier is None:
        shutil.rmtree(results, ignore_errors=True)
    write_json(config, settings)
    env = {**os.environ, **ctx.env, "nnUNet_results": str(results), "MEDSLIM_CONFIG": str(config)}
    exe = Path(sys.executable).parent / "nnUNetv2_train"
    cmd = [str(exe), ctx.dataset.split("_")[0].removeprefix("Dataset"), ctx.configuration, str(ctx.fold),
           "-p", ctx.plans, "-tr", TRAINER, "-device", os.environ.get("MEDSLIM_SWEEP_DEVICE", "cpu"),
           *(["--c"] if earlier else ["-pretrained_weights", str(ctx.pretrained)])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(out / "train.log", "a" if earlier else "w") as log:
        run = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        (out / "train.err").write_text(run.stderr)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        raise MedslimError(f"nnUNetv2_train failed: {lines[-1] if lines else f'exit {run.returncode}'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    prior = earlier["seconds"] if earlier else 0.0
    return {"folder": str(folder), "train_seconds": seconds + prior, "cpu_seconds": cpu * (1 + prior / seconds),
            "resumed_at_epoch": earlier["epoch"] if earlier else None}


def _earlier_attempt(fold: Path, config: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """``{"epoch", "seconds"}`` of a stopped attempt with these settings that left a checkpoint
    (the epoch it reached and the time nnU-Net logged for its epochs), else ``None``."""
    checkpoint = next((fold / c for c in ("checkpoint_final.pth", "checkpoint_latest.pth") if (fold / c).is_file()), None)
    if checkpoint is None or not config.is_file() or json.loads(config.read_text()) != json.loads(json.dumps(settings, default=str)):
        return None
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # nnU-Net's own checkpoint format
    except Exception:  # noqa: BLE001 - a checkpoint cut short by the stop: start again
        return None
    log = saved.get("logging", {})
    spans = zip(log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", []))
    seconds = sum(end - start for start, end in list(spans)[: saved["current_epoch"]])
    return {"epoch": int(saved["current_epoch"]), "seconds": float(seconds)}


def score(folder: Path, checkpoint: str, ctx: SweepContext, split: str, work: Path) -> dict[str, Any]:
    """Predict ``split``'s cases with ``folder``'s ``checkpoint`` and score them: mean Dice,
    NSD at each tolerance (``nsd1``, ``nsd3``), per class and per case."""
    from medslim.evaluate import evaluate_command
    from medslim.predict import predict_folder

    images, labels = ctx.cases[split]
    pred = predict_folder(folder, images, work / f"pred_{split}_{Path(checkpoint).stem}", fold=str(ctx.fold),
                          checkpoint_name=checkpoint)
    out: dict[str, Any] = {"per_class": {}}
    try:
        for tol in ctx.tolerances:
            result = evaluate_command(pred=pred, ref=labels, tolerance=tol)
            summary, key = result.summary, f"nsd{tol:g}"
            out["cases"] = summary["cases"]
            out["dice"] = summary["overall"]["dice"]["mean"]
            out[key] = summary["overall"]["nsd"]["mean"]
            for name, cls in summary["classes"].items():
                out["per_class"].setdefault(name, {})["dice"] = cls["dice"]["mean"]
                out["per_class"][name][key] = cls["nsd"]["mean"]
            frame = result.per_case
            out["per_case_dice"] = frame.groupby("case")["dice"].mean().round(6).to_dict()
    finally:
        shutil.rmtree(pred, ignore_errors=True)
    return out


def layers(folder: Path, fold: int) -> list[dict[str, Any]]:
    """Per conv of the base network that a compressed results folder decomposed or pruned:
    its channels, Tucker ranks (``None``: dense mode) and kept output channels."""
    from medslim.load.nnunet import load_results_folder
    from medslim.network import build_base_network, is_compressed
    from medslim.spec import CompressionSpec
    from torch.nn.modules.conv import _ConvNd

    model = load_results_folder(folder, str(fold))
    arch = model.architecture
    if not is_compressed(arch):
        return []
    kw = arch["arch_kwargs"]
    spec = CompressionSpec.from_dict(kw["compression"])
    base = build_base_network(kw["base_network_class_name"], kw["base_arch_kwargs"], kw["base_kw_requires_import"],
                              model.num_input_channels, model.num_classes)
    rows = []
    for name, conv in base.named_modules():
        if not isinstance(conv, _ConvNd):
            continue
        kept = [len(idx) for k, idx in spec.kept.items() if k == name or k.startswith(name + ".")]
        ranks = spec.ranks.get(name)
        if ranks is None and not kept:
            continue
        rows.append({"name": name, "channels_in": conv.in_channels, "channels_out": conv.out_channels,
                     "rank_in": ranks.rank_in if ranks else None, "rank_out": ranks.rank_out if ranks else None,
                     "kept": kept[-1] if kept else conv.out_channels})
    return rows


def size(folder: Path, fold: int, checkpoint: str = "checkpoint_final.pth") -> dict[str, int]:
    from medslim.load.nnunet import load_results_folder
    from medslim.measure import count_flops, count_parameters

    model = load_results_folder(folder, str(fold), checkpoint)
    net = model.build_network(load_weights=False)
    return {"params": count_parameters(net),
            "flops": count_flops(net, [1, model.num_input_channels, *model.patch_size])}


def run_cell(cell: Cell, ctx: SweepContext, train: Trainer = train_cell) -> dict[str, Any]:
    """Run ``cell`` and write its ``result.json``; returns the result.

    Raises:
        whatever training, prediction or scoring raises (``run_cell_safe`` records it).
    """
    out = cell_dir(ctx, cell)
    out.mkdir(parents=True, exist_ok=True)
    if cell.kind == "original":
        folder, trained = ctx.model, {"train_seconds": 0.0, "cpu_seconds": 0.0}
    else:
        trained = train(cell, ctx, out)
        folder = Path(trained["folder"])
    work = out / "work"
    work.mkdir(exist_ok=True)
    try:
        metrics = {split: score(folder, "checkpoint_final.pth", ctx, split, work) for split in ctx.cases}
        before = None
        if cell.kind == "compressed" and (folder / f"fold_{ctx.fold}" / "checkpoint_compressed.pth").is_file():
            before = {"test": score(folder, "checkpoint_compressed.pth", ctx, "test", work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    own, original = size(folder, ctx.fold), size(ctx.model, ctx.fold)
    record = json.loads((folder / "medslim_config.json").read_text()) if (folder / "medslim_config.json").is_file() else {}
    updates = int(record.get("config", {}).get("updates", 0))
    result = {"cell": cell.to_dict(), "status": "ok", "folder": str(folder),
              **own, "params_original": original["params"], "flops_original": original["flops"],
              "ratio_params": original["params"] / own["params"], "ratio_flops": original["flops"] / own["flops"],
              "updates": updates, "train_seconds": trained["train_seconds"], "cpu_seconds": trained["cpu_seconds"],
              "resumed_at_epoch": trained.get("resumed_at_epoch"),
              "metrics": metrics, "before_finetune": before, "layers": layers(folder, ctx.fold)}
    write_json(out / RESULT, result)
    return result


def run_cell_safe(cell: Cell, ctx: SweepContext, train: Trainer = train_cell) -> dict[str, Any]:
    """``run_cell``, with any failure recorded in ``error.json`` (one line + traceback)
    instead of raised, so the other cells go on."""
    out = cell_dir(ctx, cell)
    try:
        (out / ERROR).unlink(missing_ok=True)
        return run_cell(cell, ctx, train)
    except Exception as e:  # noqa: BLE001 - a failed cell must not stop the sweep
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        error = {"cell": cell.to_dict(), "status": "failed", "error": f"{type(e).__name__}: {line}"
                 if not isinstance(e, MedslimError) else line, "traceback": traceback.format_exc()}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / ERROR, error)
        return error
