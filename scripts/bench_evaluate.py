"""Benchmark: medslim's Dice + NSD against the per-class DeepMind loop of TotalSegmentator's
``resources/evaluate.py``, on the shared 117-class example pair, in one run.

    nice -n 10 python scripts/bench_evaluate.py [--repeats 5]

Writes ``benchmarks/results/evaluate.json`` and ``.md``. Asserts that both give the same
numbers (NaN pattern identical, |difference| <= 1e-12). Time: median of ``--repeats`` runs
(no tracing); memory: tracemalloc peak of numpy/Python allocations during scoring, beyond the
inputs, in a separate traced run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import surface_distance

REPO = Path(__file__).resolve().parents[1]
TS = REPO.parent / "shared" / "data" / "totalsegmentator"
REF, PRED = TS / "example_seg.nii.gz", TS / "example_seg_fast.nii.gz"
TOL = 3.0


def deepmind_loop(gt_all: np.ndarray, pred_all: np.ndarray, spacing, classes: dict[int, str]):
    """``calc_metrics`` of TotalSegmentator's resources/evaluate.py with the header spacing
    (the script hard-codes 1.5 mm) and Dice without its +1e-6 in the denominator."""
    dice, nsd = [], []
    for idx in classes:
        gt, pred = gt_all == idx, pred_all == idx
        if gt.max() > 0 and pred.max() == 0:
            dice.append(0.0), nsd.append(0.0)
        elif gt.max() > 0:
            dice.append(2 * np.sum(gt * pred) / (np.sum(gt) + np.sum(pred)))
            sd = surface_distance.compute_surface_distances(gt, pred, list(spacing))
            nsd.append(surface_distance.compute_surface_dice_at_tolerance(sd, TOL))
        else:
            dice.append(np.nan), nsd.append(np.nan)
    return np.array(dice, float), np.array(nsd, float)


def load_float(path: Path):  # as evaluate.py loads: get_fdata() -> float64
    img = nib.load(str(path))
    return img.get_fdata(), tuple(float(z) for z in img.header.get_zooms())


def load_labels(path: Path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms())


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def main() -> None:
    # here, not at the top: bench_startup.py times deepmind_loop in processes without medslim
    from medslim.evaluate import evaluate_case, score_label_maps, total_class_map

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "evaluate")
    args = ap.parse_args()
    classes = total_class_map()
    labels = list(classes)
    ref_f, spacing = load_float(REF)
    pred_f, _ = load_float(PRED)
    ref_u, _ = load_labels(REF)
    pred_u, _ = load_labels(PRED)

    with mock.patch.object(np, "Inf", np.inf, create=True):  # surface-distance 0.1 on NumPy 2
        base = lambda: deepmind_loop(ref_f, pred_f, spacing, classes)  # noqa: E731
        ours = lambda: score_label_maps(ref_u, pred_u, spacing, labels, TOL)  # noqa: E731
        ours(), base()  # warm-up (area table cache, imports)
        t_base, (dice_b, nsd_b) = timed(base, args.repeats)
        t_ours, s = timed(ours, args.repeats)
        t_base_files, _ = timed(lambda: deepmind_loop(*load_float(REF)[:1], load_float(PRED)[0], spacing, classes), 3)
        t_ours_files, frame = timed(lambda: evaluate_case(PRED, REF, class_map=classes, tolerance=TOL), 3)
        m_base, m_ours = peak_bytes(base), peak_bytes(ours)
        m_ours_files = peak_bytes(lambda: evaluate_case(PRED, REF, class_map=classes, tolerance=TOL))

    for a, b, what in ((s.dice, dice_b, "dice"), (s.nsd, nsd_b, "nsd"), (frame["nsd"].to_numpy(), nsd_b, "nsd (files)")):
        assert np.array_equal(np.isnan(a), np.isnan(b)), what
        assert np.nanmax(np.abs(a - b)) <= 1e-12, (what, np.nanmax(np.abs(a - b)))
    volume = ref_u.nbytes
    result = {
        "data": {"pair": [REF.name, PRED.name], "shape": list(ref_u.shape), "spacing_mm": list(spacing),
                 "classes": len(labels), "classes_in_reference": int(np.sum(~np.isnan(nsd_b))),
                 "label_volume_bytes": {"uint8_as_stored": volume, "float64_as_evaluate_py_loads": ref_f.nbytes}},
        "tolerance_mm": TOL, "repeats": args.repeats,
        "seconds": {"deepmind_loop": t_base, "medslim": t_ours, "speedup": t_base / t_ours,
                    "deepmind_loop_from_files": t_base_files, "medslim_from_files": t_ours_files,
                    "speedup_from_files": t_base_files / t_ours_files},
        "peak_bytes": {"deepmind_loop": m_base, "medslim": m_ours, "medslim_from_files_incl_loading": m_ours_files,
                       "medslim_in_label_volumes": m_ours / volume, "deepmind_in_label_volumes": m_base / volume},
        "max_abs_difference": {"dice": float(np.nanmax(np.abs(s.dice - dice_b))),
                               "nsd": float(np.nanmax(np.abs(s.nsd - nsd_b)))},
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    sec, mem = result["seconds"], result["peak_bytes"]
    md = f"""# Evaluation benchmark: medslim vs DeepMind per-class loop

{REF.name} vs {PRED.name}: {ref_u.shape} voxels at {spacing[0]:g} mm, {len(labels)} classes
({result['data']['classes_in_reference']} in the reference), NSD tolerance {TOL:g} mm. Same numbers:
max |Δ| Dice {result['max_abs_difference']['dice']:.1e}, NSD {result['max_abs_difference']['nsd']:.1e}.

| | DeepMind loop (TotalSegmentator evaluate.py) | medslim | ratio |
|---|---:|---:|---:|
| time, arrays in memory (median of {args.repeats}) | {sec['deepmind_loop'] * 1e3:.1f} ms | {sec['medslim'] * 1e3:.1f} ms | {sec['speedup']:.1f}× faster |
| time, from files (median of 3) | {sec['deepmind_loop_from_files'] * 1e3:.1f} ms | {sec['medslim_from_files'] * 1e3:.1f} ms | {sec['speedup_from_files']:.1f}× faster |
| peak extra memory while scoring | {mem['deepmind_loop'] / 1e6:.2f} MB | {mem['medslim'] / 1e6:.3f} MB | {mem['medslim_in_label_volumes']:.2f} label volumes (uint8, {volume / 1e6:.2f} MB) |
| peak incl. loading both files | – | {mem['medslim_from_files_incl_loading'] / 1e6:.2f} MB | |

Memory: tracemalloc peak beyond the inputs. Goal: ≥10× faster, ≤4 label volumes.
"""
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
