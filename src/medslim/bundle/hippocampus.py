"""medslim's reference MONAI bundle: the model-zoo bundle ``spleen_ct_segmentation`` (its
configs, read at run time) adapted to MSD Task04 Hippocampus and the fixed split of
``configs/hippocampus_split.json`` — the MONAI twin of the nnU-Net reference
(:mod:`medslim.finetune.hippocampus`, ``scripts/train_reference_model.py``).

The adaptation is data, not a hand-copied config: each bundle config is the source config with
a few ConfigParser ids set and its transform and handler lists edited by ``_target_``
(:mod:`medslim.bundle.config_edit`; ``id → (value, why)``). ``docs/README.md`` lists every
change with its reason. Training and evaluation are the bundle's own workflows, run in a new
process (``python -m monai.bundle run training|evaluating``); the bundle itself needs ``monai``
and ``pytorch-ignite``, not medslim.

Layout written by :func:`build_bundle`::

    OUT/configs/{metadata,train,evaluate,inference}.json, logging.conf
    OUT/configs/datalist.json   training/validation/test cases, paths relative to dataset_dir
    OUT/models/                 model.pt after training (state dict of network_def)
    OUT/docs/README.md, docs/meta_schema_20220324.json (offline verify_metadata)
    OUT/LICENSE                 the source's Apache-2.0 text + this bundle's notice
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medslim.atomic import atomic_folder
from medslim.bundle.config_edit import REMOVED, Edits, Overrides, adapt, apply_overrides
from medslim.errors import MedslimError
from medslim.export.bundle_schema import SCHEMA_JSON, SCHEMA_NAME, SCHEMA_URL
from medslim.export.versions import package_versions


SOURCE_CHANNELS = (16, 32, 64, 128, 256)
ROI = [32, 32, 32]
"""Training crop and sliding-window ROI: fits every Hippocampus volume (31–43 × 40–59 × 24–46
voxels) once padded to a multiple of 16, which the UNet's 4 stride-2 levels need."""
DIVISOR = 16
AMP = "$@device.type == 'cuda'"
RESULTS_BEGIN, RESULTS_END = "<!-- results -->", "<!-- /results -->"
"""Markers of docs/README.md's Results section (filled in by the evaluation)."""

# ---------------------------------------------------------------------------------------------
# The changes to the source configs (rendered into docs/README.md)
# ---------------------------------------------------------------------------------------------

def _datalist_expr(key: str) -> str:
    return f"$monai.data.load_decathlon_datalist(@datalist_file, True, '{key}', @dataset_dir)"


def common_overrides(data_dir: Path, num_classes: int, channels: Sequence[int]) -> dict[str, tuple[Any, str]]:
    """Set in both ``train.json`` and ``inference.json``."""
    out: dict[str, tuple[Any, str]] = {
        "dataset_dir": (str(data_dir), "the MSD Task04 Hippocampus folder (override with `--dataset_dir`)"),
        "datalist_file": ("$@bundle_root + '/configs/datalist.json'",
                          "case lists of `configs/hippocampus_split.json`, paths relative to `dataset_dir`"),
        "test_datalist": (_datalist_expr("test"), "the 40 held-out test cases"),
        "network_def#out_channels": (num_classes, "background, anterior, posterior"),
    }
    if tuple(channels) != SOURCE_CHANNELS:
        out["network_def#channels"] = (list(channels), "narrower than the source (CPU budget)")
    return out


TRAIN_SUMMARY = (
    "$pathlib.Path(@output_dir, 'train_summary.json').write_text(json.dumps({"
    "'seed': @seed, 'epochs': @train#trainer.state.epoch, 'iterations': @train#trainer.state.iteration, "
    "'last_loss': float(monai.handlers.from_engine(['loss'], first=True)(@train#trainer.state.output)), "
    "'train_metrics': @train#trainer.state.metrics, 'val_metrics': @validate#evaluator.state.metrics, "
    "'best_val_mean_dice': @validate#evaluator.state.best_metric, "
    "'best_val_epoch': @validate#evaluator.state.best_metric_epoch, "
    "'train_cases': [pathlib.Path(d['image']).name.split('.')[0] for d in @train#dataset#data], "
    "'val_cases': [pathlib.Path(d['image']).name.split('.')[0] for d in @validate#dataset#data]}, indent=1))")


def train_overrides(epochs: int, seed: int, val_interval: int) -> dict[str, tuple[Any, str]]:
    """``train.json`` (besides :func:`common_overrides`)."""
    return {
        "imports": (["$import glob", "$import os", "$import ignite", "$import json", "$import pathlib"],
                    "the source's imports + json, pathlib (for `finalize`)"),
        "images": (REMOVED, "replaced by the split's case lists"),
        "labels": (REMOVED, "replaced by the split's case lists"),
        "train_datalist": (_datalist_expr("training"), "nnU-Net fold 0 training cases (128)"),
        "val_datalist": (_datalist_expr("validation"), "nnU-Net fold 0 validation cases (32)"),
        "epochs": (epochs, "the training budget (`--epochs`)"),
        "val_interval": (val_interval, "validate every N epochs (`--val_interval`)"),
        "seed": (seed, "seed of `set_determinism` (`--seed`)"),
        "initialize": (["$monai.utils.set_determinism(seed=@seed)", "$os.makedirs(@output_dir, exist_ok=True)"],
                       "the seed as an id, and `eval/` for the training record"),
        "training": (["$@train#trainer.run()"], "the id `run training` runs (the source has only `run`)"),
        "finalize": ([TRAIN_SUMMARY], "writes `eval/train_summary.json`: last loss, metrics, best validation "
                                      "Dice and its epoch, cases used"),
        "train#dataset#data": ("$@train_datalist", "train on the training cases only"),
        "train#dataset#num_workers": (1, "caching threads: 2 CPU cores"),
        "train#dataloader#num_workers": (0, "no loader processes on 2 CPU cores (the data is cached)"),
        "train#trainer#amp": (AMP, "mixed precision only on a GPU"),
        "validate#dataset#data": ("$@val_datalist", "validate (choose the checkpoint) on the validation cases"),
        "validate#dataloader#num_workers": (0, "no loader processes on 2 CPU cores"),
        "validate#inferer#roi_size": (ROI, "the training crop"),
        "validate#evaluator#amp": (AMP, "mixed precision only on a GPU"),
    }


PREPROCESSING_EDITS: dict[str, tuple[Any, str]] = {
    "Spacingd": ({"_target_": "DivisiblePadd", "k": DIVISOR},
                 "native 1 mm spacing (no resampling); zero-pad to a multiple of 16 for the 4 stride-2 levels"),
    "ScaleIntensityRanged": ({"_target_": "NormalizeIntensityd", "nonzero": True, "channel_wise": True},
                             "MR, not CT: z-score of the nonzero voxels instead of the CT window (padding stays 0)"),
}


def train_edits(num_classes: int) -> dict[str, dict[str, tuple[Any, str]]]:
    no_tensorboard = {"TensorBoardStatsHandler": (REMOVED, "tensorboard is not installed with medslim; "
                                                            "StatsHandler logs the same values")}
    return {
        "train#deterministic_transforms": PREPROCESSING_EDITS,
        "train#random_transforms": {"RandCropByPosNegLabeld": (
            {"spatial_size": ROI, "image_key": None},
            "32³ fits every padded volume; negative crops anywhere in the background (after the z-score 0 is the "
            "mean intensity, not air as in CT)")},
        "train#postprocessing#transforms": {"AsDiscreted": ({"to_onehot": num_classes}, f"{num_classes} classes")},
        "train#handlers": no_tensorboard,
        "validate#handlers": no_tensorboard,
    }


def evaluate_overrides() -> dict[str, tuple[Any, str]]:
    """``evaluate.json`` (an overlay of ``train.json``: flat ids)."""
    return {
        "validate#dataset#data": ("$@test_datalist", "evaluate on the test cases"),
        "evaluating": (["$@validate#evaluator.run()"], "the id `run evaluating` runs"),
        "finalize": ([], "train.json's training record does not apply"),
    }


def evaluate_edits(num_classes: int) -> dict[str, dict[str, tuple[Any, str]]]:
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$@output_dir + '/predictions'",
            "output_postfix": "", "separate_folder": False, "resample": False, "squeeze_end_dims": True,
            "output_dtype": "$numpy.uint8"}
    return {
        "validate#postprocessing#transforms": {
            "AsDiscreted": ([{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, save,
                             {"_target_": "AsDiscreted", "keys": ["pred", "label"], "to_onehot": num_classes}],
                            "argmax, save the label map (`eval/predictions/<case>.nii.gz`), then one-hot for "
                            "the metrics"),
            "SaveImaged": (REMOVED, "saved above, as a label map"),
        },
        "validate#handlers": {"MetricsSaver": ({"metrics": ["val_mean_dice", "val_accuracy"]},
                                               "the source names `val_acc`, which no metric is called")},
    }


def inference_overrides() -> dict[str, tuple[Any, str]]:
    """``inference.json`` (besides :func:`common_overrides`)."""
    return {
        "datalist": ("$[d['image'] for d in @test_datalist]", "the test images (override with `--datalist`)"),
        "inferer#roi_size": (ROI, "the training crop"),
        "dataloader#num_workers": (0, "no loader processes on 2 CPU cores"),
        "evaluator#amp": (AMP, "mixed precision only on a GPU"),
    }


INFERENCE_EDITS = {"preprocessing#transforms": PREPROCESSING_EDITS}


# ---------------------------------------------------------------------------------------------
# Building the bundle
# ---------------------------------------------------------------------------------------------

def datalists(split_file: Path, data_dir: Path) -> dict[str, list[dict[str, str]]]:
    """``{"training", "validation", "test"}`` → ``[{"image", "label"}]`` (paths relative to
    ``data_dir``) from the split's ``folds[0]`` and ``test``.

    Raises:
        MedslimError: the three lists overlap, or a case's image or label is missing.
    """
    split = json.loads(Path(split_file).read_text())
    cases = {"training": split["folds"][0]["train"], "validation": split["folds"][0]["val"], "test": split["test"]}
    names = list(cases)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(cases[a]) & set(cases[b]))
            if shared:
                raise MedslimError(f"{split_file}: {a} and {b} share {len(shared)} cases ({', '.join(shared[:3])}); "
                                   "the split must keep them apart")
    out = {k: [{"image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in v] for k, v in cases.items()}
    missing = [p for items in out.values() for d in items for p in d.values() if not (Path(data_dir) / p).is_file()]
    if missing:
        raise MedslimError(f"{data_dir}: {len(missing)} files of the split are missing (e.g. {missing[0]})")
    return out


def case_name(path: str | Path) -> str:
    return Path(path).name.split(".")[0]


def metadata(source: dict[str, Any], labels: Mapping[str, str], data_source: str) -> dict[str, Any]:
    """The source's ``metadata.json`` with this bundle's identity, versions, classes and one
    patch ``[1, *ROI]`` → ``[num_classes, *ROI]`` in ``network_data_format``."""
    if source.get("schema") != SCHEMA_URL:
        raise MedslimError(f"source metadata names schema {source.get('schema')}; medslim ships {SCHEMA_URL} only")
    import monai
    import numpy
    import torch

    classes = ", ".join(f"{k} is {v}" for k, v in labels.items())
    channel_def = {k: v.lower() for k, v in labels.items()}
    overrides = {
        "version": ("0.1.0", ""),
        "changelog": ({"0.1.0": f"spleen_ct_segmentation {source['version']} configs adapted to MSD Task04 "
                                "Hippocampus by medslim"}, ""),
        "monai_version": (monai.__version__, ""),
        "pytorch_version": (torch.__version__.split("+")[0], ""),
        "numpy_version": (numpy.__version__, ""),
        "optional_packages_version": (package_versions(("nibabel", "pytorch-ignite")), ""),
        "name": ("Hippocampus MR segmentation (medslim reference)", ""),
        "task": ("Decathlon hippocampus segmentation (anterior and posterior hippocampus)", ""),
        "description": ("MONAI UNet for 3D segmentation of the anterior and posterior hippocampus in MR, trained "
                        "with the spleen_ct_segmentation bundle's pipeline adapted to MSD Task04; see docs/README.md", ""),
        "authors": ("MONAI team (spleen_ct_segmentation configs); adapted and trained by medslim", ""),
        "copyright": ("Copyright (c) MONAI Consortium (configs); medslim (adaptation); see LICENSE", ""),
        "data_source": (data_source, ""),
        "image_classes": ("single channel MR, z-scored over its nonzero voxels", ""),
        "label_classes": (f"single channel data, {classes}", ""),
        "pred_classes": (f"{len(labels)} channels OneHot data, channel {classes}", ""),
        "eval_metrics": ({}, "filled in by the evaluation"),
        "references": (source.get("references", []) + [
            "Simpson A. L. et al. A large annotated medical image dataset for the development and evaluation of "
            "segmentation algorithms. arXiv:1902.09063 (2019)."], ""),
        "network_data_format#inputs#image#format": ("magnitude", ""),
        "network_data_format#inputs#image#modality": ("MR", ""),
        "network_data_format#inputs#image#spatial_shape": (ROI, ""),
        "network_data_format#inputs#image#value_range": ([], ""),
        "network_data_format#outputs#pred#num_channels": (len(labels), ""),
        "network_data_format#outputs#pred#spatial_shape": (ROI, ""),
        "network_data_format#outputs#pred#channel_def": (channel_def, ""),
    }
    return apply_overrides(source, overrides)


def _license(source_license: str, source_version: str) -> str:
    return f"""{source_license.rstrip()}

------------------------------------------------------------------------------
Notice for this bundle

configs/ and docs/ are derived from the MONAI model-zoo bundle spleen_ct_segmentation
{source_version} (Copyright (c) MONAI Consortium), licensed under the Apache License 2.0 above.
medslim changed them as listed in docs/README.md ("Changes to the source configs").

The weights in models/ were trained on the Medical Segmentation Decathlon Task04 Hippocampus data
(Simpson et al. 2019, arXiv:1902.09063; Vanderbilt University Medical Center), CC-BY-SA 4.0; the
weights are shared under the same licence (https://creativecommons.org/licenses/by-sa/4.0/).
"""


def _table(rows: Mapping[str, tuple[Any, str]], head: str = "id") -> str:
    lines = [f"| {head} | value | why |", "|---|---|---|"]
    for key, (value, why) in rows.items():
        text = repr(value) if value is REMOVED else json.dumps(value)
        if len(text) > 160:
            text = text[:150] + " …"
        lines.append(f"| `{key}` | `{text.replace('|', '/')}` | {why} |")
    return "\n".join(lines)


def _edits_text(edits: Edits) -> str:
    return "\n\n".join(f"`{list_id}`:\n\n{_table(e, '_target_')}" for list_id, e in edits.items())


def _readme(meta: dict[str, Any], changes: Mapping[str, tuple[Overrides, Edits]], cases: Mapping[str, int],
            channels: Sequence[int]) -> str:
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    sections = "\n\n".join(f"### `configs/{name}`\n\n{_table(ov)}\n\n{_edits_text(ed)}".rstrip()
                           for name, (ov, ed) in changes.items())
    n_train, n_val, n_test = cases["training"], cases["validation"], cases["test"]
    return f"""# {meta['name']}

{meta['description'].split('; see')[0]}.

Network: MONAI `UNet` with channels {list(channels)}{'' if tuple(channels) == SOURCE_CHANNELS else ' (narrower than the source)'},
strides 2-2-2-2, 2 residual units, BatchNorm; {len(names)} output channels
({', '.join(f"{k} {v}" for k, v in names.items())}).

Built, trained and evaluated by medslim's `scripts/train_reference_bundle.py`; the MONAI twin of
medslim's nnU-Net reference model (same data, same split).

## Source and licence

The configs are those of the MONAI model-zoo bundle `spleen_ct_segmentation` (Apache-2.0,
Copyright (c) MONAI Consortium), read when the bundle is built and changed only as listed below;
its licence and this bundle's notice are in `LICENSE`. Data: MSD Task04 Hippocampus
(CC-BY-SA 4.0); the weights are shared under the same licence.

## Data and split

`configs/datalist.json` holds the fixed split of medslim's `configs/hippocampus_split.json`:
`training` ({n_train} cases) and `validation` ({n_val}) are nnU-Net's fold 0, `test` ({n_test}) are
never used for training or for choosing anything. Training uses `training`; `models/model.pt`
is the checkpoint with the best mean validation Dice (the source's `CheckpointSaver`);
`configs/evaluate.json` scores it on `test`. Paths are relative to `dataset_dir`.

## Running

From this folder (`--bundle_root PATH` from elsewhere; `--dataset_dir PATH` for another copy of
Task04_Hippocampus):

    python -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.json --logging_file configs/logging.conf --epochs E --seed S
    python -m monai.bundle run evaluating --meta_file configs/metadata.json --config_file "['configs/train.json','configs/evaluate.json']" --logging_file configs/logging.conf
    python -m monai.bundle run --meta_file configs/metadata.json --config_file configs/inference.json --logging_file configs/logging.conf
    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/{SCHEMA_NAME}

Training writes `models/model.pt` (a state dict of `network_def`) and `eval/train_summary.json`
(last loss, metrics, best validation Dice and its epoch, cases used). Evaluation writes
`eval/predictions/<case>.nii.gz` (label maps with the input's shape and affine) and MONAI's
`MetricsSaver` files (`eval/metrics.csv`, `eval/val_mean_dice_raw.csv`: Dice per case and class).
The script adds `eval/summary.json`. Training needs `pytorch-ignite` (MONAI's `SupervisedTrainer`).

Cost on CPU (measured with `OMP_NUM_THREADS=1` on a 2-core machine busy with another job, the
source's channels [16, 32, 64, 128, 256]): an iteration (2 volumes × 4 crops of 32³) takes
0.5–1.1 s, about 0.75 s; an epoch over the {n_train} training cases is {math.ceil(n_train / 2)} iterations (about
50 s); validating the {n_val} validation cases takes about 6 s.

## Changes to the source configs

Each config is the source's with these ids set (ConfigParser ids; `(removed)` deletes the id) and
these list items edited by `_target_` (a `_target_` in the value replaces the item keeping its
`keys`; other values update its arguments; a list replaces it by those items).

{sections}

`configs/metadata.json`: the source's, with this bundle's name, task, classes, versions, data
source, references, and `network_data_format` for one {ROI} patch → {len(names)} channels.
`configs/logging.conf`: the source's.

## Results

{RESULTS_BEGIN}
Not evaluated yet.
{RESULTS_END}
"""


def build_bundle(out: Path, source: Path, data_dir: Path, split_file: Path, epochs: int, seed: int,
                 val_interval: int = 1, channels: Sequence[int] = SOURCE_CHANNELS) -> Path:
    """Write the bundle at ``out`` (which must not exist) from the source bundle's configs.

    Raises:
        MedslimError: ``out`` exists; the source is not ``spleen_ct_segmentation``-like (an
            edited id or transform is missing); the split overlaps or names missing files.
    """
    out, source, data_dir = Path(out).resolve(), Path(source), Path(data_dir).resolve()
    if out.exists():
        raise MedslimError(f"output {out} already exists; choose a new bundle folder")
    if epochs < 1 or val_interval < 1 or epochs % val_interval:
        raise MedslimError(f"epochs ({epochs}) must be a positive multiple of val_interval ({val_interval}): "
                           "the last epoch must validate, or no checkpoint is saved")
    names = ("train", "evaluate", "inference", "metadata")
    missing = [f"configs/{n}.json" for n in names if not (source / "configs" / f"{n}.json").is_file()]
    if missing or not (source / "LICENSE").is_file():
        raise MedslimError(f"{source} is not a MONAI bundle like spleen_ct_segmentation (missing "
                           f"{', '.join(missing) or 'LICENSE'})")
    if not (data_dir / "dataset.json").is_file():
        raise MedslimError(f"{data_dir} is not an MSD task folder (no dataset.json)")
    read = {name: json.loads((source / "configs" / f"{name}.json").read_text()) for name in names}
    dataset = json.loads((data_dir / "dataset.json").read_text())
    labels = {str(k): v for k, v in sorted(dataset["labels"].items(), key=lambda kv: int(kv[0]))}
    lists = datalists(split_file, data_dir)
    common = common_overrides(data_dir, len(labels), channels)
    changes: dict[str, tuple[Overrides, Edits]] = {
        "train.json": ({**common, **train_overrides(epochs, seed, val_interval)}, train_edits(len(labels))),
        "evaluate.json": (evaluate_overrides(), evaluate_edits(len(labels))),
        "inference.json": ({**common, **inference_overrides()}, INFERENCE_EDITS),
    }
    configs = {name: adapt(read[name.removesuffix(".json")], ov, ed, overlay=name == "evaluate.json")
               for name, (ov, ed) in changes.items()}
    meta = metadata(read["metadata"], labels, "Task04_Hippocampus.tar from http://medicaldecathlon.com/ (CC-BY-SA 4.0)")
    with atomic_folder(out) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        for name, config in {**configs, "metadata.json": meta, "datalist.json": lists}.items():
            (tmp / "configs" / name).write_text(json.dumps(config, indent=2))
        (tmp / "configs" / "logging.conf").write_text((source / "configs" / "logging.conf").read_text())
        (tmp / "docs" / "README.md").write_text(_readme(meta, changes, {k: len(v) for k, v in lists.items()}, channels))
        (tmp / "docs" / SCHEMA_NAME).write_text(SCHEMA_JSON)
        (tmp / "LICENSE").write_text(_license((source / "LICENSE").read_text(), read["metadata"]["version"]))
    return out


def verify_metadata(bundle: Path) -> None:
    """MONAI's ``verify_metadata`` against the schema shipped in ``docs/`` (offline).

    Raises:
        ValueError: the metadata does not follow the schema (MONAI's message names the key).
    """
    from monai.bundle import verify_metadata as monai_verify

    bundle = Path(bundle)
    monai_verify(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(bundle / "docs" / SCHEMA_NAME))
