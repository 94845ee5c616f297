"""Segment images with any nnU-Net results folder (original or compressed) through nnU-Net's
own predictor, so preprocessing, sliding window and export are exactly nnU-Net's."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from medslim.errors import MedslimError


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def predict_folder(model_dir: str | Path, images: str | Path, output: str | Path, fold: str = "0",
                   device: torch.device | None = None, mirroring: bool = True,
                   checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """Write ``output/<case>.nii.gz`` for every ``<case>_0000.nii.gz`` in ``images``.

    Runs in this process (``predict_from_files_sequential``): no worker processes, which keeps
    small CPU runs fast and tests deterministic."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images = Path(images)
    if not images.is_dir() or not any(images.glob("*_0000.nii.gz")):
        raise MedslimError(f"no nnU-Net images (<case>_0000.nii.gz) in {images}")
    device = device or default_device()
    Path(output).mkdir(parents=True, exist_ok=True)
    # nnU-Net prints device notes and per-case chatter on stdout; keep medslim's output readable
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=checkpoint_name)
        predictor.predict_from_files_sequential(str(images), str(output), save_probabilities=False, overwrite=True)
    return Path(output)
