"""A compressed nnU-Net results folder that stock ``nnUNetv2_predict`` loads unpatched.

Layout (as nnU-Net writes it)::

    OUT/plans.json                 the original plans; the compressed configuration's
                                   architecture names medslim.network.CompressedUNet + spec
    OUT/dataset.json               copied
    OUT/dataset_fingerprint.json   copied when present
    OUT/fold_N/checkpoint_final.pth  compressed weights; trainer_name = stock nnUNetTrainer
    OUT/compression_spec.json      the spec alone (same as in plans.json)
    OUT/compression_report.json    parameters, FLOPs, per-layer table, settings

The folder is written to a temporary sibling and renamed into place when complete, so a
failure never leaves a half-written ``OUT``; the input folder is only read.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medslim.atomic import atomic_folder, check_output_folder
from medslim.errors import MedslimError
from medslim.load.nnunet import NnUNetModel
from medslim.network import compressed_arch
from medslim.spec import CompressionSpec

#: the checkpoint names a stock trainer: it builds the network from plans.json, so the
#: compressed model needs no medslim trainer (nor nnUNet_extTrainer) to predict.
STOCK_TRAINER = "nnUNetTrainer"


def write_results_folder(model: NnUNetModel, network_state: dict[str, torch.Tensor], spec: CompressionSpec,
                         report: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write the compressed model as an nnU-Net results folder at ``out`` (atomically)."""
    out = Path(out).expanduser().resolve()
    check_output_folder(out, overwrite)
    if out == model.folder.resolve() or model.folder.resolve() in out.parents:
        raise MedslimError(f"output {out} is inside the input model folder; choose another path")
    with atomic_folder(out, overwrite) as tmp:
        plans = copy.deepcopy(model.plans)
        cfg = plans["configurations"][model.configuration_name]
        cfg["architecture"] = compressed_arch(model.architecture, spec)
        (tmp / "plans.json").write_text(json.dumps(plans, indent=1))
        shutil.copy(model.folder / "dataset.json", tmp / "dataset.json")
        if (model.folder / "dataset_fingerprint.json").is_file():
            shutil.copy(model.folder / "dataset_fingerprint.json", tmp / "dataset_fingerprint.json")
        ckpt = {k: v for k, v in model.checkpoint.items() if k not in ("optimizer_state", "grad_scaler_state")}
        ckpt.update(network_weights=network_state, trainer_name=STOCK_TRAINER,
                    medslim={"source": str(model.folder), "source_trainer": model.checkpoint.get("trainer_name")})
        ckpt["init_args"] = dict(ckpt["init_args"], plans=plans)
        (tmp / f"fold_{model.fold}").mkdir()
        torch.save(ckpt, tmp / f"fold_{model.fold}" / "checkpoint_final.pth")
        spec.save(tmp / "compression_spec.json")
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=1, default=str))
    return out


def write_untrained_folder(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str,
                           out: str | Path, seed: int = 0, mirror_axes: Sequence[int] | None = None) -> Path:
    """An nnU-Net results folder ``out/<dataset>/nnUNetTrainer__<plans>__<configuration>`` whose
    ``fold_0/checkpoint_final.pth`` holds the plans' network with random weights (nnU-Net's
    He init, seeded): for pipeline, size and speed tests where no trained model exists.
    ``mirror_axes``: the checkpoint's test-time mirroring axes (nnU-Net: ``(0, 1)`` for 2D).
    Returns the results folder."""
    import torch

    folder = Path(out) / plans["dataset_name"] / f"{STOCK_TRAINER}__{plans['plans_name']}__{configuration}"
    init_args = {"plans": dict(plans), "configuration": configuration, "fold": 0,
                 "dataset_json": dict(dataset_json), "device": "cpu"}
    model = NnUNetModel(folder, dict(plans), dict(dataset_json), "0", folder / "fold_0" / "checkpoint_final.pth",
                        {"init_args": init_args})
    torch.manual_seed(seed)
    net = model.build_network(load_weights=False)
    net.apply(net.initialize)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    mirroring = None if mirror_axes is None else tuple(mirror_axes)
    torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 0, "trainer_name": STOCK_TRAINER,
                "init_args": init_args, "inference_allowed_mirroring_axes": mirroring}, model.checkpoint_path)
    return folder
