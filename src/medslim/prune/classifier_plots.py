"""Figures of 2D pruning: accuracy vs ratio, per-layer channel density (thesis Fig. 4.6), and
the input-pixel HVS map (thesis Fig. 4.4). Small PNGs (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_accuracy(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
                  path: Path, *, baseline: float | None = None, control: float | None = None,
                  title: str = "") -> Path:
    """Accuracy vs pruning ratio; ``curves[label] = (ratios, mean accuracy, std or None)``;
    horizontal lines for the unpruned model and the unpruned model + the same fine-tune."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, (x, y, err) in curves.items():
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label="unpruned")
    if control is not None:
        ax.axhline(control, color="grey", ls=":", lw=1, label="unpruned + same fine-tune")
    ax.set(xlabel="pruning ratio", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_density(densities: Mapping[str, Sequence[float]], layer_names: Sequence[str], path: Path,
                 title: str = "") -> Path:
    """Kept / original output channels per layer (x = layer index in module order), one line per
    setting (e.g. per ratio), like thesis Fig. 4.6."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(layer_names)), 3.4))
    x = np.arange(1, len(layer_names) + 1)
    for label, d in densities.items():
        ax.plot(x, d, marker="o", ms=3, label=label)
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set(xlabel="layer (module order; 1 = stem)", ylabel="channel density", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_input_maps(maps: Mapping[str, Tensor], path: Path, image: Tensor | None = None) -> Path:
    """One panel per ``[H, W]`` map (each scaled to its own range); an optional image
    ``[C, H, W]`` in the first panel for reference."""
    panels = ([("image", image)] if image is not None else []) + list(maps.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
    for ax, (label, t) in zip(axes[0], panels):
        a = t.detach().float().cpu().numpy()
        if label == "image":
            a = a.mean(0) if a.ndim == 3 else a
            ax.imshow(a, cmap="gray")
        else:
            im = ax.imshow(a, cmap="inferno")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
