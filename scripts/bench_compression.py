"""Compression benchmark: sizes on TotalSegmentator's 3 mm architecture, and test-set Dice of
the reference Hippocampus model before any fine-tuning, per criterion.

Part A (``--part size``): the TotalSegmentator 3 mm stand-in (5-stage PlainConvUNet
[32, 64, 128, 256, 320], 118 outputs, patch 112×112×128, random weights; only shapes matter
for size and speed) compressed at the thesis' DF grid with ρ ∈ {0, 0.5} (prune sites
``outer`` and ``all``): physical parameters, FLOPs of one patch, wall time of compression,
beside the ratios printed in the thesis' Tables 5.1/5.2 (quoted, not measured here).

Part B (``--part dice``): the embedded reference model and its DF 0.3 / ρ 0.5 compressions
with each criterion (hvs, l1, random; also decomposition only), predicted with nnU-Net's own
predictor on the 40 held-out test cases of ``configs/hippocampus_split.json``; mean Dice of
both labels. No fine-tuning: this isolates what each criterion keeps.

Writes ``benchmarks/results/compression.json`` and ``compression.md``.
Usage: python scripts/bench_compression.py [--part size|dice|all] [--cases N]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medslim.api import DEFAULT_MODEL
from medslim.compress import CompressConfig, compress_network
from medslim.evaluate import mean_dice_folder
from medslim.export.nnunet_folder import write_results_folder
from medslim.load import load_results_folder
from medslim.load.totalseg import write_totalseg_standin
from medslim.measure import count_flops, count_parameters
from medslim.predict import predict_folder
from medslim.summary import summarize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results"
DF_GRID = [0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
# Thesis Tables 5.1 (ρ = 0) and 5.2 (ρ per row, 0.4 at DF 0.9, else 0.5): compression ratios as printed.
THESIS_CR = {0.0: dict(zip(DF_GRID, [1.1, 1.7, 3.0, 4.1, 5.8, 8.2, 10.9, 11.6])),
             0.5: dict(zip(DF_GRID, [1.7, 3.0, 4.8, 6.2, 8.1, 10.5, 12.7, 13.2]))}


def part_size(work: Path) -> list[dict]:
    folder = write_totalseg_standin(SHARED / "totalsegmentator" / "Dataset297_total_3mm_plans_reconstructed.json", work)
    model = load_results_folder(folder)
    net = model.build_network()
    shape = [1, 1, *model.patch_size]
    p0, f0 = count_parameters(net), count_flops(net, shape)
    rows = []
    for rho, site in ((0.0, "outer"), (0.5, "outer"), (0.5, "all")):
        for df in DF_GRID:
            t = time.perf_counter()
            c = compress_network(net, CompressConfig(df=df, prune_ratio=rho, prune_site=site), shape)
            seconds = time.perf_counter() - t
            p1, f1 = count_parameters(c.network), count_flops(c.network, shape)
            rows.append({"df": df, "rho": rho, "site": site, "params": p1, "params_original": p0,
                         "ratio": p0 / p1, "reduction_pct": 100 * (1 - p1 / p0), "flops_G": f1 / 1e9,
                         "flops_original_G": f0 / 1e9, "seconds": seconds,
                         "thesis_ratio": THESIS_CR[rho][df]})
            print(f"DF {df:<4} ρ {rho} {site:5}: {p1:>10,} params (×{p0 / p1:5.2f}), {f1 / 1e9:7.1f} GFLOPs, {seconds:5.1f} s")
    return rows


def part_dice(work: Path, n_cases: int) -> dict:
    split = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())
    cases = split["test"][:n_cases]
    images, labels = work / "imagesTs", SHARED / "Task04_Hippocampus" / "labelsTr"
    images.mkdir()
    for case in cases:  # nnU-Net's input naming; the data itself is read, never modified
        shutil.copy(SHARED / "Task04_Hippocampus" / "imagesTr" / f"{case}.nii.gz", images / f"{case}_0000.nii.gz")
    model = load_results_folder(DEFAULT_MODEL)
    net = model.build_network()
    shape = [1, 1, *model.patch_size]
    variants = {"original": None, "decomposition only (DF 0.3, ρ 0)": CompressConfig(df=0.3, prune_ratio=0.0)}
    for crit in ("hvs", "l1", "random"):
        variants[f"{crit} (DF 0.3, ρ 0.5)"] = CompressConfig(df=0.3, prune_ratio=0.5, criterion=crit)
    results = {}
    for i, (name, config) in enumerate(variants.items()):
        folder = DEFAULT_MODEL
        params = count_parameters(net)
        if config is not None:
            c = compress_network(net, config, shape)
            folder = write_results_folder(model, c.network.state_dict(), c.spec, summarize(net, c, shape), work / f"m{i}")
            params = count_parameters(c.network)
        pred = predict_folder(folder, images, work / f"pred{i}", device=torch.device("cpu"))
        d = mean_dice_folder(pred, labels, cases, [1, 2])
        results[name] = {"params": params, "dice_mean": d["mean"], "dice_anterior": d["mean_per_label"][1],
                         "dice_posterior": d["mean_per_label"][2]}
        print(f"{name:34}: {params:>9,} params, Dice {d['mean']:.4f} "
              f"(anterior {d['mean_per_label'][1]:.4f}, posterior {d['mean_per_label'][2]:.4f})")
    return {"cases": cases, "seed": 0, "variants": results}


def markdown(res: dict) -> str:
    lines = ["# Compression benchmark", "", f"Machine: {res['machine']}; torch {res['torch']}; threads {res['threads']}.", ""]
    if "size" in res:
        p0 = res["size"][0]["params_original"]
        lines += [f"## TotalSegmentator 3 mm architecture ({p0:,} params incl. the 3 unused deep-supervision "
                  "heads; patch 112×112×128)", "",
                  "| DF | ρ | site | params | ratio | reduction | GFLOPs/patch | time (s) | thesis ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["size"]:
            lines.append(f"| {r['df']} | {r['rho']} | {r['site']} | {r['params']:,} | ×{r['ratio']:.2f} | "
                         f"{r['reduction_pct']:.1f} % | {r['flops_G']:.1f} | {r['seconds']:.1f} | ×{r['thesis_ratio']} |")
        lines += ["", "Thesis ratios are quoted from its Tables 5.1 (ρ 0) and 5.2 (ρ 0.5; 0.4 at DF 0.9).", ""]
    if "dice" in res:
        d = res["dice"]
        lines += [f"## Reference Hippocampus model, {len(d['cases'])} held-out test cases, no fine-tuning", "",
                  "| model | params | mean Dice | anterior | posterior |", "|---|---|---|---|---|"]
        for name, v in d["variants"].items():
            lines.append(f"| {name} | {v['params']:,} | {v['dice_mean']:.4f} | {v['dice_anterior']:.4f} | {v['dice_posterior']:.4f} |")
        lines += ["", f"Cases: {', '.join(d['cases'])}. Seed of the random criterion: {d['seed']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["size", "dice", "all"], default="all")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite compression.md from compression.json")
    args = ap.parse_args()
    if args.markdown_only:
        (OUT / "compression.md").write_text(markdown(json.loads((OUT / "compression.json").read_text())))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "compression.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
               threads=torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="medslim-bench-"))
    try:
        if args.part in ("size", "all"):
            res["size"] = part_size(work / "ts")
        if args.part in ("dice", "all"):
            (work / "dice").mkdir()
            res["dice"] = part_dice(work / "dice", args.cases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path.write_text(json.dumps(res, indent=1))
    (OUT / "compression.md").write_text(markdown(res))
    print(f"wrote {path} and compression.md")


if __name__ == "__main__":
    main()
