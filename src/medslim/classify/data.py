"""MedMNIST ``.npz`` files as a torch ``Dataset`` (one split), with resizing for larger models.

A MedMNIST v2 file holds ``{train,val,test}_images`` (uint8, ``(N, 28, 28)`` grey or
``(N, 28, 28, 3)`` RGB) and ``{train,val,test}_labels`` (``(N, 1)`` or flat ``(N,)``).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medslim.errors import MedslimError

SPLITS = ("train", "val", "test")
MEAN, STD = 0.5, 0.5  # MedMNIST's own examples: x/255 normalised with mean 0.5, std 0.5


class MedMNIST(Dataset):
    """One split of a MedMNIST file.

    ``ds[i]`` is ``(image, label)``: image float32 ``[channels, size, size]`` normalised to
    about [-1, 1], label an int64 scalar tensor. Grey images are repeated to 3 channels when
    ``channels == 3``; RGB images are averaged when ``channels == 1``. Resizing (bilinear) is
    done per item, so a 224-px view costs no extra memory.

    Attributes:
        images: float32 ``[N, channels, 28, 28]`` (normalised, not resized).
        labels: int64 ``[N]``.
        num_classes: classes of the whole file (max label over all splits + 1).
        size: output side length.
        name: file stem plus split, e.g. ``breastmnist/train``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, size: int, name: str):
        self.images, self.labels, self.num_classes, self.size, self.name = images, labels, num_classes, size, name

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return x, self.labels[i]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, n_or_indices: int | Sequence[int], seed: int = 0) -> "MedMNIST":
        """A new dataset with ``n`` items drawn without replacement (seeded), or the given indices."""
        if isinstance(n_or_indices, int):
            if not 0 < n_or_indices <= len(self):
                raise MedslimError(f"subset size {n_or_indices} must be in 1..{len(self)} for {self.name}")
            idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(self), n_or_indices, replace=False)))
        else:
            idx = torch.as_tensor(list(n_or_indices), dtype=torch.long)
        return MedMNIST(self.images[idx], self.labels[idx], self.num_classes, self.size, self.name)


def _labels(raw: np.ndarray, key: str) -> np.ndarray:
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise MedslimError(f"'{key}' has shape {raw.shape}; expected (N,) or (N, 1) class labels "
                           "(multi-label MedMNIST files are not supported)")
    if raw.size and (raw.min() < 0 or not np.all(np.equal(np.mod(raw, 1), 0))):
        raise MedslimError(f"'{key}' must hold non-negative integer class labels")
    return raw.astype(np.int64)


def load_medmnist(path: str | Path, split: str = "train", size: int = 28, channels: int = 3) -> MedMNIST:
    """Load one split of a MedMNIST ``.npz`` file.

    Args:
        path: the ``.npz`` file (e.g. ``../shared/data/medmnist/breastmnist.npz``).
        split: ``train``, ``val`` or ``test``.
        size: output side length (vgg16 needs ≥ 32).
        channels: 1 or 3.

    Raises:
        MedslimError: missing or unreadable file, unknown split, missing keys, image/label count
            mismatch, bad shapes or labels.
    """
    path = Path(path).expanduser()
    if split not in SPLITS:
        raise MedslimError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if channels not in (1, 3):
        raise MedslimError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise MedslimError(f"image size must be positive, got {size}")
    if not path.is_file():
        raise MedslimError(f"dataset file {path} not found")
    try:
        npz = np.load(path, allow_pickle=False)
        files = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MedslimError(f"cannot read {path} as a MedMNIST .npz file ({e})") from None
    with npz:
        ik, lk = f"{split}_images", f"{split}_labels"
        missing = [k for k in (ik, lk) if k not in files]
        if missing:
            raise MedslimError(f"{path.name} has no {', '.join(repr(k) for k in missing)} "
                               f"(found: {', '.join(sorted(files)) or 'nothing'})")
        images, labels = npz[ik], _labels(npz[lk], lk)
        all_labels = [_labels(npz[k], k) for k in sorted(files) if k.endswith("_labels")]
    if images.shape[0] != labels.shape[0]:
        raise MedslimError(f"{path.name}: {images.shape[0]} images but {labels.shape[0]} labels in split "
                           f"'{split}'; every image needs exactly one label")
    if images.ndim == 3:
        x = torch.from_numpy(images.astype(np.float32))[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    else:
        raise MedslimError(f"'{ik}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    if images.dtype == np.uint8 or x.numel() and x.max() > 1.0:
        x = x / 255.0
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    x = ((x - MEAN) / STD).contiguous()
    num_classes = int(max(int(a.max()) if a.size else 0 for a in all_labels)) + 1
    return MedMNIST(x, torch.from_numpy(labels), num_classes, size, f"{path.stem}/{split}")
