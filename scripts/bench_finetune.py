"""Fine-tuning benchmark with its control, on the 40 held-out Hippocampus test cases.

Models, all from the embedded reference nnU-Net, all scored with ``medslim evaluate`` (Dice,
NSD at 1 mm and 3 mm):
  1. the original;
  2. the original + the fine-tune (``nnUNetTrainerMedslimControl``): the control;
  3. DF 0.3 / ρ 0.5 / HVS compressed, before fine-tuning (``checkpoint_compressed.pth``);
  4. the same compressed model + the identical fine-tune (``nnUNetTrainerMedslim``).
The fine-tune is the thesis schedule (Adam, lr 1e-4, 200 updates, deep supervision on) from
``configs/finetune/hippocampus_cpu_benchmark.json`` (seed 12345), run with stock
``nnUNetv2_train -pretrained_weights`` on CPU. About 15 min on 2 idle cores.

Writes ``benchmarks/results/finetune.json`` and ``finetune.md``.
Usage: python scripts/bench_finetune.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
CONFIG = REPO / "configs" / "finetune" / "hippocampus_cpu_benchmark.json"
OUT = REPO / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="medslim-ft-"))).resolve()

    from medslim.api import DEFAULT_MODEL
    from medslim.finetune.hippocampus import DATASET, PLANS, prepare_hippocampus

    env = prepare_hippocampus(HIPPO, REPO / "configs" / "hippocampus_split.json", work)
    env.update(MEDSLIM_CONFIG=str(CONFIG), nnUNet_n_proc_DA="2")
    import os
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    from medslim.evaluate import evaluate_command
    from medslim.predict import predict_folder

    ckpt = DEFAULT_MODEL / "fold_0" / "checkpoint_final.pth"
    exe = Path(sys.executable).parent / "nnUNetv2_train"
    folders, seconds = {}, {}
    for trainer in ("nnUNetTrainerMedslimControl", "nnUNetTrainerMedslim"):
        t = time.perf_counter()
        subprocess.run([str(exe), "4", "3d_fullres", "0", "-p", PLANS, "-tr", trainer, "-pretrained_weights", str(ckpt),
                        "-device", "cpu"], env=env, check=True, stdout=subprocess.DEVNULL)
        seconds[trainer] = time.perf_counter() - t
        folders[trainer] = work / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__3d_fullres"

    raw = work / "nnUNet_raw" / DATASET
    variants = {
        "original": (DEFAULT_MODEL, "checkpoint_final.pth"),
        "original + fine-tune (control)": (folders["nnUNetTrainerMedslimControl"], "checkpoint_final.pth"),
        "DF 0.3 ρ 0.5 HVS, before fine-tune": (folders["nnUNetTrainerMedslim"], "checkpoint_compressed.pth"),
        "DF 0.3 ρ 0.5 HVS + fine-tune": (folders["nnUNetTrainerMedslim"], "checkpoint_final.pth"),
    }
    results = {}
    for i, (name, (folder, chk)) in enumerate(variants.items()):
        pred = predict_folder(folder, raw / "imagesTsLabeled", work / f"pred{i}", device=torch.device("cpu"),
                              checkpoint_name=chk)
        row = {"folder": str(folder), "checkpoint": chk}
        for tol in (1.0, 3.0):
            summary = evaluate_command(pred=pred, ref=raw / "labelsTsLabeled", tolerance=tol).summary
            row[f"tolerance_{tol:g}mm"] = summary
        params = json.loads((folder / "medslim_config.json").read_text())["compression_report"] if (folder / "medslim_config.json").is_file() else None
        row["compression_report"] = params
        results[name] = row
        print(name, json.dumps(row["tolerance_1mm"]["overall"]))
    res = {"seed": json.loads(CONFIG.read_text())["seed"], "config": json.loads(CONFIG.read_text()),
           "train_seconds": seconds, "cases": json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"],
           "variants": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "finetune.json").write_text(json.dumps(res, indent=1, default=str))
    (OUT / "finetune.md").write_text(markdown(res))
    print((OUT / "finetune.md").read_text())
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict) -> str:
    lines = ["# Fine-tuning benchmark (Hippocampus, 40 held-out test cases)", "",
             f"Schedule: {res['config']}; seed {res['seed']}; CPU training time (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in res["train_seconds"].items()), "",
             "| model | mean Dice | NSD @1 mm | NSD @3 mm |", "|---|---|---|---|"]
    for name, row in res["variants"].items():
        o1, o3 = row["tolerance_1mm"]["overall"], row["tolerance_3mm"]["overall"]
        lines.append(f"| {name} | {o1['dice']['mean']:.4f} | {o1['nsd']['mean']:.4f} | {o3['nsd']['mean']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
