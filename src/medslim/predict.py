"""Segment images with any nnU-Net results folder (original or compressed) through nnU-Net's
own predictor, so preprocessing, sliding window and export are exactly nnU-Net's: a folder
of cases (nnU-Net layout), or one NIfTI with TotalSegmentator's outputs."""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from medslim.errors import MedslimError, did_you_mean


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_image_folder(images: str | Path) -> Path:
    """``images`` if it holds nnU-Net inputs (``<case>_0000.nii.gz``), else ``MedslimError``."""
    images = Path(images).expanduser()
    if not images.is_dir() or not any(images.glob("*_0000.nii.gz")):
        raise MedslimError(f"no nnU-Net images (<case>_0000.nii.gz) in {images}")
    return images


def check_complete(image: Path) -> None:
    """Refuse a truncated ``.nii.gz`` before any work: SimpleITK (nnU-Net's reader for many
    plans) reads one silently, zero-filled, and the prediction would look valid. Streams the
    gzip data once without keeping it (about 0.1 s per CT).

    Raises:
        MedslimError: the gzip stream ends early or is not gzip.
    """
    import gzip
    import zlib

    if not image.name.endswith(".gz"):
        return
    try:
        with gzip.open(image, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise MedslimError(f"{image} is truncated or not a valid .nii.gz ({e}); re-export or re-copy it") from None


def predict_folder(model_dir: str | Path, images: str | Path, output: str | Path, fold: str = "0",
                   device: torch.device | None = None, mirroring: bool = True,
                   checkpoint_name: str = "checkpoint_final.pth", backend: str = "auto",
                   options=None, model=None) -> Path:
    """Write ``output/<case>.nii.gz`` for every ``<case>_0000.nii.gz`` in ``images``.

    ``backend`` ``nnunet`` runs nnU-Net's predictor (``predict_from_files_sequential``: in
    this process, no workers); the others run medslim's fast path (``medslim.infer``) with
    that network runtime (``auto``: the fastest installed). Both write what
    ``nnUNetv2_predict`` writes, plus its ``dataset.json``/``plans.json``. ``model``: the
    folder's already loaded ``NnUNetModel`` (the checkpoint is then not read again)."""
    images = check_image_folder(images)
    for image in sorted(images.glob("*.nii.gz")):
        check_complete(image)
    device = device or default_device()
    Path(output).mkdir(parents=True, exist_ok=True)
    if backend == "nnunet":
        return _predict_folder_nnunet(model_dir, images, output, fold, device, mirroring, checkpoint_name)
    from medslim.infer import case_files, load_predictor, segment_files

    predictor = load_predictor(model_dir, fold, checkpoint_name, backend=backend, device=device.type,
                               mirroring=mirroring, options=options, model=model)
    ending = predictor.model.dataset_json.get("file_ending", ".nii.gz")
    for case, files in case_files(images, predictor.model.num_input_channels, ending).items():
        segment_files(predictor, files, Path(output) / f"{case}{ending}")
    for name, content in (("dataset.json", predictor.model.dataset_json), ("plans.json", predictor.model.plans)):
        (Path(output) / name).write_text(json.dumps(content, indent=2))
    return Path(output)


def _predict_folder_nnunet(model_dir, images: Path, output, fold: str, device: torch.device, mirroring: bool,
                           checkpoint_name: str) -> Path:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # nnU-Net prints device notes and per-case chatter on stdout; keep medslim's output readable
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=checkpoint_name)
        predictor.predict_from_files_sequential(str(images), str(output), save_probabilities=False, overwrite=True)
    return Path(output)


def segment_image(model_dir: str | Path, image: str | Path, output: str | Path, *, ml: bool = False,
                  roi_subset: Sequence[str] | None = None, fold: str = "0", device: torch.device | None = None,
                  checkpoint_name: str = "checkpoint_final.pth", overwrite: bool = False,
                  backend: str = "auto", options=None, mirroring: bool = True, model=None) -> Path:
    """TotalSegmentator's outputs for one NIfTI image, from any nnU-Net results folder
    (e.g. ``medslim compress total_fast`` output): ``output/<structure>.nii.gz`` per class
    (uint8 0/1, named by the model's ``dataset.json``), or with ``ml`` one multi-label map at
    ``output`` (uint8/uint16 class ids). Both are on the input's voxel grid and affine.

    nnU-Net's predictor does the resampling to the model's spacing and back, and the
    reorientation its plans ask for (TotalSegmentator's plans: ``NibabelIOWithReorient``), so
    the prediction is what ``nnUNetv2_predict`` gives for this model (``backend``: see
    ``predict_folder``; ``model``: the loaded folder, as there). The input is only read;
    the output appears complete or not at all.

    Raises:
        MedslimError: not a NIfTI file, a model that is not a NIfTI nnU-Net folder, an unknown
            ``roi_subset`` name, an existing output without ``overwrite``.
    """
    import nibabel as nib
    import numpy as np

    from medslim.atomic import atomic_file, atomic_folder, check_output_file, check_output_folder
    from medslim.evaluate.layouts import dataset_json_class_map

    image, output, model_dir = Path(image), Path(output).expanduser(), Path(model_dir)
    if not image.is_file() or not image.name.endswith((".nii", ".nii.gz")):
        raise MedslimError(f"input {image} is not a NIfTI file (.nii or .nii.gz)")
    if not (model_dir / "dataset.json").is_file():
        raise MedslimError(f"{model_dir} is not an nnU-Net results folder (no dataset.json)")
    classes = dataset_json_class_map(model_dir / "dataset.json")
    if json.loads((model_dir / "dataset.json").read_text()).get("file_ending", ".nii.gz") != ".nii.gz":
        raise MedslimError(f"{model_dir} was trained on non-NIfTI files; use nnUNetv2_predict on a folder")
    wanted = _roi_ids(classes, roi_subset)
    if ml and not output.name.endswith((".nii", ".nii.gz")):
        raise MedslimError(f"with --ml the output is one file; give a .nii.gz name, not {output}")
    (check_output_file if ml else check_output_folder)(output, overwrite)
    check_complete(image)
    try:
        img = nib.load(str(image))
        if len(img.shape) != 3:
            raise MedslimError(f"{image} has shape {img.shape}; expected a 3D image")
    except (nib.filebasedimages.ImageFileError, OSError, EOFError) as e:
        raise MedslimError(f"cannot read {image}: {e}") from None

    with tempfile.TemporaryDirectory(prefix="medslim-predict-") as work:
        src, dst = Path(work) / "in", Path(work) / "out"
        if backend == "nnunet":
            src.mkdir()
            # nnU-Net wants <case>_0000.nii.gz; re-saving (not linking) also accepts .nii inputs
            nib.save(img, str(src / "image_0000.nii.gz"))
            predict_folder(model_dir, src, dst, fold=fold, device=device, checkpoint_name=checkpoint_name,
                           backend=backend, mirroring=mirroring)
        else:
            from medslim.infer import load_predictor, segment_files

            dst.mkdir()
            predictor = load_predictor(model_dir, fold, checkpoint_name, backend=backend, model=model,
                                       device=(device or default_device()).type, mirroring=mirroring, options=options)
            segment_files(predictor, [str(image)], dst / "image.nii.gz")
        seg = np.asarray(nib.load(str(dst / "image.nii.gz")).dataobj)
    if seg.shape != img.shape:
        raise MedslimError(f"prediction shape {seg.shape} differs from the input's {img.shape}")
    seg = np.where(np.isin(seg, wanted), seg, 0) if roi_subset else seg
    header = img.header.copy()
    if ml:
        dtype = np.uint8 if max(classes) < 256 else np.uint16
        header.set_data_dtype(dtype)
        with atomic_file(output, overwrite) as tmp:
            nib.save(nib.Nifti1Image(seg.astype(dtype), img.affine, header), str(tmp))
        return output.resolve()
    header.set_data_dtype(np.uint8)
    with atomic_folder(output, overwrite) as tmp:
        for ident in wanted:
            nib.save(nib.Nifti1Image((seg == ident).astype(np.uint8), img.affine, header),
                     str(tmp / f"{classes[ident]}.nii.gz"))
    return output.resolve()


def _roi_ids(classes: dict[int, str], roi_subset: Sequence[str] | None) -> list[int]:
    """Class ids to write: all, or those named in ``roi_subset`` (TotalSegmentator's option)."""
    if not roi_subset:
        return list(classes)
    by_name = {name: ident for ident, name in classes.items()}
    unknown = [r for r in roi_subset if r not in by_name]
    if unknown:
        raise MedslimError(f"unknown structure(s) {', '.join(unknown)} in --roi-subset"
                           f"{did_you_mean(unknown[0], list(by_name))}")
    return sorted(by_name[r] for r in roi_subset)
