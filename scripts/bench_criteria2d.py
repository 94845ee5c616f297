"""Compare every 2D pruning method on the MedMNIST base classifiers, paired by seed, before and
after the identical fine-tune (issue: the seed methods on 2D classifiers).

Bases: ``scripts/train_medmnist_bases.py`` (``.work/bases/<set>_<arch>.pt``, MedMNIST v2's
recipe). Criteria (``prune_classifier``, layer scope, ρ of every candidate layer): HVS, NISP,
L1, random, NN-Relief and Taylor (scored on ``--calibration-images`` training images drawn with
the seed) and NORTON; then the identical fine-tune (AdamW lr 1e-4, batch 32,
``--finetune-epochs``). Methods that compress while fine-tuning (SeReNe, LOBSTER, DPRP; their
own compression) get the same fine-tune budget; SeReNe and LOBSTER run at every λ of
``--reg-lambdas`` (the trainers' 1e-3 shrinks a channel only to ~0.95 of its norm in a 3-epoch
fine-tune) and the summary marks the λ chosen on validation accuracy (``--val-drop``). Control: the unpruned base +
the same fine-tune, per seed. The seed varies the fine-tune's data order, the calibration draw
and the random criterion. Test split only reports; SeReNe/LOBSTER's thresholds read the
validation split. CPU, one heavy job at a time::

    nice -n 10 .venv/bin/python scripts/bench_criteria2d.py --sets breastmnist --seeds 0 1 2

Writes ``benchmarks/results/criteria2d/{results.json,cells.csv,summary.md}``; ``results.json``
is saved after every cell and a rerun skips the cells it holds.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
CRITERIA = ("hvs", "nisp", "l1", "random", "relief", "taylor", "norton")
WHILE_TRAINING = ("serene", "lobster", "dprp")
REGULARIZED = ("serene", "lobster")  # run at every --reg-lambdas; λ chosen on validation in the summary


def run(args: argparse.Namespace) -> dict:
    from medslim.classify import build_classifier, evaluate, fit, load_medmnist
    from medslim.classify.prune2d import draw_calibration, finetune_config, while_training
    from medslim.prune.classifier import prune_classifier

    path = args.out / "results.json"
    res = json.loads(path.read_text()) if path.is_file() else {"cells": []}
    res["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    done = {(c["dataset"], c["method"], c["ratio"], c["seed"], c.get("reg_lambda")) for c in res["cells"]}
    for name in args.sets:
        base_path = args.bases / f"{name}_{args.arch}.pt"
        if not base_path.is_file():
            print(f"{name}: no base at {base_path} (run scripts/train_medmnist_bases.py); skipped", flush=True)
            continue
        base = build_classifier(str(base_path)).eval()
        split = {s: load_medmnist(DATA / f"{name}.npz", s) for s in ("train", "val", "test")}
        if args.max_train:  # quick runs only: the fine-tune (and calibration) on a seeded subset
            split["train"] = split["train"].subset(args.max_train)
        shape = (1, *split["test"].images.shape[1:])
        for seed in args.seeds:
            cfg = finetune_config(args.finetune_epochs, seed)
            calib = draw_calibration(split["train"], args.calibration_images, seed)
            todo = [("control", 0.0, None)] + [(m, r, None) for m in args.methods if m in CRITERIA for r in args.ratios] \
                + [(m, None, lam) for m in args.methods if m in REGULARIZED for lam in args.reg_lambdas] \
                + [(m, None, None) for m in args.methods if m in WHILE_TRAINING and m not in REGULARIZED]
            for method, ratio, lam in todo:
                if (name, method, ratio, seed, lam) in done:
                    continue
                t = time.perf_counter()
                cell = {"dataset": name, "method": method, "ratio": ratio, "seed": seed, "reg_lambda": lam}
                if method == "control":
                    net = copy.deepcopy(base)
                    fit(net, split["train"], cfg)
                    cell.update(params=[sum(p.numel() for p in base.parameters())] * 2, accuracy_pruned=None)
                elif method in CRITERIA:
                    net, report = prune_classifier(base, ratio, method, shape, "layer", seed,
                                                   calibration=calib.images, calibration_target=calib.labels)
                    cell.update(params=list(report.params), flops=list(report.flops),
                                accuracy_pruned=evaluate(net, split["test"])["accuracy"])
                    fit(net, split["train"], cfg)
                else:
                    net, report, extra, _ = while_training(method, base, split["train"], split["val"], cfg, shape,
                                                           calib.images, lam, args.reg_tolerance,
                                                           args.dprp_epsilon)
                    cell.update(params=list(report.params), flops=list(report.flops), accuracy_pruned=None,
                                achieved_ratio=report.ratio,
                                sparsity=extra.get("sparsity"))  # LOBSTER: zeros, not removed
                cell.update(accuracy=evaluate(net, split["test"])["accuracy"],
                            accuracy_val=evaluate(net, split["val"])["accuracy"], seconds=time.perf_counter() - t)
                res["cells"].append(cell)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, indent=1))
                tmp.replace(path)
                print(f"{name} s{seed} {method} ρ={ratio} λ={lam}: {cell['accuracy']:.4f} ({cell['seconds']:.0f} s)",
                      flush=True)
    return res


def compression(cells: pd.DataFrame) -> pd.Series:
    """Per cell: parameters removed, or for LOBSTER (dense) the fraction of weights zero."""
    zeros = cells.get("sparsity", pd.Series(np.nan, index=cells.index))
    return cells.param_reduction.where(cells.method != "lobster", zeros)


def chosen_lambdas(cells: pd.DataFrame, val_drop: float) -> dict[tuple[str, str], float | None]:
    """``(dataset, method) -> λ`` for SeReNe/LOBSTER: the most mean compression among the λ whose
    mean validation accuracy is at most ``val_drop`` pp below the control's; ``None`` if none is."""
    out = {}
    for (name, method), g in cells[cells.method.isin(REGULARIZED)].groupby(["dataset", "method"]):
        ctrl = cells[(cells.dataset == name) & (cells.method == "control")].accuracy_val.mean()
        by = g.groupby("reg_lambda").agg(val=("accuracy_val", "mean"), comp=("compression", "mean"))
        ok = by[by.val >= ctrl - val_drop / 100]
        out[(name, method)] = float(ok.comp.idxmax()) if len(ok) else None
    return out


def summarise(res: dict) -> tuple[pd.DataFrame, str]:
    """The per-cell table and the summary text, computed from the cells."""
    cells = pd.DataFrame(res["cells"])
    val_drop = float(res.get("settings", {}).get("val_drop", 1.0))
    control = cells[cells.method == "control"].set_index(["dataset", "seed"]).accuracy
    cells["delta_control"] = [a - control.get((d, s), np.nan) for a, d, s in zip(cells.accuracy, cells.dataset, cells.seed)]
    cells["param_reduction"] = [1 - p[1] / p[0] for p in cells.params]
    cells["compression"] = compression(cells)
    chosen = chosen_lambdas(cells, val_drop)
    lines = ["# 2D pruning methods, paired by seed, after the identical fine-tune", "",
             "Generated by `scripts/bench_criteria2d.py` from `results.json`. Test accuracy in %; ± = sample std "
             "over seeds; Δ = minus the control (unpruned base + the same fine-tune) of the same seed. "
             "\"vs HVS\": the paired difference to HVS at the same ratio, mean ± standard error; it exceeds the "
             "seed spread when a two-sided paired t-test over the seeds gives p < 0.05 (|mean| > t₀.₉₇₅,ₙ₋₁ · s.e.). "
             "Compression: parameters removed; for LOBSTER (dense, no faster) the "
             f"weights zero. SeReNe/LOBSTER run at every λ; the λ marked chosen has the most compression whose mean "
             f"validation accuracy is at most {val_drop:g} pp below the control's (test only reports).", ""]
    for name, d in cells.groupby("dataset"):
        ctrl = d[d.method == "control"]
        lines += [f"## {name}", "", f"Control {100 * ctrl.accuracy.mean():.1f} ± {100 * ctrl.accuracy.std():.1f} % test, "
                  f"{100 * ctrl.accuracy_val.mean():.1f} % validation ({len(ctrl)} seeds).", "",
                  "| method | ρ / λ | compression % | acc pruned % | acc + FT % | Δ vs control pp | vs HVS pp | n |",
                  "|---|---|---|---|---|---|---|---|"]
        hvs = d[d.method == "hvs"].set_index(["ratio", "seed"]).accuracy
        groups = d[d.method != "control"].groupby(["method", "ratio", "reg_lambda"], dropna=False, sort=False)
        for (method, ratio, lam), g in groups:
            pruned = g.accuracy_pruned.dropna()
            paired = [a - hvs.get((ratio, s), np.nan) for a, s in zip(g.accuracy, g.seed)]
            paired = [p for p in paired if not np.isnan(p)]
            vs = "—"
            if method != "hvs" and len(paired) > 1:
                mean, se = np.mean(paired), np.std(paired, ddof=1) / np.sqrt(len(paired))
                exceeds = abs(mean) > stats.t.ppf(0.975, len(paired) - 1) * se
                vs = f"{100 * mean:+.1f} ± {100 * se:.1f}" + (" (exceeds)" if exceeds else "")
            setting = f"ρ {ratio:g}" if not pd.isna(ratio) else (f"λ {lam:g}" if not pd.isna(lam) else "—")
            if not pd.isna(lam) and chosen.get((name, method)) == lam:
                setting += " (chosen)"
            lines.append(f"| {method} | {setting} | {100 * g.compression.mean():.1f} | "
                         + (f"{100 * pruned.mean():.1f} ± {100 * pruned.std():.1f}" if len(pruned) else "—")
                         + f" | {100 * g.accuracy.mean():.1f} ± {100 * g.accuracy.std():.1f} | "
                         f"{100 * g.delta_control.mean():+.1f} ± {100 * g.delta_control.std():.1f} | {vs} | {len(g)} |")
        lines.append("")
        for method in REGULARIZED:
            if chosen.get((name, method), 0) is None:
                lines.append(f"- {method}: no λ kept validation accuracy within {val_drop:g} pp of the control.")
        lines.append("")
    return cells, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["breastmnist", "retinamnist", "pneumoniamnist"])
    ap.add_argument("--arch", default="resnet18_28")
    ap.add_argument("--bases", type=Path, default=REPO / ".work" / "bases")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(CRITERIA + WHILE_TRAINING),
                    choices=CRITERIA + WHILE_TRAINING)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--reg-lambdas", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2],
                    help="SeReNe/LOBSTER λ grid (1e-3: the trainers' default); the summary chooses on validation")
    ap.add_argument("--val-drop", type=float, default=1.0,
                    help="pp of validation accuracy below the control a chosen λ may lose")
    ap.add_argument("--reg-tolerance", type=float, default=0.05)
    ap.add_argument("--dprp-epsilon", type=float, default=0.01)
    ap.add_argument("--max-train", type=int, default=None, help="fine-tune on a subset (quick checks only)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "criteria2d")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    res = run(args)
    if not res["cells"]:
        print("no cells: train the bases first", file=sys.stderr)
        return 1
    cells, text = summarise(res)
    cells.drop(columns=["params", "flops"], errors="ignore").to_csv(args.out / "cells.csv", index=False)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
