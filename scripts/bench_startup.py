"""Benchmark: ``medslim --help`` and ``medslim evaluate`` as whole processes, as a user runs
them, against TotalSegmentator's per-class DeepMind loop run the same way.

    nice -n 10 python scripts/bench_startup.py [-n 5]

Jobs: the first 60 MSD Hippocampus label maps (labelsTr, sorted) against copies shifted by
one voxel, and the 117-class TotalSegmentator example pair (example_seg vs
example_seg_fast), each with its class map for both tools. Every command runs ``-n`` times
after one uncounted warm-up, the commands interleaved; per run: wall time, CPU time
(user + sys, worker processes included) and peak RSS (the largest single process, from
``wait4`` as ``/usr/bin/time -v`` reads it). Also: the scoring alone inside this process
(as ``bench_evaluate.py``), and the top-level imports of one ``medslim evaluate``
(``python -X importtime``). The warm-up checks that both tools print the same mean Dice/NSD.

Writes ``benchmarks/results/startup.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HIPPO = DATA / "Task04_Hippocampus"
TS = DATA / "totalsegmentator"
N_HIPPO = 60
MEDSLIM = str(Path(sys.executable).parent / "medslim")
HEAVY = ("torch", "nnunetv2", "torch_pruning", "tensorly", "pandas", "SimpleITK", "matplotlib", "monai")
PYTHON, IMPORT_CLI, HELP = "python -c pass", "python -c 'import medslim.cli'", "medslim --help"


@dataclass(frozen=True)
class Job:
    """One evaluation job: prediction and reference folders and the dataset.json naming its classes."""
    name: str
    pred: Path
    ref: Path
    dataset_json: Path


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    rss: int
    stdout: str


# ---------------------------------------------------------------- the DeepMind process

def class_map(dataset_json: Path) -> dict[int, str]:
    """Foreground ``{id: name}`` of an nnU-Net v2 or MSD dataset.json."""
    labels = json.loads(dataset_json.read_text())["labels"]
    pairs = ((int(k), v) if str(k).isdigit() else (int(v), k) for k, v in labels.items())
    return {i: str(name) for i, name in sorted(pairs) if i}


def deepmind_process(pred: Path, ref: Path, dataset_json: Path) -> None:
    """What a user's script around TotalSegmentator's evaluate.py does: per case, load both
    maps as float64, loop over the classes with ``surface-distance``; print the means."""
    from unittest import mock

    import numpy as np

    from bench_evaluate import deepmind_loop, load_float  # the loop bench_evaluate.py checks

    classes = class_map(dataset_json)
    dice, nsd = [], []
    with mock.patch.object(np, "Inf", np.inf, create=True):  # surface-distance 0.1 on NumPy 2
        for r in sorted(ref.iterdir()):
            gt, spacing = load_float(r)
            d, n = deepmind_loop(gt, load_float(pred / r.name)[0], spacing, classes)
            dice.append(np.nanmean(d)), nsd.append(np.nanmean(n))
    print(f"mean dice {np.nanmean(dice):.4f} nsd {np.nanmean(nsd):.4f}")


# ---------------------------------------------------------------- data and measurement

def jobs_in(work: Path) -> list[Job]:
    return [Job("hippocampus", work / "hippocampus" / "pred", work / "hippocampus" / "ref", HIPPO / "dataset.json"),
            Job("ct", work / "ct" / "pred", work / "ct" / "ref", work / "ct" / "dataset.json")]


def prepare(work: Path) -> None:
    """Write the folders of :func:`jobs_in` (references are symlinks to ../shared/data). Run
    in a child process, so that this one stays small while it launches the timed ones."""
    import nibabel as nib
    import numpy as np

    hip_pred, hip_ref = work / "hippocampus" / "pred", work / "hippocampus" / "ref"
    hip_pred.mkdir(parents=True), hip_ref.mkdir(parents=True)
    for path in sorted(HIPPO.glob("labelsTr/hippocampus_*.nii.gz"))[:N_HIPPO]:
        (hip_ref / path.name).symlink_to(path)
        img = nib.load(str(path))
        shifted = np.roll(np.rint(np.asanyarray(img.dataobj)).astype(np.uint8), 1, axis=0)
        nib.save(nib.Nifti1Image(shifted, img.affine), str(hip_pred / path.name))
    ct_pred, ct_ref = work / "ct" / "pred", work / "ct" / "ref"
    ct_pred.mkdir(parents=True), ct_ref.mkdir(parents=True)
    (ct_ref / "example.nii.gz").symlink_to(TS / "example_seg.nii.gz")
    (ct_pred / "example.nii.gz").symlink_to(TS / "example_seg_fast.nii.gz")
    from medslim.evaluate.layouts import total_class_map

    labels = {"background": 0, **{name: i for i, name in total_class_map().items()}}
    (work / "ct" / "dataset.json").write_text(json.dumps({"labels": labels}))


def run_process(argv: list[str]) -> Run:
    """Run ``argv`` to completion; wall time, and CPU time and peak RSS from ``wait4``.

    Linux counts the launcher's resident size at fork into the child's peak, so the launcher
    imports nothing but the standard library while it times processes."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} exited {proc.returncode}: {err.read().decode()[-2000:]}")
        return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, out.read().decode())


def commands(jobs: list[Job]) -> dict[str, list[str]]:
    """Name → argv of every process timed."""
    py = sys.executable
    out = {PYTHON: [py, "-c", "pass"], IMPORT_CLI: [py, "-c", "import medslim.cli"], HELP: [MEDSLIM, "--help"]}
    for job in jobs:
        evaluate = [MEDSLIM, "evaluate", "--pred", str(job.pred), "--ref", str(job.ref),
                    "--dataset-json", str(job.dataset_json)]
        out[f"medslim evaluate: {job.name}"] = evaluate
        if job.name == "hippocampus":
            out[f"medslim evaluate --workers 1: {job.name}"] = evaluate + ["--workers", "1"]
            out[f"medslim evaluate --workers 2: {job.name}"] = evaluate + ["--workers", "2"]
        out[f"DeepMind loop: {job.name}"] = [py, str(Path(__file__).resolve()), "deepmind", str(job.pred), str(job.ref),
                                             str(job.dataset_json)]
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def check_same_numbers(warm: dict[str, Run], jobs: list[Job]) -> None:
    """medslim's overall row and the DeepMind process's means agree to the 4 printed decimals."""
    for job in jobs:
        row = re.search(r"\*\*all \(mean over cases\)\*\* \| \d+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|",
                        warm[f"medslim evaluate: {job.name}"].stdout)
        theirs = re.search(r"mean dice ([\d.]+) nsd ([\d.]+)", warm[f"DeepMind loop: {job.name}"].stdout)
        assert row and theirs and row.groups() == theirs.groups(), (job.name, row, theirs)


def time_processes(cmds: dict[str, list[str]], repeats: int) -> tuple[dict[str, Run], dict[str, list[Run]]]:
    """One warm-up run of every command, then ``repeats`` rounds, commands interleaved."""
    warm = {name: run_process(argv) for name, argv in cmds.items()}
    runs: dict[str, list[Run]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, argv in cmds.items():
            runs[name].append(run_process(argv))
    return warm, runs


def time_in_process(jobs: list[Job], repeats: int) -> dict[str, dict[str, float]]:
    """Scoring alone, files included, in this process (imports paid already): median seconds."""
    import numpy as np
    from unittest import mock

    from bench_evaluate import deepmind_loop, load_float
    from medslim.evaluate import evaluate_folder

    out = {}
    for job in jobs:
        classes = class_map(job.dataset_json)

        def deepmind() -> None:
            for r in sorted(job.ref.iterdir()):
                gt, spacing = load_float(r)
                deepmind_loop(gt, load_float(job.pred / r.name)[0], spacing, classes)

        def medslim() -> None:
            evaluate_folder(job.pred, job.ref, dataset_json=job.dataset_json, workers=1)

        with mock.patch.object(np, "Inf", np.inf, create=True):
            out[job.name] = {"medslim": _median_time(medslim, repeats),
                             "deepmind_loop": _median_time(deepmind, repeats)}
    return out


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_profile(argv: list[str], min_ms: float = 10.0) -> tuple[list[dict[str, float]], list[str]]:
    """Top-level imports of one run of ``argv`` (a console script) under ``-X importtime`` that
    took at least ``min_ms`` (cumulative), and which of ``HEAVY`` it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=True)
    top, seen = [], set()
    for line in run.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$", line)
        if not m:
            continue
        seen.add(m.group(4).split(".")[0])
        if not m.group(3) and int(m.group(2)) >= min_ms * 1000:
            top.append({"module": m.group(4), "cumulative_ms": int(m.group(2)) / 1000})
    return sorted(top, key=lambda t: -t["cumulative_ms"]), [h for h in HEAVY if h in seen]


# ---------------------------------------------------------------- report

def ratio_phrase(slow: float, fast: float) -> str:
    """How many times faster ``fast`` is than ``slow`` (or slower, if it is not)."""
    return f"{slow / fast:.1f}× faster" if slow >= fast else f"{fast / slow:.1f}× slower"


def _process_rows(processes: dict) -> str:
    def row(name: str, v: dict) -> str:
        wall = v["wall_seconds"]
        return (f"| `{name}` | {wall['median']:.3f} ({wall['min']:.3f}–{wall['max']:.3f}) | "
                f"{v['cpu_seconds']['median']:.3f} | {v['peak_rss_mb']['median']:.0f} |")

    return "\n".join(row(name, v) for name, v in processes.items())


def _findings(result: dict) -> list[str]:
    """One computed sentence per comparison."""
    med = {k: v["wall_seconds"]["median"] for k, v in result["processes"].items()}
    inp, jobs, lines = result["in_process_seconds"], result["jobs"], []
    for job in jobs:
        ours, theirs = med[f"medslim evaluate: {job}"], med[f"DeepMind loop: {job}"]
        lines.append(f"- {job} ({result['data'][job]}): `medslim evaluate` {ours:.2f} s vs the DeepMind loop "
                     f"{theirs:.2f} s as whole processes, {ratio_phrase(theirs, ours)}; scoring alone in one process "
                     f"{inp[job]['medslim']:.3f} s vs {inp[job]['deepmind_loop']:.3f} s, "
                     f"{ratio_phrase(inp[job]['deepmind_loop'], inp[job]['medslim'])}.")
    ours_all = sum(med[f"medslim evaluate: {j}"] for j in jobs)
    theirs_all = sum(med[f"DeepMind loop: {j}"] for j in jobs)
    in_ours, in_theirs = sum(inp[j]["medslim"] for j in jobs), sum(inp[j]["deepmind_loop"] for j in jobs)
    lines.append(f"- Both jobs: {ours_all:.2f} s vs {theirs_all:.2f} s as whole processes, "
                 f"{ratio_phrase(theirs_all, ours_all)}; in one process {ratio_phrase(in_theirs, in_ours)}.")
    lines.append(f"- Start-up: `medslim --help` takes {med[HELP]:.2f} s; the interpreter alone {med[PYTHON]:.2f} s, "
                 f"and `import medslim.cli` adds {med[IMPORT_CLI] - med[PYTHON]:.2f} s to it.")
    auto, w1, w2 = (med[f"medslim evaluate{w}: hippocampus"] for w in ("", " --workers 1", " --workers 2"))
    slower = 100 * (auto - min(w1, w2)) / min(w1, w2)
    verdict = ("no slower than either explicit choice" if slower <= 0
               else f"{slower:.0f} % slower than the faster explicit choice")
    lines.append(f"- Workers, {result['cases']['hippocampus']} Hippocampus pairs: default {auto:.2f} s, "
                 f"`--workers 1` {w1:.2f} s, `--workers 2` {w2:.2f} s; the default was {verdict}.")
    return lines


def _imports(profile: dict) -> str:
    rows = "\n".join(f"| `{t['module']}` | {t['cumulative_ms']:.0f} |" for t in profile["top_level"])
    never = [h for h in HEAVY if h not in profile["heavy_imported"]]
    verdict = (f"Never imported by that run: {', '.join(never)}." if never
               else f"That run imported all of {', '.join(HEAVY)}.")
    if profile["heavy_imported"] and never:
        verdict += f" Imported: {', '.join(profile['heavy_imported'])}."
    return f"""Top-level imports of one `{profile['command']}` under `python -X importtime` (cumulative,
≥ 10 ms; importtime itself slows imports):

| module | ms |
|---|---:|
{rows}

{verdict}
"""


def markdown(result: dict) -> str:
    m = result["machine"]
    return f"""# Start-up benchmark: whole processes, as a user runs them

{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, load average {m['load_before']:.2f} before and
{m['load_after']:.2f} after. {result['repeats']} run(s) per command after one uncounted warm-up, commands
interleaved; wall time median (min–max), CPU = user + sys including worker processes, peak RSS =
largest single process (`wait4`; never below the launcher's {result['launcher_rss_mb']:.0f} MB at fork).
Both tools score the same classes and print the same mean Dice and NSD (checked on the warm-up run).

| command | wall s | CPU s | peak RSS MB |
|---|---:|---:|---:|
{_process_rows(result['processes'])}

{chr(10).join(_findings(result))}

{_imports(result['import_profile'])}"""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "deepmind":
        return deepmind_process(*map(Path, sys.argv[2:5]))
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        return prepare(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "startup")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="medslim-startup-") as tmp:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "prepare", tmp], check=True)
        jobs = jobs_in(Path(tmp))
        cmds = commands(jobs)
        launcher_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
        warm, runs = time_processes(cmds, args.repeats)
        check_same_numbers(warm, jobs)
        top, heavy = import_profile(cmds["medslim evaluate: ct"])
        in_process = time_in_process(jobs, args.repeats)  # imports numpy and medslim here: last
        n_cases = {j.name: len(list(j.ref.iterdir())) for j in jobs}
    result = {
        "repeats": args.repeats,
        "jobs": [j.name for j in jobs],
        "cases": n_cases,
        "data": {"hippocampus": f"{n_cases['hippocampus']} label maps vs shifted by one voxel, 2 classes",
                 "ct": f"{n_cases['ct']} pair, 117 classes"},
        "processes": {name: {"wall_seconds": summary([r.wall for r in rs]), "cpu_seconds": summary([r.cpu for r in rs]),
                             "peak_rss_mb": summary([r.rss / 1e6 for r in rs])}
                      for name, rs in runs.items()},
        "in_process_seconds": in_process,
        "import_profile": {"command": "medslim evaluate: ct", "top_level": top, "heavy_imported": heavy},
        "launcher_rss_mb": launcher_mb,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0],
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
