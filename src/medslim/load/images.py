"""Do the images fit the model they are given to? Checked from NIfTI headers before any
prediction: nnU-Net itself pads a 2D image (or a single slice) into a 3D patch and ignores
channel files it does not expect, and writes a plausible-looking segmentation either way.

nnU-Net's image layout: one file per case and channel, ``<case>_0000.nii.gz`` …
``<case>_{C-1:04d}.nii.gz``, each a 2D image or a 3D volume. A 3D model needs volumes; a 2D
model takes 2D images or volumes (predicted slice by slice).
"""
from __future__ import annotations

import re
from pathlib import Path

from medslim.errors import MedslimError

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(?:\.gz)?$")


def case_channels(folder: Path) -> dict[str, list[int]]:
    """``{case: sorted channel indices}`` of the nnU-Net image files in ``folder``."""
    cases: dict[str, list[int]] = {}
    for p in sorted(folder.iterdir()):
        if (m := _CHANNEL_FILE.match(p.name)) is not None and p.is_file():
            cases.setdefault(m["case"], []).append(int(m["channel"]))
    return {c: sorted(ch) for c, ch in cases.items()}


def check_channels(cases: dict[str, list[int]], channels: int, model: str) -> None:
    """Every case has exactly the channel files ``_0000`` … ``_{channels-1:04d}``.

    Raises:
        MedslimError: the first case with missing or extra channel files.
    """
    want = list(range(channels))
    for case, found in cases.items():
        if found != want:
            names = ", ".join(f"{case}_{c:04d}" for c in found)
            raise MedslimError(f"case {case} has {len(found)} channel file(s) ({names}); {model} takes {channels} "
                               f"channel(s) (dataset.json channel_names): give exactly "
                               f"{', '.join(f'_{c:04d}' for c in want)}")


def check_image_dims(shape: tuple[int, ...], spatial_dims: int, image: Path | str, model: str) -> None:
    """An image of header shape ``shape`` fits a ``spatial_dims``-D model (see the module
    docstring); a 3D model also refuses a single slice (an axis of size 1).

    Raises:
        MedslimError: not 2 or 3 axes (e.g. channels stacked in one 4D file), a 2D image or a
            single slice for a 3D model.
    """
    if len(shape) not in (2, 3):
        raise MedslimError(f"{image} has {len(shape)} axes (shape {tuple(shape)}); nnU-Net takes one 2D or 3D "
                           f"image per channel (<case>_0000.nii.gz, <case>_0001.nii.gz, …)")
    if spatial_dims == 3 and (len(shape) == 2 or min(shape) == 1):
        what = "a 2D image" if len(shape) == 2 else "a single slice"
        raise MedslimError(f"{image} is {what} (shape {tuple(shape)}); {model} is a 3D model: give 3D volumes")


def check_images_fit(images: Path, channels: int, spatial_dims: int, model: str) -> None:
    """``images`` (a folder in nnU-Net's layout, or one image of a 1-channel model) fit a model
    taking ``channels`` channels over ``spatial_dims`` axes; reads headers only. A missing or
    non-NIfTI path and unreadable headers are left to the predictor's own checks.

    Raises:
        MedslimError: see :func:`check_channels` and :func:`check_image_dims`; a single image
            given to a model of several channels.
    """
    import nibabel as nib

    if images.is_dir():
        check_channels(case_channels(images), channels, model)
        files = [p for p in sorted(images.iterdir()) if _CHANNEL_FILE.match(p.name)]
    elif images.is_file() and images.name.endswith((".nii", ".nii.gz")):
        if channels != 1:
            raise MedslimError(f"{model} takes {channels} channels; give a folder of <case>_0000 … "
                               f"<case>_{channels - 1:04d}.nii.gz images, not one image")
        files = [images]
    else:
        return
    for p in files:
        try:
            shape = nib.load(str(p)).shape
        except Exception:  # noqa: BLE001 - reported by the reader, with its own message
            continue
        check_image_dims(shape, spatial_dims, p, model)
