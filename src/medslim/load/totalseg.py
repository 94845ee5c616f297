"""Find a TotalSegmentator task's nnU-Net results folder in the user's weights directory.

No weights are downloaded here; when they are absent the error names the command that
downloads them (TotalSegmentator's own ``totalseg_download_weights``).
"""
from __future__ import annotations

import os
from pathlib import Path

from medslim.errors import MedslimError

#: task name → (dataset ids, fold). ``total`` (1.5 mm) is five models (291–295), one per part.
TOTALSEG_TASKS: dict[str, tuple[tuple[int, ...], str]] = {
    "total_fast": ((297,), "0"),
    "total": ((291, 292, 293, 294, 295), "0"),
    "total_part1": ((291,), "0"),
    "total_part2": ((292,), "0"),
    "total_part3": ((293,), "0"),
    "total_part4": ((294,), "0"),
    "total_part5": ((295,), "0"),
}


def weights_dir() -> Path:
    """TotalSegmentator's nnU-Net results folder (its own resolver when installed)."""
    try:
        from totalsegmentator.config import get_weights_dir

        return Path(get_weights_dir())
    except ImportError:
        if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
            return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
        home = Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))
        return home / "nnunet" / "results"


def resolve_totalseg_task(task: str) -> tuple[Path, str]:
    """``(results folder, fold)`` of a single-model task such as ``total_fast`` or ``total_part2``.

    Raises:
        MedslimError: unknown task, a multi-model task (``total``: compress one part at a time),
            or weights not downloaded.
    """
    if task not in TOTALSEG_TASKS:
        raise MedslimError(f"unknown TotalSegmentator task '{task}'; known: {', '.join(TOTALSEG_TASKS)}")
    ids, fold = TOTALSEG_TASKS[task]
    if len(ids) > 1:
        parts = ", ".join(f"total_part{i}" for i in range(1, len(ids) + 1))
        raise MedslimError(f"'{task}' is {len(ids)} separate nnU-Net models; compress them one at a time: {parts}")
    root = weights_dir()
    folders = sorted(root.glob(f"Dataset{ids[0]}_*/*__3d_fullres"))
    if not folders:
        dl_task = "total" if task.startswith("total_part") else task
        raise MedslimError(f"TotalSegmentator weights for '{task}' (Dataset{ids[0]}) are not in {root}; "
                           f"download them with: totalseg_download_weights -t {dl_task}")
    return folders[0], fold


def write_totalseg_standin(reconstructed_plans: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write an nnU-Net results folder with TotalSegmentator's 3 mm architecture and random
    (He-initialised, untrained) weights, for size/speed measurements and pipeline tests.

    ``reconstructed_plans`` is ``shared/data/totalsegmentator/Dataset297_total_3mm_plans_reconstructed.json``
    (what is publicly known of Dataset297: 5-stage PlainConvUNet [32, 64, 128, 256, 320], 3³
    kernels, 118 outputs, patch 112×112×128, 3 mm, CT normalisation). Real users load the real
    folder instead (``medslim compress total_fast``). Returns the results folder.
    """
    import json

    from medslim.export.nnunet_folder import write_untrained_folder

    src = json.loads(Path(reconstructed_plans).read_text())
    a = src["architecture_inferred"]
    n = a["n_stages"]
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": a["features_per_stage"], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": a["kernel_sizes"], "strides": a["strides"], "n_conv_per_stage": a["n_conv_per_stage"],
            "n_conv_per_stage_decoder": a["n_conv_per_stage_decoder"], "conv_bias": a["conv_bias"],
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    spacing = src["spacing"]
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": src["patch_size"], "median_image_size_in_voxels": src["patch_size"], "spacing": spacing,
        "normalization_schemes": src["normalization_schemes"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch, "batch_dice": False,
    }
    fg = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
          for k, v in src["foreground_intensity_properties_per_channel"].items()}
    for props in fg.values():  # nnU-Net's CTNormalization reads mean/std/percentiles only
        props.setdefault("median", props["mean"])
        props.setdefault("min", props["percentile_00_5"])
        props.setdefault("max", props["percentile_99_5"])
    plans = {
        "dataset_name": src["dataset_name"], "plans_name": src["plans_name"],
        "original_median_spacing_after_transp": spacing, "original_median_shape_after_transp": src["patch_size"],
        "image_reader_writer": "NibabelIOWithReorient", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": fg, "configurations": {"3d_fullres": config},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": src["labels"], "numTraining": 0, "file_ending": ".nii.gz",
               "name": src["dataset_name"], "description": "medslim stand-in: TotalSegmentator 3 mm architecture, random weights"}
    return write_untrained_folder(plans, dataset, "3d_fullres", out, seed)
