"""``medslim benchmark``: time full sliding-window inference of a model (and an original beside
it) through the path ``medslim predict`` takes, one fresh process per model and run.

Each run is a child process (``python -m medslim.infer.benchmark_worker``) so that its peak
RSS and its start-up belong to that model alone. A run reports its whole-process wall-clock
and peak RSS up to the moment its segmentation is written (the worker counts FLOPs and
profiles layers only afterwards, and that time is subtracted), and stage seconds (start-up/imports, model load, ONNX
export/runtime compile, preprocessing, network, accumulation, argmax/resampling, export).
Runs alternate between the models (A B A B …) so that drift of a shared machine hits both.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from medslim.errors import MedslimError
from medslim.infer.backends import resolve_backend


@dataclass(frozen=True)
class BenchmarkJob:
    """One model × backend configuration to time."""

    model: str
    image: str
    backend: str = "auto"
    threads: int | None = None
    mirroring: bool = False
    fold: str = "0"
    checkpoint: str = "checkpoint_final.pth"
    profile: bool = False


def model_folder(model: str) -> Path:
    """The results folder of ``model`` (a folder or a TotalSegmentator task), checked for its
    JSON files without importing torch (the workers load and check the weights).

    Raises:
        MedslimError: not a results folder, or an unknown/absent TotalSegmentator task.
    """
    from medslim.load.totalseg import TOTALSEG_TASKS, resolve_totalseg_task

    folder = resolve_totalseg_task(model)[0] if model in TOTALSEG_TASKS and not Path(model).exists() else Path(model)
    missing = [f for f in ("plans.json", "dataset.json") if not (folder / f).is_file()]
    if missing:
        raise MedslimError(f"{folder} is not an nnU-Net results folder ({', '.join(missing)} missing)")
    return folder.resolve()


def run_once(job: BenchmarkJob) -> dict[str, Any]:
    """Run ``job`` in a fresh process; its report with ``wall_seconds`` and ``peak_rss_mb``.

    Raises:
        MedslimError: the worker failed (its last stderr line is quoted).
    """
    with tempfile.TemporaryDirectory(prefix="medslim-bench-") as work:
        report = Path(work) / "report.json"
        cmd = [sys.executable, "-m", "medslim.infer.benchmark_worker", json.dumps(asdict(job)), str(report)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not report.is_file():
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["(no message)"]
            raise MedslimError(f"benchmark of {job.model} ({job.backend}) failed: {last[0]}")
        result = json.loads(report.read_text())
    # the process's wall-clock up to its output; FLOP counting and profiling come after that
    result["wall_seconds"] = wall - result.pop("extras_seconds")
    return result


def benchmark(jobs: Sequence[BenchmarkJob], runs: int = 3, warmup: int = 1,
              progress=None) -> dict[str, Any]:
    """Time every job ``runs`` times after ``warmup`` uncounted rounds, interleaved.

    Returns ``{"jobs": [{job, runs: [...], median: {...}, min: {...}, max: {...}}], "ratios"}``;
    ``ratios`` (when there are two or more jobs) are each later job's median whole-process
    wall-clock and peak RSS relative to the first job's, and the medians of the per-round
    ratios (robust to drift)."""
    if runs < 1 or warmup < 0:
        raise MedslimError(f"--runs must be ≥ 1 and --warmup ≥ 0, got {runs} and {warmup}")
    for job in jobs:  # unknown or absent backends fail here, not in a worker
        resolve_backend(job.backend)
    results: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for round_ in range(warmup + runs):
        for i, job in enumerate(jobs):
            if progress:
                progress(f"{'warm-up' if round_ < warmup else f'run {round_ - warmup + 1}/{runs}'}: {job.model}")
            out = run_once(job)
            if round_ >= warmup:
                results[i].append(out)
    summary = {"jobs": [_summarise(job, rs) for job, rs in zip(jobs, results)]}
    if len(jobs) > 1:
        summary["ratios"] = [_ratios(results[0], rs, jobs[0], job) for job, rs in zip(jobs[1:], results[1:])]
    return summary


_FIGURES = ("wall_seconds", "peak_rss_mb")


def _flat(run: dict[str, Any]) -> dict[str, float]:
    figures = {k: run[k] for k in _FIGURES}
    figures.update({f"stage.{k}": v for k, v in run["stages"].items()})
    return figures


def _summarise(job: BenchmarkJob, runs: list[dict[str, Any]]) -> dict[str, Any]:
    flat = [_flat(r) for r in runs]
    keys = sorted({k for f in flat for k in f})
    stat = {name: {k: fn([f.get(k, 0.0) for f in flat]) for k in keys}
            for name, fn in (("median", statistics.median), ("min", min), ("max", max))}
    first = runs[0]
    return {"job": asdict(job), "backend_used": first["backend"], "params": first["params"], "flops": first["flops"],
            "patch": first["patch"], "tiles": first["tiles"], "profile": first.get("profile"), "runs": runs, **stat}


def _ratios(base: list[dict[str, Any]], other: list[dict[str, Any]], job0: BenchmarkJob,
            job: BenchmarkJob) -> dict[str, Any]:
    """How much faster/smaller ``job`` is than ``job0``: base / other, per round and of medians."""
    per_round = {k: [b[k] / o[k] for b, o in zip(base, other)] for k in _FIGURES}
    net = [b["stages"]["network"] / o["stages"]["network"] for b, o in zip(base, other)]
    return {"baseline": job0.model, "model": job.model,
            "speedup_wall": statistics.median(per_round["wall_seconds"]),
            "speedup_wall_range": [min(per_round["wall_seconds"]), max(per_round["wall_seconds"])],
            "speedup_network": statistics.median(net),
            "rss_ratio": 1 / statistics.median(per_round["peak_rss_mb"]),
            "params_ratio": base[0]["params"] / other[0]["params"],
            "flops_ratio": base[0]["flops"] / other[0]["flops"]}


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows for the readable table: one per job, medians with min–max."""
    rows = []
    for j in summary["jobs"]:
        med, lo, hi = j["median"], j["min"], j["max"]
        stages = ", ".join(f"{k[6:]} {med[k]:.2f}" for k in med if k.startswith("stage.") and med[k] >= 0.005)
        rows.append([j["job"]["model"], j["backend_used"], f"{j['params'] / 1e6:.2f} M", f"{j['flops'] / 1e9:.1f} G",
                     f"{med['wall_seconds']:.2f} ({lo['wall_seconds']:.2f}–{hi['wall_seconds']:.2f})",
                     f"{med['peak_rss_mb']:.0f}", stages])
    return rows
