"""nnU-Net's sliding window, streamed: Gaussian-weighted tiles accumulated in float32 in a
buffer one patch deep along the axis with the most tiles, each slab handed on as soon as no
later tile touches it.

Same tiles (``compute_steps_for_sliding_window``, step 0.5), Gaussian (σ = patch/8) and
padding as nnU-Net's predictor, whose bookkeeping differs in two ways that cost time and
memory on CPU: it accumulates all ``K`` class logits of the whole volume in a float16 buffer
(each tile is converted on the way in: 1.25 s per 118-class tile against 0.5 s in float32,
nnU-Net issue #1238), and keeps that buffer until the end. Tile order along the streamed axis
changes the floating-point summation order only.
"""
from __future__ import annotations

import itertools
import time
from typing import Iterator, Sequence

import numpy as np

from medslim.infer.backends import PatchRunner


def mirrored(run: PatchRunner, mirror_axes: Sequence[int] | None) -> PatchRunner:
    """Test-time mirroring as nnU-Net's predictor: the mean over the patch and its flips along
    every non-empty subset of ``mirror_axes`` (spatial axes, 0-based)."""
    if not mirror_axes:
        return run
    combos = [tuple(a + 2 for a in c) for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)]

    def run_mirrored(x: np.ndarray) -> np.ndarray:
        total = run(x).copy()
        for axes in combos:
            total += np.flip(run(np.ascontiguousarray(np.flip(x, axes))), axes)
        total /= len(combos) + 1
        return total
    return run_mirrored


class Timer:
    """Seconds per stage, accumulated: ``with timer("network"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, stage: str) -> "_Span":
        return _Span(self, stage)


class _Span:
    def __init__(self, timer: Timer, stage: str) -> None:
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        t = self.timer
        t.seconds[self.stage] = t.seconds.get(self.stage, 0.0) + time.perf_counter() - self.start
        t.counts[self.stage] = t.counts.get(self.stage, 0) + 1


def logit_slabs(data: np.ndarray, run: PatchRunner, patch: Sequence[int], channels: int,
                step: float = 0.5, timer: Timer | None = None) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Sliding-window outputs of ``data`` ``[C_in, *S]`` (preprocessed), as slabs: the class
    logits, or the features the head reads (``medslim.infer.head``), ``channels`` of them.

    Yields ``(axis, start, stop, slab)``: ``slab`` ``float32 [channels, …]`` covers
    ``start:stop`` of spatial ``axis`` (0-based) and the whole extent of the other axes, in
    ``data``'s coordinates (padding removed). Slabs come in order and tile ``S`` along
    ``axis``. A yielded array is reused afterwards: consume it before the next one.
    A 2D ``patch`` on a 3D ``data`` (nnU-Net's ``2d`` configuration) runs slice by slice.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    import torch

    timer = timer or Timer()
    patch = [int(p) for p in patch]
    if len(patch) == data.ndim - 2:
        yield from _slice_slabs(data, run, patch, channels, step, timer)
        return
    padded, revert = pad_nd_image(data, patch, "constant", {"constant_values": 0}, True, None)
    shape = padded.shape[1:]
    steps = compute_steps_for_sliding_window(shape, patch, step)
    axis = max(range(len(shape)), key=lambda a: (len(steps[a]), shape[a]))
    gauss = compute_gaussian(tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                             device=torch.device("cpu")).numpy()
    depth = patch[axis]
    buf_shape = list(shape)
    buf_shape[axis] = depth
    acc = np.zeros((channels, *buf_shape), np.float32)  # Gaussian-weighted sums
    weight = np.zeros(buf_shape, np.float32)
    keep = [revert[d + 1] for d in range(len(shape))]  # padded → data coordinates, per axis
    lo = 0  # padded coordinate of the buffer's first plane along ``axis``
    for start in steps[axis]:
        if start > lo:
            yield from _emit(acc, weight, axis, lo, start, keep)
            _shift(acc, weight, axis, start - lo)
            lo = start
        for corner in itertools.product(*[steps[d] if d != axis else [start] for d in range(len(shape))]):
            tile = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            local = list(tile)
            local[axis] = slice(0, depth)  # the buffer starts at this tile's plane
            with timer("network"):
                out = run(np.ascontiguousarray(padded[(slice(None), *tile)][None]))[0]
            with timer("accumulate"):
                out = out if out.flags.writeable else out.copy()
                out *= gauss
                acc[(slice(None), *local)] += out
                weight[tuple(local)] += gauss
    yield from _emit(acc, weight, axis, lo, shape[axis], keep)


def _slice_slabs(data: np.ndarray, run: PatchRunner, patch: Sequence[int], channels: int, step: float,
                 timer: Timer) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """A 2D window on ``data`` ``[C_in, Z, Y, X]``, as nnU-Net's predictor runs a ``2d``
    configuration: each slice ``[C_in, Y, X]`` through its own sliding window, yielded as the
    one-plane slab ``(0, z, z + 1, float32 [channels, 1, Y, X])``."""
    for z in range(data.shape[1]):
        plane = output_volume(np.ascontiguousarray(data[:, z]), run, patch, channels, step, timer)
        yield 0, z, z + 1, plane[:, None]


def _emit(acc: np.ndarray, weight: np.ndarray, axis: int, lo: int, hi: int,
          keep: list[slice]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Normalise buffer planes ``[lo, hi)`` (padded coordinates) and yield the part inside
    the unpadded data."""
    k0, k1 = keep[axis].start or 0, keep[axis].stop if keep[axis].stop is not None else hi
    a, b = max(lo, k0), min(hi, k1)
    if a >= b:
        return
    sel = [keep[d] if d != axis else slice(a - lo, b - lo) for d in range(len(keep))]
    slab = acc[(slice(None), *sel)]
    slab /= weight[tuple(sel)]
    yield axis, a - k0, b - k0, slab


def _shift(acc: np.ndarray, weight: np.ndarray, axis: int, n: int) -> None:
    """Move the buffer ``n`` planes forward along ``axis``: drop the first ``n``, zero the last."""
    for arr, ax in ((acc, axis + 1), (weight, axis)):
        depth = arr.shape[ax]
        src = [slice(None)] * arr.ndim
        dst = [slice(None)] * arr.ndim
        src[ax], dst[ax] = slice(n, depth), slice(0, depth - n)
        arr[tuple(dst)] = arr[tuple(src)]
        dst[ax] = slice(max(depth - n, 0), depth)
        arr[tuple(dst)] = 0


def argmax_volume(data: np.ndarray, run: PatchRunner, patch: Sequence[int], channels: int,
                  step: float = 0.5, timer: Timer | None = None, head=None) -> np.ndarray:
    """Label map ``uint16 [*S]`` of ``data`` ``[C_in, *S]``: the argmax of the sliding-window
    logits (or of ``head`` applied to the averaged features), slab by slab. Softmax does not
    change the argmax."""
    from medslim.infer.head import apply_head

    timer = timer or Timer()
    seg = np.zeros(data.shape[1:], np.uint16)
    for axis, a, b, slab in logit_slabs(data, run, patch, channels, step, timer):
        with timer("argmax"):
            idx = [slice(None)] * seg.ndim
            idx[axis] = slice(a, b)
            seg[tuple(idx)] = apply_head(slab, head)
    return seg


def output_volume(data: np.ndarray, run: PatchRunner, patch: Sequence[int], channels: int,
                  step: float = 0.5, timer: Timer | None = None) -> np.ndarray:
    """All sliding-window outputs ``float32 [channels, *S]`` (for resampling to another grid)."""
    out = np.empty((channels, *data.shape[1:]), np.float32)
    for axis, a, b, slab in logit_slabs(data, run, patch, channels, step, timer):
        idx = [slice(None)] * out.ndim
        idx[axis + 1] = slice(a, b)
        out[tuple(idx)] = slab
    return out
