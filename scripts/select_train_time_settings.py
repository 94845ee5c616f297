"""Choose λ for SeReNe and LOBSTER and (λ_comp, ε) for DPRP on the validation split, on the
digits proxy of ``scripts/bench_train_time_methods.py`` (same splits, ResNets, budgets), then
report the test accuracy and compression of the chosen settings beside every setting tried.

Why: with the trainers' λ 1e-3 a 20-epoch fine-tune shrinks an insensitive channel only to
``(1 − λ)^steps ≈ 0.73`` of its norm, so SeReNe's threshold step can zero almost nothing within
the validation-loss tolerance; DPRP's ε 0.01 cut needs a 100× gap between neighbouring
singular values, which 30 epochs do not open. A larger λ (or λ_comp, ε) trades that budget.

Rule (validation only): per method, the setting with the largest mean compression over seeds
whose mean validation accuracy is at most ``--val-drop`` pp below the unpruned baseline's
(ResNet-32 for SeReNe/LOBSTER, ResNet-20 for DPRP). Compression: parameters removed (SeReNe,
DPRP), weights zero (LOBSTER: unstructured, the dense network is no faster). CPU, one thread::

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 .venv/bin/python scripts/select_train_time_settings.py

Writes ``benchmarks/results/train_time_methods/selection.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_time_methods import (INPUT, OUT, CifarResNet, base_config, baselines,  # noqa: E402
                                      budget_parser, calibration_images, config_of, reproduce, save,
                                      sparsify_config, sparsity, splits)

from medslim.classify import evaluate  # noqa: E402
from medslim.classify.dprp import dprp_classifier  # noqa: E402
from medslim.classify.sparsify import sparsify_classifier  # noqa: E402
from medslim.measure import count_parameters  # noqa: E402

GRID = {"serene": [1e-3, 3e-3, 1e-2, 3e-2], "lobster": [1e-3, 3e-3, 1e-2, 3e-2],
        "dprp": [(0.5, 0.01), (0.5, 0.1), (2.0, 0.1), (8.0, 0.1)]}
BASELINE = {"serene": "resnet32", "lobster": "resnet32", "dprp": "resnet20"}  # what each method starts from


def score(net: torch.nn.Module, data: dict, reference: int, unstructured: bool) -> dict:
    """Validation/test accuracy (%) and compression (%) of ``net`` against ``reference`` params."""
    left = count_parameters(net) - (sparsity(net)["zero_weights"] if unstructured else 0)
    return {"val": 100 * evaluate(net, data["val"])["accuracy"], "test": 100 * evaluate(net, data["test"])["accuracy"],
            "compression": 100 * (1 - left / reference), "params": count_parameters(net)}


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    data = splits(seed)
    bases, _ = baselines(data, args.epochs, seed)
    rows = [{"seed": seed, "method": f"resnet{depth}", "setting": "—",
             **score(net, data, count_parameters(net), False)} for depth, net in bases.items()]
    ft = sparsify_config(args.ft_epochs, seed)
    calibration = calibration_images(data)
    for kind in ("serene", "lobster"):
        for lam in GRID[kind]:
            result = sparsify_classifier(bases[32], kind, data["train"], data["val"], ft, INPUT,
                                         calibration=calibration if kind == "serene" else None,
                                         lam=lam, tolerance=args.tolerance)
            rows.append({"seed": seed, "method": kind, "setting": f"λ {lam:g}",
                         **score(result.model, data, count_parameters(bases[32]), kind == "lobster")})
            print(rows[-1], flush=True)
    for comp, eps in GRID["dprp"]:
        torch.manual_seed(seed)
        result = dprp_classifier(CifarResNet(20), data["train"], base_config(args.epochs, seed), comp=comp, eps=eps)
        rows.append({"seed": seed, "method": "dprp", "setting": f"λ_comp {comp:g}, ε {eps:g}",
                     **score(result.model, data, count_parameters(bases[20]), False)})
        print(rows[-1], flush=True)
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict]) -> list[dict]:
    """One row per (method, setting): mean and sd over seeds of val, test and compression."""
    keys = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
    out = []
    for method, setting in keys:
        group = [r for r in rows if (r["method"], r["setting"]) == (method, setting)]
        out.append({"method": method, "setting": setting, "n": len(group),
                    **{f: mean_sd([r[f] for r in group]) for f in ("val", "test", "compression")}})
    return out


def choose(summary: list[dict], val_drop: float) -> dict[str, dict | None]:
    """Per method, the setting with the largest mean compression whose mean validation accuracy
    is at most ``val_drop`` pp below its baseline's; ``None`` when no setting qualifies."""
    baseline = {r["method"]: r["val"][0] for r in summary if r["method"].startswith("resnet")}
    chosen = {}
    for method, base in BASELINE.items():
        ok = [r for r in summary if r["method"] == method and r["val"][0] >= baseline[base] - val_drop]
        chosen[method] = max(ok, key=lambda r: r["compression"][0]) if ok else None
    return chosen


def render(result: dict) -> str:
    cfg, summary, chosen = result["config"], result["table"], result["chosen"]
    fmt = lambda v: f"{v[0]:.2f} ± {v[1]:.2f}"  # noqa: E731
    lines = ["# LOBSTER, SeReNe and DPRP settings chosen on validation (digits proxy)", "",
             f"Generated by `scripts/select_train_time_settings.py` from `selection.json`. Seeds "
             f"{', '.join(map(str, cfg['seeds']))}; the splits, ResNets and budgets of `bench_train_time_methods.py` "
             f"(baselines and DPRP {cfg['epochs']} epochs, LOBSTER/SeReNe fine-tunes {cfg['ft_epochs']} epochs, "
             f"validation-loss tolerance {cfg['tolerance']:g}). Rule: the largest mean compression whose mean "
             f"validation accuracy is at most {cfg['val_drop']:g} pp below the baseline's; test only reports. "
             "Compression: parameters removed (SeReNe, DPRP) or weights zero (LOBSTER, dense). Mean ± sd.", "",
             "| method | setting | val acc. (%) | test acc. (%) | compression (%) | chosen |", "|---|---|---|---|---|---|"]
    for r in summary:
        mark = "**chosen**" if chosen.get(r["method"]) and chosen[r["method"]]["setting"] == r["setting"] else ""
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['val'])} | {fmt(r['test'])} | "
                     f"{fmt(r['compression'])} | {mark} |")
    lines.append("")
    base = {r["method"]: r for r in summary if r["method"].startswith("resnet")}
    for method, ref in BASELINE.items():
        c = chosen[method]
        if c is None:
            lines.append(f"- {method}: no setting kept validation accuracy within {cfg['val_drop']:g} pp.")
            continue
        lines.append(f"- {method}: chosen {c['setting']}; compression {c['compression'][0]:.1f} %, test accuracy "
                     f"{c['test'][0]:.2f} % against {base[ref]['test'][0]:.2f} % for the {ref} "
                     f"({c['test'][0] - base[ref]['test'][0]:+.2f} pp).")
    lines += ["", f"Reproduce: `{result['reproduce']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = budget_parser(__doc__)
    ap.add_argument("--val-drop", type=float, default=1.0, help="pp of validation accuracy a setting may lose")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for seed in args.seeds for r in run_seed(seed, args)]
    summary = table(rows)
    result = {"config": config_of(args),
              "grid": {k: [list(v) if isinstance(v, tuple) else v for v in g] for k, g in GRID.items()},
              "rows": rows, "table": summary, "chosen": choose(summary, args.val_drop),
              "reproduce": reproduce("select_train_time_settings.py", argv)}
    save(args.out, "selection.json", "selection.md", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
