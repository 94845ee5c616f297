"""``configs/inference.json`` of a MONAI bundle: nnU-Net's preprocessing, sliding window and
export, written as MONAI transforms from the plans.

Axes: MONAI loads NIfTI in voxel order ``(i, j, k)``; nnU-Net's readers give ``(k, j, i)``
(``NibabelIOWithReorient`` after reorienting to RAS) and then apply ``transpose_forward``.
The bundle does the same with ``Orientationd`` (reorienting readers only) and one
``Transposed``, so the network sees the axis order it was trained on and the plans' patch
size and spacing apply unchanged. ``Invertd`` undoes transpose, resampling and crop on the
logits (as nnU-Net does) before the argmax.
"""
from __future__ import annotations

from typing import Any

from medslim.errors import MedslimError
from medslim.load.nnunet import NnUNetModel

#: what still differs from nnUNetPredictor; repeated in metadata.json and docs/README.md
DIFFERENCES = [
    "no test-time mirroring (nnU-Net mirrors by default; compare with use_mirroring=False)",
    ("MONAI's sliding-window tile positions (interval = patch/2, last tile flush with the border) "
     "instead of nnU-Net's evenly spread steps; both use Gaussian weighting, sigma = patch/8"),
    ("resampling: MONAI Spacingd (cubic spline, scipy, extent-aligned) instead of nnU-Net's skimage resize "
     "(cubic, separate z order 0 for anisotropic data); logits are resampled back with the same spline "
     "before argmax, nnU-Net resamples them linearly (nothing differs when the image already has the plans' spacing)"),
]


def _callable(path: str | None) -> dict[str, str] | None:
    """A config component that yields the class at ``path`` (not an instance)."""
    return None if path is None else {"_target_": path, "_mode_": "callable"}


def network_def(model: NnUNetModel) -> dict[str, Any]:
    """``network_def``: the plans' class (``CompressedUNet`` with its spec for compressed
    models) with its kwargs; input ``[B, C_in, *patch]`` → logits ``[B, num_classes, *patch]``."""
    arch = model.architecture
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", []):
        kwargs[key] = _callable(kwargs.get(key))
    return {"_target_": arch["network_class_name"], "input_channels": model.num_input_channels,
            "num_classes": model.num_classes, **kwargs, "deep_supervision": False}


def _axes(model: NnUNetModel) -> tuple[list[int], list[float]]:
    """``Transposed`` indices (MONAI ``(C, i, j, k)`` → the network's order) and the target
    spacing in MONAI's ``(i, j, k)`` order. A ``2d`` configuration's spacing is in-plane only:
    its slice axis (the network's first) keeps the image's spacing, as in nnU-Net (0 =
    keep, for ``Spacingd``)."""
    tf = list(model.plans.get("transpose_forward", [0, 1, 2]))
    spacing = [float(s) for s in model.configuration["spacing"]]
    if len(spacing) not in (2, 3) or sorted(tf) != [0, 1, 2]:
        raise MedslimError(f"{model.folder}: only 2D and 3D configurations of 3D images can be exported as "
                           f"bundles (spacing {spacing}, transpose_forward {tf})")
    spacing = [0.0] * (3 - len(spacing)) + spacing
    indices = [0] + [3 - t for t in tf]
    pixdim = [0.0, 0.0, 0.0]
    for t, axis in enumerate(tf):  # network axis t = nnU-Net reader axis tf[t] = MONAI axis 2 - tf[t]
        pixdim[2 - axis] = spacing[t]
    return indices, pixdim


def inferer(model: NnUNetModel) -> dict[str, Any]:
    """MONAI's sliding window over the plans' patch (Gaussian, overlap 0.5); a ``2d``
    configuration slides over each slice along the network's first axis (``SliceInferer``)."""
    patch = list(model.patch_size)
    window = {"roi_size": patch, "sw_batch_size": 1, "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125,
              "padding_mode": "constant", "cval": 0.0}
    if len(patch) == 2:
        return {"_target_": "SliceInferer", "spatial_dim": 0, **window}
    return {"_target_": "SlidingWindowInferer", **window}


def normalization(model: NnUNetModel) -> list[dict[str, Any]]:
    """The plans' intensity normalisation of the (single) input channel.

    ``CTNormalization``: clip to the foreground 0.5/99.5 percentiles, then z-score with the
    foreground mean/std (one linear ``ScaleIntensityRanged`` with ``clip``);
    ``ZScoreNormalization``: per-image z-score (of the nonzero voxels if ``use_mask_for_norm``)."""
    scheme = model.configuration["normalization_schemes"][0]
    if scheme == "CTNormalization":
        props = model.plans["foreground_intensity_properties_per_channel"]["0"]
        lo, hi, mean = float(props["percentile_00_5"]), float(props["percentile_99_5"]), float(props["mean"])
        std = max(float(props["std"]), 1e-8)
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                 "b_min": (lo - mean) / std, "b_max": (hi - mean) / std, "clip": True}]
    if scheme == "ZScoreNormalization":
        nonzero = bool(model.configuration.get("use_mask_for_norm", [False])[0])
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": nonzero}]
    if scheme in ("NoNormalization", "RescaleTo01Normalization"):
        return [] if scheme == "NoNormalization" else [
            {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]
    raise MedslimError(f"{model.folder}: normalisation '{scheme}' is not supported by the bundle export "
                       "(supported: CTNormalization, ZScoreNormalization, RescaleTo01Normalization, NoNormalization)")


def inference_config(model: NnUNetModel) -> dict[str, Any]:
    """The whole ``inference.json``: ``dataset_dir``/*.nii.gz → ``output_dir``/<case>.nii.gz."""
    if model.num_input_channels != 1:
        raise MedslimError(f"{model.folder} has {model.num_input_channels} input channels; "
                           "the bundle export supports single-channel models only")
    if any(isinstance(v, (list, tuple)) for v in model.dataset_json.get("labels", {}).values()):
        raise MedslimError(f"{model.folder} is region-based (dataset.json labels are lists); "
                           "the bundle export supports plain label maps only")
    indices, pixdim = _axes(model)
    reorient = "Reorient" in str(model.plans.get("image_reader_writer", ""))
    pre: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "dtype": "$torch.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    if reorient:
        pre.append({"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"})
    pre += [
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "select_fn": "$lambda x: x != 0",
         "margin": 0, "allow_smaller": True},
        *normalization(model),
        {"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": 3, "padding_mode": "nearest",
         "scale_extent": True, "dtype": "$torch.float32"},
        {"_target_": "Transposed", "keys": "image", "indices": indices},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    out_dtype = "$numpy.uint8" if model.num_classes <= 256 else "$numpy.int16"
    post = [  # like nnU-Net: logits back to the input grid, then argmax
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "separate_folder": False, "resample": False, "output_dtype": out_dtype,
         "output_name_formatter": {"_target_": "medslim.export.bundle_run.case_name", "_mode_": "callable"}},
    ]
    return {
        "imports": ["$import glob", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/sampledata'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(model),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "inferer": inferer(model),
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "initialize": ["$@network.load_state_dict(@checkpoint)", "$@network.eval()"],
        "backend": "auto",
        "run": [{"_target_": "medslim.export.bundle_run.run_inference", "dataset": "@dataset", "network": "@network",
                 "inferer": "@inferer", "postprocessing": "@postprocessing", "device": "@device",
                 "backend": "@backend"}],
    }
