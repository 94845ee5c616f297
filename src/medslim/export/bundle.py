"""Export an nnU-Net results folder (original or compressed) as a MONAI bundle.

Layout (MONAI bundle specification)::

    BUNDLE/configs/metadata.json      mandatory keys, network_data_format, package versions,
                                      "medslim": compression spec + report summary
    BUNDLE/configs/inference.json     nnU-Net preprocessing → sliding window → argmax → invert → NIfTI
    BUNDLE/models/model.pt            state dict of ``network_def``
    BUNDLE/models/model.ts            TorchScript (traced: nnU-Net's U-Nets do not script)
    BUNDLE/docs/README.md             how to run, what differs from nnUNetv2_predict
    BUNDLE/docs/meta_schema_20220324.json   MONAI's metadata schema, for offline verify_metadata
    BUNDLE/LICENSE

Written to a temporary sibling and renamed into place when complete.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from medslim.atomic import atomic_folder, check_output_parent
from medslim.errors import MedslimError, first_line
from medslim.export.bundle_config import DIFFERENCES, inference_config
from medslim.export.bundle_schema import SCHEMA_JSON, SCHEMA_NAME, SCHEMA_URL
from medslim.export.versions import package_versions
from medslim.network import is_compressed
from medslim.load.nnunet import NnUNetModel, load_results_folder

PACKAGES = ("medslim", "dynamic-network-architectures", "torch-pruning", "nibabel")


def _report_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "compression_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {k: report[k] for k in ("input_shape", "params", "flops", "settings", "model") if k in report}


def metadata(model: NnUNetModel) -> dict[str, Any]:
    """``configs/metadata.json``; ``network_data_format`` describes one patch in the network's
    axis order: image ``[C_in, *patch]`` float32 → logits ``[num_classes, *patch]``."""
    import monai
    import numpy

    arch = model.architecture
    compression = arch["arch_kwargs"].get("compression") if is_compressed(arch) else None
    channels = model.dataset_json.get("channel_names", model.dataset_json.get("modality", {"0": "image"}))
    labels = {str(v): k for k, v in model.dataset_json["labels"].items()
              if isinstance(v, int) and 0 <= v < model.num_classes}  # drops nnU-Net's ignore label
    ct = model.configuration["normalization_schemes"][0] == "CTNormalization"
    patch = list(model.patch_size)
    packages = package_versions(PACKAGES)
    name = model.dataset_json.get("name", model.folder.parent.name or model.folder.name)
    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medslim {packages['medslim']} from {model.folder.name} fold {model.fold}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": packages,
        "required_packages_version": packages,
        "name": f"{name} ({'compressed by medslim' if compression else 'nnU-Net'})",
        "task": f"3D segmentation: {', '.join(v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if k != '0')}",
        "description": (f"nnU-Net v2 {model.configuration_name} model ({arch['network_class_name'].rsplit('.', 1)[-1]}"
                        f"{', Tucker-2 + pruned by medslim' if compression else ''}) with nnU-Net's preprocessing "
                        "as MONAI transforms; see docs/README.md"),
        "authors": "nnU-Net model authors; bundle written by medslim",
        "copyright": "see LICENSE",
        "data_source": str(model.dataset_json.get("reference", name)),
        "intended_use": "research only",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if ct else "magnitude",
                "modality": ", ".join(str(v) for v in channels.values()), "num_channels": model.num_input_channels,
                "spatial_shape": patch, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(k): str(v) for k, v in channels.items()}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": model.num_classes,
                "spatial_shape": patch, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": labels}},
        },
        "medslim": {
            "source_model": str(model.folder.resolve()), "fold": model.fold, "configuration": model.configuration_name,
            "network_class": arch["network_class_name"], "compression": compression,
            "report_summary": _report_summary(model.folder), "differences_from_nnunet_predictor": DIFFERENCES,
            "torchscript": "traced (torch.jit.trace) on one patch; the U-Nets do not torch.jit.script",
        },
    }


def _license_text(model: NnUNetModel) -> str:
    """The model folder's LICENSE (or its source model's, for a compressed folder), else a note."""
    candidates = [model.folder / "LICENSE", model.folder.parent / "LICENSE"]
    source = (model.checkpoint.get("medslim") or {}).get("source")
    if source:
        candidates += [Path(source) / "LICENSE", Path(source).parent / "LICENSE"]
    for path in candidates:
        if path.is_file():
            return path.read_text()
    return ("The weights in models/ come from the nnU-Net results folder named in configs/metadata.json "
            "(\"medslim\".\"source_model\"); they are under that model's licence.\n"
            "The bundle configuration was written by medslim (Apache-2.0).\n")


def _readme(model: NnUNetModel, meta: dict[str, Any], config: dict[str, Any]) -> str:
    reorient = any(t["_target_"] == "Orientationd" for t in config["preprocessing"]["transforms"])
    diffs = "\n".join(f"- {d}" for d in DIFFERENCES)
    slices = len(model.patch_size) == 2  # a 2d configuration: in-plane spacing, one slice at a time
    window = f"{'each slice along the first axis: ' if slices else ''}sliding window"
    return f"""# {meta['name']}

{meta['description'].split('; see')[0]}.

Run (from this folder; needs `medslim` and `monai`):

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES --output_dir OUT

Every `IMAGES/*.nii.gz` (one channel, e.g. nnU-Net's `<case>_0000.nii.gz`) is segmented into
`OUT/<case>.nii.gz` with the input's shape and affine. From elsewhere add `--bundle_root BUNDLE`.

Pipeline: load → {'reorient to RAS → ' if reorient else ''}crop to
the nonzero box → {model.configuration['normalization_schemes'][0]} → resample to
{model.configuration['spacing']} mm{' in-plane' if slices else ''} → transpose to the network's axis order
→ {window} (patch {model.patch_size}, overlap 0.5, Gaussian) → undo transpose, resampling
and crop on the logits → argmax → save.

Differences from `nnUNetv2_predict` with the same weights:
{diffs}

Checks:

    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/{SCHEMA_NAME}
    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
        --input_shape "{[1, model.num_input_channels, *model.patch_size]}"

Source: `{model.folder.resolve()}`, fold {model.fold}. Compression spec and report summary: `metadata.json` → `"medslim"`.
"""


def _checked_network(model: NnUNetModel) -> torch.nn.Module:
    """The plans' network with the checkpoint loaded strictly (spec and weights must match)."""
    try:
        return model.build_network()
    except MedslimError:
        raise
    except Exception as e:  # a spec that cannot be applied to the base architecture
        raise MedslimError(f"{model.folder}: the network in plans.json cannot be built with its weights: "
                           f"{first_line(e)}") from e


def export_bundle(model_dir: str | Path, out: str | Path, fold: int | str = 0,
                  checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """Write the MONAI bundle of an nnU-Net results folder at ``out`` (which must not exist).

    Raises:
        MedslimError: ``out`` exists; no plans/dataset.json/checkpoint; plans whose network
            (or compression spec) does not match the weights; unsupported configurations.
    """
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise MedslimError(f"output {out} already exists; choose a new bundle folder")
    check_output_parent(out)
    model = load_results_folder(model_dir, fold, checkpoint_name)
    if model.folder.resolve() in out.parents:
        raise MedslimError(f"output {out} is inside the model folder {model.folder}; choose another path")
    config = inference_config(model)
    meta = metadata(model)
    net = _checked_network(model)
    with atomic_folder(out) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
        (tmp / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
        torch.save(net.state_dict(), tmp / "models" / "model.pt")
        example = torch.zeros(1, model.num_input_channels, *model.patch_size)
        save_traced(net, example, meta, {"inference.json": config}, tmp / "models" / "model.ts")
        (tmp / "docs" / "README.md").write_text(_readme(model, meta, config))
        (tmp / "docs" / SCHEMA_NAME).write_text(SCHEMA_JSON)
        (tmp / "LICENSE").write_text(_license_text(model))
    return out


def save_traced(net: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any], configs: dict[str, Any],
                path: Path) -> None:
    """Trace ``net`` (eval mode) on ``example`` ``[1, C_in, *patch]`` and save it as MONAI's
    ``ckpt_export --use_trace True`` does: ``meta`` as the metadata, each of ``configs``
    (``{extra-file name: config}``) as a JSON extra file."""
    from monai.data import save_net_with_metadata

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of InstanceNorm's shape checks; jit deprecation notes
        traced = torch.jit.trace(net.eval(), example, check_trace=False)
        save_net_with_metadata(traced, str(path), include_config_vals=False, append_timestamp=False, meta_values=meta,
                               more_extra_files={k: json.dumps(v).encode() for k, v in configs.items()})
