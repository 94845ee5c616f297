"""Calibration patches for data-aware criteria (``hvs_data``, ``taylor``): nnU-Net images
preprocessed exactly as the model's own predictor does (``medslim.infer.preprocess_case``),
cut to the model's patch size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from medslim.errors import MedslimError


def calibration_patches(model, folder: str | Path, n: int = 8, seed: int = 0) -> Tensor:
    """``[n, C, *patch]`` float32 patches from the nnU-Net images in ``folder``
    (``<case>_0000.nii.gz`` …, one file per input channel) for the loaded results folder
    ``model`` (``NnUNetModel``).

    ``min(n, cases)`` cases are drawn with ``seed``, preprocessed with the model's plans
    (crop to nonzero, normalisation, resampling), and patch ``j`` is a seeded random crop of
    case ``j mod cases`` (``random_crop``), zero-padded evenly where the case is smaller
    than the patch (as nnU-Net's sliding window pads; zero is the mean after z-scoring).

    Raises:
        MedslimError: ``n < 1``; ``folder`` missing or without ``<case>_0000.nii.gz``; a case
            lacking a channel file, having more channel files than the model's inputs, a
            truncated or unreadable image, or the wrong number of channels after reading.
    """
    from medslim.infer.predictor import case_files, nnunet_plans, preprocess_case
    from medslim.predict import check_complete, check_image_folder

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MedslimError(f"--calibration-patches must be an integer ≥ 1, got {n!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MedslimError(f"calibration folder {folder} does not exist (expected nnU-Net images <case>_0000.nii.gz)")
    check_image_folder(folder)
    channels = model.num_input_channels
    ending = model.dataset_json.get("file_ending", ".nii.gz")
    extra = sorted(folder.glob(f"*_{channels:04d}{ending}"))
    if extra:
        raise MedslimError(f"{extra[0].name} in {folder} is input channel {channels + 1}, but the model takes "
                           f"{channels} channel(s) ({', '.join(f'_{c:04d}' for c in range(channels))})")
    cases = case_files(folder, channels, ending)
    rng = np.random.default_rng(seed)
    chosen = [list(cases)[i] for i in sorted(rng.permutation(len(cases))[:min(n, len(cases))])]
    for case in chosen:
        for f in cases[case]:
            check_complete(Path(f))
    plans_manager, configuration, _ = nnunet_plans(model)
    data = []
    for case in chosen:
        array, _ = preprocess_case(cases[case], plans_manager, configuration, model.dataset_json)
        if array.shape[0] != channels:
            raise MedslimError(f"case {case} in {folder} has {array.shape[0]} channels after reading; "
                               f"the model takes {channels}")
        data.append(array)
    patch = [int(p) for p in model.patch_size]
    return torch.from_numpy(np.stack([random_crop(data[j % len(data)], patch, rng) for j in range(n)]))


def random_crop(image: np.ndarray, patch: list[int], rng: np.random.Generator) -> np.ndarray:
    """``[C, *patch]`` crop of ``image`` ``[C, *shape]`` at a uniform random offset per axis;
    axes shorter than the patch are zero-padded evenly on both sides. A 2D ``patch`` on a 3D
    ``image`` (nnU-Net's ``2d`` configuration) crops a random slice along the first axis."""
    if len(patch) == image.ndim - 2:
        image = image[:, int(rng.integers(0, image.shape[1]))]
    pad = [(0, 0)] + [((p - s) // 2, p - s - (p - s) // 2) if s < p else (0, 0) for s, p in zip(image.shape[1:], patch)]
    image = np.pad(image, pad)
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch)]
    return np.ascontiguousarray(image[(slice(None), *(slice(a, a + p) for a, p in zip(starts, patch)))])
