"""Normalised surface Dice (NSD) with the surfel-area method of DeepMind ``surface-distance``.

Re-implemented (not called) for speed and memory with 117 classes: the reference loop redoes
full-volume masks, bounding box, area table and a Python sort of every surfel per class.

The numbers are those of ``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``:
the same 2x2x2 neighbour codes (one zero voxel of padding around the box) and surfel-area
table. "Distance <= tolerance" is decided by marking, around every border point of the other
mask, the voxel offsets whose length (scipy's EDT formula
``sqrt(((di*s0)**2 + (dj*s1)**2) + (dk*s2)**2)``) is <= tolerance; for balls of more than
``MAX_BALL_OFFSETS`` voxels the crop's EDT is used, as DeepMind does. Areas are summed per
neighbour code instead of over sorted surfels, so results agree to ~1e-15, not bit for bit.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from medslim.evaluate._surfel_table import NORMALS_EIGHTHS

# Beyond this many voxel offsets inside the tolerance ball, a distance transform of the crop
# is cheaper than marking every offset around every border point.
MAX_BALL_OFFSETS = 1000


@functools.lru_cache(maxsize=32)
def surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the surface inside each of the 256 neighbour codes: ``[256]`` float64.

    Same arithmetic, in the same order, as ``create_table_neighbour_code_to_surface_area``."""
    table = np.zeros([256])
    for code, normals in enumerate(NORMALS_EIGHTHS):
        normals_mm = np.array(normals, dtype=np.float64) / 8.0  # exact: eighths
        total = 0
        for nx, ny, nz in normals_mm:
            n = np.zeros([3])
            n[0] = nx * spacing[1] * spacing[2]
            n[1] = ny * spacing[0] * spacing[2]
            n[2] = nz * spacing[0] * spacing[1]
            total += np.linalg.norm(n)
        table[code] = total
    return table


def neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """8-bit code of every 2x2x2 neighbourhood of a zero-padded binary mask.

    Args:
        padded: bool ``[X+2, Y+2, Z+2]``, the mask with one zero voxel on every side.

    Returns:
        uint8 ``[X+1, Y+1, Z+1]``; bit 7 is the neighbourhood's ``[0, 0, 0]`` voxel, bit 0 its
        ``[1, 1, 1]`` voxel (DeepMind's ``ENCODE_NEIGHBOURHOOD_3D_KERNEL``). 0 and 255 are
        outside/inside; every other code holds surface.
    """
    lo, hi = slice(None, -1), slice(1, None)
    code = padded[lo, lo, lo].astype(np.uint8)
    for sl in ((lo, lo, hi), (lo, hi, lo), (lo, hi, hi), (hi, lo, lo), (hi, lo, hi), (hi, hi, lo), (hi, hi, hi)):
        code <<= 1
        code |= padded[sl]
    return code


@functools.lru_cache(maxsize=32)
def ball_offsets(spacing: tuple[float, float, float], tolerance: float) -> np.ndarray:
    """Voxel offsets whose length in mm is ``<= tolerance``: int64 ``[K, 3]`` (read-only).

    Lengths use scipy's EDT arithmetic (``sqrt(((di*s0)**2 + (dj*s1)**2) + (dk*s2)**2)``), so
    "within tolerance" is decided exactly as DeepMind's ``distances <= tolerance_mm``."""
    r = [int(np.floor(tolerance / s)) + 1 for s in spacing]
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij"), axis=0).astype(np.float64)
    for axis, s in enumerate(spacing):
        grid[axis] *= s
    np.multiply(grid, grid, grid)
    dist = np.sqrt(np.add.reduce(grid, axis=0))
    out = np.argwhere(dist <= tolerance) - np.array(r)
    out.setflags(write=False)
    return out


def crop_margin(spacing: Sequence[float], tolerance: float) -> tuple[int, int, int]:
    """Zero voxels to put around a class's bounding box before :func:`surface_dice_crops`:
    one for the 2x2x2 codes plus the tolerance ball's radius in voxels."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance}")
    off = ball_offsets(tuple(float(s) for s in spacing), float(tolerance))
    if len(off) > MAX_BALL_OFFSETS:
        return (1, 1, 1)
    return tuple(int(v) + 1 for v in np.abs(off).max(axis=0))


def _within_tolerance(points: np.ndarray, targets: np.ndarray, shape: tuple[int, ...],
                      spacing: tuple[float, float, float], tolerance: float) -> np.ndarray:
    """For each of ``points`` (flat indices ``[N]`` into a grid of ``shape``), is any of
    ``targets`` (flat indices ``[M]``, M >= 1) within ``tolerance`` mm? Returns bool ``[N]``.

    The grid must have a margin of :func:`crop_margin` - 1 voxels around all points."""
    offsets = ball_offsets(spacing, tolerance)
    if len(offsets) > MAX_BALL_OFFSETS:
        mask = np.ones(int(np.prod(shape)), bool)
        mask[targets] = False
        dist = ndimage.distance_transform_edt(mask.reshape(shape), sampling=spacing)
        return dist.ravel()[points] <= tolerance
    near = np.zeros(int(np.prod(shape)), bool)
    for flat in offsets @ np.array([shape[1] * shape[2], shape[2], 1]):
        near[targets + flat] = True
    return near[points]


def _surfels(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Flat indices (``[N]``) and neighbour codes (uint8 ``[N]``) of the surfels of a padded
    mask, in the grid of :func:`neighbour_codes`, and that grid's shape."""
    code = neighbour_codes(padded).ravel()
    idx = np.flatnonzero((code != 0) & (code != 255))
    return idx, code[idx], tuple(s - 1 for s in padded.shape)


def _area(codes: np.ndarray, table: np.ndarray) -> float:
    return float(np.bincount(codes, minlength=256).astype(np.float64) @ table)


def surface_dice_crops(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float],
                       tolerance: float) -> float:
    """NSD of two non-empty masks (bool ``[X, Y, Z]``) that have :func:`crop_margin` zero
    voxels on every side. Distances do not depend on the crop, so a class's bounding box
    plus that margin gives the full-volume numbers."""
    table = surfel_area_table(spacing)
    ref_pts, ref_codes, shape = _surfels(ref)
    pred_pts, pred_codes, _ = _surfels(pred)
    ref_ok = _within_tolerance(ref_pts, pred_pts, shape, spacing, tolerance)
    pred_ok = _within_tolerance(pred_pts, ref_pts, shape, spacing, tolerance)
    overlap = _area(ref_codes[ref_ok], table) + _area(pred_codes[pred_ok], table)
    return overlap / (_area(ref_codes, table) + _area(pred_codes, table))


def normalized_surface_dice(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                            tolerance: float = 3.0) -> float:
    """NSD of one pair of binary masks (SPEC §7).

    Args:
        ref, pred: bool ``[X, Y, Z]`` masks of the same shape.
        spacing: voxel size in mm along X, Y, Z.
        tolerance: distance in mm at which two surfaces count as touching.

    Returns:
        NSD in [0, 1]; NaN if ``ref`` is empty (the class is not counted); 0 if only ``pred``
        is empty. Otherwise equal to DeepMind's ``compute_surface_dice_at_tolerance``.
    """
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    if ref.shape != pred.shape or ref.ndim != 3:
        raise ValueError(f"need two 3D masks of one shape, got {ref.shape} and {pred.shape}")
    if not ref.any():
        return float("nan")
    if not pred.any():
        return 0.0
    sp, tol = tuple(float(s) for s in spacing), float(tolerance)
    box = ndimage.find_objects((ref | pred).astype(np.uint8))[0]
    pad = [(m, m) for m in crop_margin(sp, tol)]
    return surface_dice_crops(np.pad(ref[box], pad), np.pad(pred[box], pad), sp, tol)
