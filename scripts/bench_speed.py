"""Speed users feel: whole-process wall-clock and peak RSS of segmentation on CPU, original vs
compressed, stock nnU-Net vs ``medslim predict``.

Sets (models built in a temp dir):

- TotalSegmentator 3 mm architecture (the stand-in: random weights, seed 0; only shapes matter
  for speed) and its ``medslim compress`` outputs at DF 0.3 / ρ 0.5, sites ``outer`` and
  ``all``, on TotalSegmentator's example CT (122×101×30 at 3 mm, one tile after padding) and on
  a full-length CT built from it (the 30 slices mirrored back and forth to 300, 90 cm at 3 mm:
  5 tiles). No test-time mirroring (TotalSegmentator's 3 mm model has none).
- The embedded reference Hippocampus model and its DF 0.3 / ρ 0.5 outer compression on the 5
  embedded demo cases (one folder), with the test-time mirroring its checkpoint asks for.

Commands, each a fresh process timed by this script (``wait4``: wall-clock and peak RSS of
the whole process, imports included), interleaved round by round so that machine drift hits
all of them: ``nnUNetv2_predict_from_modelfolder -device cpu`` (stock nnU-Net as users run it)
and ``medslim predict MODEL ... --backend B --threads T`` for each backend B. This parent
process imports no torch: Linux carries a parent's peak RSS into the children it starts.

Ratios are per round, then the median. medslim's ONNX cache is filled first, as after a
user's first run (the one-off export time is reported). The stage breakdown and per-layer
profile come from ``medslim benchmark`` on the full CT. Writes
``benchmarks/results/speed.json`` and ``speed.md``.

Usage: python scripts/bench_speed.py [--runs 3] [--threads 2] [--sets small,full,hippocampus]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "totalsegmentator"
OUT = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
STOCK = "nnUNetv2_predict"
STAGES = ("imports", "load", "onnx_export", "compile", "preprocess", "network", "accumulate", "argmax", "resample", "export")
SETS = {  # name: (models, description, test-time mirroring)
    "small": ("totalseg", "TotalSegmentator example CT, 122×101×30 voxels at 3 mm", False),
    "full": ("totalseg", "full-length CT built from it, 122×101×300 voxels at 3 mm", False),
    "hippocampus": ("hippocampus", "5 embedded Hippocampus test cases (MRI, ~36×50×35 voxels), with mirroring", True),
}


def compress(original: Path, out: Path, site: str) -> Path:
    subprocess.run([str(BIN / "medslim"), "compress", str(original), "-o", str(out), "--df", "0.3", "--prune", "0.5",
                    "--prune-site", site], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def prepare(work: Path) -> None:
    """In a child process: models, inputs, sizes and ONNX exports, written to prepared.json."""
    import nibabel as nib
    import numpy as np

    from medslim.api import DEFAULT_MODEL, DEMO_CASES
    from medslim.infer.head import trunk
    from medslim.infer.predictor import onnx_file
    from medslim.load import load_results_folder
    from medslim.load.totalseg import write_totalseg_standin
    from medslim.measure import count_flops, count_parameters

    ts = write_totalseg_standin(SHARED / "Dataset297_total_3mm_plans_reconstructed.json", work / "models")
    models = {"totalseg": {"original": ts, **{f"DF 0.3 ρ 0.5 {s}": compress(ts, work / "models" / f"ts_{s}", s)
                                              for s in ("outer", "all")}},
              "hippocampus": {"original": DEFAULT_MODEL,
                              "DF 0.3 ρ 0.5 outer": compress(DEFAULT_MODEL, work / "models" / "hippo_outer", "outer")}}
    img = nib.load(str(SHARED / "example_ct_sm.nii.gz"))
    data = np.asarray(img.dataobj)
    inputs = {"hippocampus": str(DEMO_CASES / "imagesTs")}
    for name, arr in (("small", data), ("full", np.concatenate([data, data[:, :, ::-1]] * 5, axis=2))):
        folder = work / "images" / name
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(folder / "case_0000.nii.gz"))
        inputs[name] = str(folder)
    sizes, export = {}, {}
    for family, group in models.items():
        for name, folder in group.items():
            m = load_results_folder(folder)
            net = m.build_network()
            sizes[f"{family}/{name}"] = {"params": count_parameters(net),
                                         "flops": count_flops(net, [1, m.num_input_channels, *m.patch_size])}
            t = time.perf_counter()  # what a user's first run pays once; cached afterwards
            onnx_file(m, lambda: trunk(m.build_network()), trunk_only=True)
            export[f"{family}/{name}"] = time.perf_counter() - t
    (work / "prepared.json").write_text(json.dumps({
        "models": {f: {k: str(v) for k, v in g.items()} for f, g in models.items()}, "inputs": inputs,
        "sizes": sizes, "onnx_export_seconds": export}))


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall-clock and peak RSS (MB) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def commands(models: dict[str, str], inputs: str, out: Path, threads: int, backends: list[str],
             tta: bool) -> dict[tuple[str, str], list[str]]:
    """``{(model, runner): argv}``. A folder of several cases is predicted as a folder; one CT
    as TotalSegmentator's ``--ml`` map."""
    folder = Path(inputs)
    single = len(list(folder.glob("*_0000.nii.gz"))) == 1
    cmds = {}
    for name, model in models.items():
        cmds[(name, STOCK)] = [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(folder), "-o",
                               str(out / "stock"), "-m", model, "-f", "0", "-device", "cpu"] + ([] if tta else ["--disable_tta"])
        target = ["-i", str(folder / "case_0000.nii.gz"), "-o", str(out / "seg.nii.gz"), "--ml"] if single else \
                 ["-i", str(folder), "-o", str(out / "pred")]
        for backend in backends:
            cmds[(name, f"medslim {backend}")] = [str(BIN / "medslim"), "predict", model, *target, "--backend", backend,
                                                  "--threads", str(threads), "--overwrite"] + ([] if tta else ["--disable-tta"])
    return cmds


def time_commands(cmds: dict, runs: int, env: dict[str, str], out: Path) -> dict[tuple[str, str], list[dict]]:
    results: dict[tuple[str, str], list[dict]] = {k: [] for k in cmds}
    for round_ in range(runs):
        for key, cmd in cmds.items():
            shutil.rmtree(out / "stock", ignore_errors=True)
            r = run(cmd, env)
            print(f"round {round_} {key}: {r['wall_seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB", flush=True)
            results[key].append(r)
    return results


def summarise(results: dict) -> list[dict]:
    """One row per (model, runner): medians and ranges; ratios per round against stock
    nnU-Net on the original."""
    base = results[("original", STOCK)]
    rows = []
    for (model, runner), rs in results.items():
        walls = [r["wall_seconds"] for r in rs]
        speedups = [b["wall_seconds"] / r["wall_seconds"] for b, r in zip(base, rs)]
        rss = [r["peak_rss_mb"] / b["peak_rss_mb"] for b, r in zip(base, rs)]
        rows.append({"model": model, "runner": runner, "wall_median": statistics.median(walls), "wall_min": min(walls),
                     "wall_max": max(walls), "rss_median": statistics.median(r["peak_rss_mb"] for r in rs),
                     "speedup": statistics.median(speedups), "speedup_range": [min(speedups), max(speedups)],
                     "rss_ratio": statistics.median(rss), "runs": rs})
    return rows


def stage_breakdown(models: dict[str, str], image: str, threads: int, work: Path, env: dict[str, str]) -> list[dict]:
    """One ``medslim benchmark`` run per model and backend on ``image``: stages and profile."""
    rows = []
    for name, folder in models.items():
        for backend in ("torch", "openvino"):
            out = work / f"stages_{len(rows)}.json"
            subprocess.run([str(BIN / "medslim"), "benchmark", folder, "-i", image, "--backend", backend, "--threads",
                            str(threads), "--runs", "1", "--warmup", "0", "-o", str(out)],
                           check=True, stdout=subprocess.DEVNULL, env=env)
            job = json.loads(out.read_text())["jobs"][0]
            rows.append({"model": name, "backend": job["backend_used"], "stages": job["runs"][0]["stages"],
                         "tiles": job["tiles"], "profile": job["profile"]})
    return rows


def ratio(a: dict, b: dict) -> float:
    """Median per-round speed-up of row ``b`` over row ``a``."""
    return statistics.median(x["wall_seconds"] / y["wall_seconds"] for x, y in zip(a["runs"], b["runs"]))


def goals(rows: list[dict], sizes: dict, family: str) -> list[str]:
    """Sentences computed from the rows: the speed issue's goals, met or not."""
    by = {(r["model"], r["runner"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        if model == "original":
            continue
        best = min((r for r in rows if r["model"] == model and r["runner"] != STOCK), key=lambda r: r["wall_median"])
        own = ratio(by[("original", best["runner"])], best)
        flops = sizes[f"{family}/original"]["flops"] / sizes[f"{family}/{model}"]["flops"]
        out.append(f"- {model}, `{best['runner']}`: ×{best['speedup']:.2f} faster than stock nnU-Net on the original "
                   f"(goal ≥3×: {'met' if best['speedup'] >= 3 else 'not met'}), peak RSS ×{best['rss_ratio']:.2f} "
                   f"(goal ≤0.5: {'met' if best['rss_ratio'] <= 0.5 else 'not met'}); against the original on the same "
                   f"runner ×{own:.2f} (goal ≥2×: {'met' if own >= 2 else 'not met'}; FLOP ratio ×{flops:.1f}); stock "
                   f"nnU-Net on the compressed folder ×{by[(model, STOCK)]['speedup']:.2f}.")
    return out


def steps(rows: list[dict]) -> list[str]:
    """Each optimisation as its own measured step: stock → medslim's window on PyTorch → each
    runtime → compression, each ratio against the step before."""
    by = {(r["model"], r["runner"]): r for r in rows}
    chain = [("original", STOCK, "stock nnU-Net (float16 window, PyTorch)"),
             ("original", "medslim torch", "medslim window: float32, streamed, head split (PyTorch)")]
    chain += [("original", r, f"runtime: {r.split()[1]}") for r in ("medslim onnxruntime", "medslim openvino")
              if ("original", r) in by]
    last = chain[-1][1]
    chain += [(m, last, f"compression: {m}") for m in dict.fromkeys(r["model"] for r in rows) if m != "original"]
    lines = ["| step | wall s (median) | × vs previous step | × vs stock |", "|---|---|---|---|"]
    prev = None
    for model, runner, label in chain:
        if (model, runner) not in by:
            continue
        row = by[(model, runner)]
        step = f"×{ratio(by[prev], row):.2f}" if prev else "—"
        lines.append(f"| {label} | {row['wall_median']:.1f} | {step} | ×{row['speedup']:.2f} |")
        if model == "original":
            prev = (model, runner)
    return lines


def markdown(result: dict) -> str:
    lines = ["# Speed on CPU, whole processes", "",
             f"Machine: {result['machine']}; {result['threads']} threads for medslim (stock nnU-Net: its defaults); "
             f"{result['runs']} runs per command, interleaved round by round; median (min–max). Speed-up and RSS ratio: "
             "per round against stock `nnUNetv2_predict` on the original, then the median. TotalSegmentator: random "
             "weights (the real ones cannot be downloaded here), so no Dice; labels of every backend against nnU-Net's "
             "predictor are tested on the Hippocampus model in `tests/test_infer.py`.", ""]
    for name, block in result["sets"].items():
        family = SETS[name][0]
        lines += [f"## {SETS[name][1]}", "",
                  "| model | runner | params | FLOPs/patch | wall s | peak RSS MB | speed-up | RSS ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in block:
            size = result["sizes"][f"{family}/{r['model']}"]
            lines.append(f"| {r['model']} | {r['runner']} | {size['params'] / 1e6:.2f} M | {size['flops'] / 1e9:.1f} G | "
                         f"{r['wall_median']:.1f} ({r['wall_min']:.1f}–{r['wall_max']:.1f}) | {r['rss_median']:.0f} | "
                         f"×{r['speedup']:.2f} | {r['rss_ratio']:.2f} |")
        lines += ["", "Step by step:", "", *steps(block), "", *goals(block, result["sizes"], family), ""]
    if result.get("stages"):
        lines += ["## Where the time goes (full CT, one in-process run per row, seconds)", "",
                  "| model | backend | tiles | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
        for b in result["stages"]:
            lines.append(f"| {b['model']} | {b['backend']} | {b['tiles']} | "
                         + " | ".join(f"{b['stages'].get(s, 0.0):.2f}" for s in STAGES) + " |")
        lines += ["", "Top layers of one patch (each backend's own profiler):", ""]
        for b in result["stages"]:
            top = ", ".join(f"{p['op']} `{p['layer'][-40:]}` {p['ms']:.0f} ms ({100 * p['share']:.0f} %)" for p in b["profile"][:3])
            lines.append(f"- {b['model']}, {b['backend']}: {top}")
    lines += ["", "ONNX export on first use (cached afterwards): "
              + ", ".join(f"{m} {s:.1f} s" for m, s in result["onnx_export_seconds"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="small,full,hippocampus")
    ap.add_argument("--backends", default="torch,onnxruntime,openvino", help="medslim runtimes (small CT, Hippocampus)")
    ap.add_argument("--full-backends", default="torch,openvino", help="medslim runtimes on the full CT")
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    work = Path(tempfile.mkdtemp(prefix="medslim-speed-"))
    env = dict(os.environ, nnUNet_compile="f", MEDSLIM_CACHE=str(work / "cache"), OMP_WAIT_POLICY="PASSIVE",
               nnUNet_results=str(work), nnUNet_raw=str(work), nnUNet_preprocessed=str(work),
               nnUNet_extTrainer=str(REPO / "nnunet_plugin"))  # the reference checkpoint names medslim's trainer
    try:
        subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True, env=env)
        prepared = json.loads((work / "prepared.json").read_text())
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                  "threads": args.threads, "runs": args.runs, "sizes": prepared["sizes"], "sets": {},
                  "onnx_export_seconds": prepared["onnx_export_seconds"]}
        for name in args.sets.split(","):
            family, _, tta = SETS[name]
            backends = (args.full_backends if name == "full" else args.backends).split(",")
            cmds = commands(prepared["models"][family], prepared["inputs"][name], work / "out", args.threads, backends, tta)
            result["sets"][name] = summarise(time_commands(cmds, args.runs, env, work / "out"))
        if "full" in result["sets"]:
            result["stages"] = stage_breakdown(prepared["models"]["totalseg"],
                                               str(Path(prepared["inputs"]["full"]) / "case_0000.nii.gz"),
                                               args.threads, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.json").write_text(json.dumps(result, indent=1))
    (OUT / "speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
