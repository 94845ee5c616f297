"""Bundle configs that run medslim inside MONAI's own workflows (``python -m monai.bundle run``).

``configs/compress.json`` (``compress_config``; any bundle, next to its inference config)::

    python -m monai.bundle run compress --config_file "['configs/inference.json','configs/compress.json']"

runs ``compress_from_config``: ``compress_bundle`` of the bundle into ``medslim_output`` with the
settings in ``medslim_settings`` (``CompressConfig`` fields). A compressed bundle whose source had
a ``train.json`` gets two overlays for the bundle's own training workflow (its data pipeline,
loss, optimizer, handlers)::

    python -m monai.bundle run --config_file "['configs/train.json','configs/finetune.json']"
    python -m monai.bundle run --config_file "['configs/train.json','configs/finetune.json','configs/distill.json']"

``finetune.json`` starts training from the compressed weights in ``models/model.pt`` (the
bundle's ``CheckpointSaver`` then writes the fine-tuned ones there); ``distill.json`` adds
distillation from the original network (``medslim.finetune.monai_kd``): its ``network_def`` and
the original ``models/model.pt`` (``medslim_teacher_ckpt``, an absolute path; override it if
the original bundle moves), weight ``medslim_kd_weight`` λ and temperature ``medslim_kd_temperature``.

The overlays add to the bundle's ``imports`` (``+imports``; MONAI binds ``import a.b`` to the
name ``a.b``, hence the ``as`` aliases) and its ``train#handlers`` (``+``), and replace only the
ids they name.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from medslim.errors import MedslimError

COMPRESS_FILE, FINETUNE_FILE, DISTILL_FILE = "compress.json", "finetune.json", "distill.json"


def compress_config(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``configs/compress.json``: a ``compress`` entry for ``monai.bundle run compress``; the
    output defaults to ``<bundle_root>_compressed``."""
    return {
        "+imports": ["$import medslim.bundle.workflows as medslim_workflows"],
        "medslim_output": "$@bundle_root.rstrip('/') + '_compressed'",
        "medslim_settings": dict(settings or {"df": 0.3, "prune_ratio": 0.5, "criterion": "hvs", "seed": 0}),
        "compress": "$medslim_workflows.compress_from_config(@bundle_root, @medslim_output, @medslim_settings)",
    }


def compress_from_config(bundle_root: str, output: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``compress_bundle(bundle_root, output, CompressConfig(**settings))``; returns its report.

    Raises:
        MedslimError: an unknown setting, or anything ``compress_bundle`` refuses.
    """
    import dataclasses

    from medslim.bundle.compress import compress_bundle
    from medslim.compress import CompressConfig

    known = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise MedslimError(f"unknown medslim_settings {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return compress_bundle(bundle_root, output, CompressConfig(**dict(settings)))


def finetune_overlay() -> dict[str, Any]:
    """``configs/finetune.json``: the training workflow's ``network`` starts from ``models/model.pt``."""
    return {
        "+imports": ["$import medslim.bundle.workflows as medslim_workflows"],
        "medslim_init_weights": "$@bundle_root + '/models/model.pt'",
        "network": "$medslim_workflows.with_weights(@network_def, @medslim_init_weights).to(@device)",
    }


def distill_overlay(original_network_def: Mapping[str, Any], teacher_ckpt: str | Path) -> dict[str, Any]:
    """``configs/distill.json``: the trainer's loss becomes ``DistillationLoss`` around the
    bundle's ``loss``, and a handler feeds it the original network's logits."""
    return {
        "+imports": ["$import medslim.finetune.monai_kd as medslim_kd"],
        "medslim_teacher_def": copy.deepcopy(dict(original_network_def)),
        "medslim_teacher_ckpt": str(Path(teacher_ckpt).resolve()),
        "medslim_kd_weight": 1.0,
        "medslim_kd_temperature": 1.0,
        "medslim_teacher": "$medslim_kd.load_teacher(@medslim_teacher_def, @medslim_teacher_ckpt, @device)",
        "medslim_loss": {"_target_": "medslim.finetune.distill.DistillationLoss", "seg_loss": "@loss",
                         "weight": "@medslim_kd_weight", "temperature": "@medslim_kd_temperature"},
        "train#trainer#loss_function": "@medslim_loss",
        "+train#handlers": [{"_target_": "medslim.finetune.monai_kd.TeacherOutputs",
                             "teacher": "@medslim_teacher", "loss": "@medslim_loss"}],
    }


def with_weights(network: nn.Module, path: str | Path) -> nn.Module:
    """``network`` with the state dict at ``path`` loaded strictly (plain, or under ``"model"``)."""
    from medslim.bundle.source import load_weights

    load_weights(network, Path(path), "network_def")
    return network
