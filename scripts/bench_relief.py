"""Reproduce NN-Relief's LeNet-300-100 numbers (Dekhovich et al. 2024, Table 7, §5.1 and Table 1)
at small scale: scikit-learn's ``digits`` (8×8, 64 inputs, offline) instead of MNIST.

Per seed: a LeNet-``64``-300-100 (He init) is trained (Adam, lr 1e-3 then 1e-4, weight decay
5e-4: the paper's Table 8 schedule, shortened), pruned by the paper's unstructured rule with
α_fc = 0.95 on 1,000 random training samples (``medslim.prune.relief_masks``), and retrained
from its initial random parameters with the masks held (the paper's retraining), for
``--iterations`` prune → retrain rounds. One-pass numbers (iteration 1) compare with Table 7 and
§5.1's 15.5 %; later iterations with Table 1. Beside it, global magnitude pruning to the same
kept fraction (Table 7's "magnitude-based (unstructured)").

Writes benchmarks/results/relief_lenet/{results.json,summary.md}. CPU, one thread, ~2.5 min::

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 .venv/bin/python scripts/bench_relief.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils import prune as torch_prune

from medslim.prune.relief_masks import apply_masks, drop_dead_units, kept_fraction, relief_masks

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "relief_lenet"
CHAIN = ["0", "2", "4"]
PAPER = {  # quoted from the paper text (seeds/dekhovich_2024_neural_network_relief.txt)
    "table7_relief": "380 → 131 → 96 → 10",
    "table7_magnitude": "530 → 136 → 97 → 10",
    "one_pass_retained_percent": 15.5,  # §5.1: "15.5% of all parameters are retained" after one iteration, α = 0.95
    "table1_error_percent": "1.98 ± 0.07",
    "table1_retained_percent": "1.51 ± 0.07",  # best of 15 iterations: iteration 11 (Table 10)
}


def lenet(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam lr 1e-3 for the first 2/3 of the epochs, then 1e-4; weight decay 5e-4; batch 64."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    net.train()
    for epoch in range(epochs):
        if epoch == (2 * epochs) // 3:
            for g in opt.param_groups:
                g["lr"] = 1e-4
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def active_neurons(net: nn.Sequential) -> list[int]:
    """Units with at least one non-zero outgoing weight, per layer (inputs, hidden); all outputs."""
    linears = [net[int(n)] for n in CHAIN]
    return [int((m.weight != 0).any(0).sum()) for m in linears] + [linears[-1].out_features]


def layer_density(net: nn.Sequential) -> list[float]:
    return [float((net[int(n)].weight != 0).float().mean()) for n in CHAIN]


def rewind(net: nn.Module, init: dict[str, torch.Tensor]) -> None:
    """Reset the (masked) parameters to their initial values; masks stay."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in init.items():
            key = name.rsplit(".", 1)
            target = params.get(f"{key[0]}.{key[1]}_orig", params.get(name))
            target.copy_(value)


def magnitude_baseline(trained: nn.Module, fraction: float) -> dict:
    """Global unstructured magnitude pruning of the trained net's weights to ``fraction`` kept."""
    net = copy.deepcopy(trained)
    params = [(net[int(n)], "weight") for n in CHAIN]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=1.0 - fraction)
    return {"active_neurons": active_neurons(net), "layer_density": layer_density(net)}


def run_seed(seed: int, data, iterations: int, epochs: int) -> dict:
    xtr, ytr, xte, yte = data
    net = lenet(seed)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    train(net, xtr, ytr, epochs, seed)
    out = {"seed": seed, "dense_accuracy": accuracy(net, xte, yte), "iterations": []}
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:1000]]
    for it in range(1, iterations + 1):
        trained = copy.deepcopy(net)
        apply_masks(net, drop_dead_units(CHAIN, relief_masks(net, calib, alpha_fc=0.95)))
        kept, total = kept_fraction(net)
        weights_kept = sum(int((net[int(n)].weight != 0).sum()) for n in CHAIN)
        weights = sum(net[int(n)].weight.numel() for n in CHAIN)
        row = {"iteration": it, "retained": kept / total, "weights_retained": weights_kept / weights,
               "active_neurons": active_neurons(net), "layer_density": layer_density(net),
               "accuracy_pruned": accuracy(net, xte, yte)}
        if it == 1:
            row["magnitude"] = magnitude_baseline(trained, weights_kept / weights)
        rewind(net, init)
        train(net, xtr, ytr, epochs, seed + 1000 * it)
        row["accuracy_retrained"] = accuracy(net, xte, yte)
        out["iterations"].append(row)
        print(f"seed {seed} it {it}: retained {100 * row['retained']:.2f} %, neurons {row['active_neurons']}, "
              f"acc {row['accuracy_pruned']:.3f} → {row['accuracy_retrained']:.3f}", flush=True)
    return out


def ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    vals = [scale * v for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def summary(results: dict) -> str:
    runs, cfg = results["runs"], results["config"]
    n_it = len(runs[0]["iterations"])
    first = [r["iterations"][0] for r in runs]
    neurons = lambda rows, key=None: " → ".join(  # noqa: E731
        ms([(row[key] if key else row)["active_neurons"][i] for row in rows], digits=0) for i in range(4))
    best = [max(r["iterations"], key=lambda row: (row["accuracy_retrained"] >= r["dense_accuracy"] - 0.01,
                                                  -row["retained"])) for r in runs]
    last = [r["iterations"][-1] for r in runs]
    lines = [
        "# NN-Relief on LeNet-300-100: digits (8×8) instead of MNIST",
        "",
        f"Generated by `scripts/bench_relief.py` from `results.json`. Seeds {[r['seed'] for r in runs]}; "
        f"{results['config']['train_size']} training / {results['config']['test_size']} test images of "
        f"scikit-learn's `digits`, 64 inputs (the paper: MNIST, 784 inputs, 60,000 training images). "
        f"Adam lr 1e-3 → 1e-4 at 2/3, weight decay 5e-4, batch 64, {results['config']['epochs']} epochs per "
        f"(re)training (the paper: 60). α_fc = 0.95 on 1,000 random training images (as the paper); "
        f"retraining restarts from the initial random parameters with the masks held (as the paper). "
        f"Retained = non-zero weights and biases / all; mean ± std over seeds.",
        "",
        "## One pass (paper Table 7 and §5.1)",
        "",
        "| | active neurons (in → h1 → h2 → out) | retained % |",
        "|---|---|---|",
        "| original | 64 → 300 → 100 → 10 | 100 |",
        f"| NN-Relief α 0.95 (ours, digits) | {neurons(first)} | {ms([r['retained'] for r in first], 100)} |",
        f"| magnitude, global unstructured, same kept weights (ours, digits) | {neurons(first, 'magnitude')} | "
        f"{ms([r['weights_retained'] for r in first], 100)} (weights) |",
        f"| paper, NN-Relief (MNIST) | {PAPER['table7_relief']} (of 784 → 300 → 100 → 10) | "
        f"{PAPER['one_pass_retained_percent']} |",
        f"| paper, magnitude unstructured (MNIST) | {PAPER['table7_magnitude']} | {PAPER['one_pass_retained_percent']} |",
        "",
        "Per-layer kept weights after one pass (ours): "
        + ", ".join(f"{name} {ms([r['layer_density'][i] for r in first], 100)} %"
                    for i, name in enumerate(("64→300", "300→100", "100→10")))
        + f". Test accuracy: dense {ms([r['dense_accuracy'] for r in runs], 100)} %, pruned before retraining "
        f"{ms([r['accuracy_pruned'] for r in first], 100)} %, after retraining "
        f"{ms([r['accuracy_retrained'] for r in first], 100)} %.",
        "",
        f"## Iterations (paper Table 1: {PAPER['table1_retained_percent']} % retained at "
        f"{PAPER['table1_error_percent']} % error, best of 15 iterations)",
        "",
        "| iteration | retained % | active neurons | test accuracy after retraining % |",
        "|---|---|---|---|",
    ]
    for i in range(n_it):
        rows = [r["iterations"][i] for r in runs]
        lines.append(f"| {i + 1} | {ms([r['retained'] for r in rows], 100, 2)} | {neurons(rows)} | "
                     f"{ms([r['accuracy_retrained'] for r in rows], 100)} |")
    lines += [
        "",
        f"Sparsest iteration within 1 pp of each seed's dense accuracy: retained "
        f"{ms([r['retained'] for r in best], 100, 2)} %, accuracy {ms([r['accuracy_retrained'] for r in best], 100)} %"
        f" (iterations {[r['iteration'] for r in best]}). After {n_it} iterations: retained "
        f"{ms([r['retained'] for r in last], 100, 2)} %, accuracy {ms([r['accuracy_retrained'] for r in last], 100)} %.",
        "",
        "## Why the numbers differ from the paper",
        "",
        f"- One pass keeps {ms([r['retained'] for r in first], 100)} % of the parameters against the paper's "
        f"{PAPER['one_pass_retained_percent']} %. α bounds each unit's score mass, not its number of connections: "
        "how many connections hold 95 % of a unit's input mass depends on how concentrated E|w x| is over its "
        "fan-in. Our hypothesis (not measured): over 64 mostly informative digit pixels and after a short training, "
        "the mass is spread more evenly than over MNIST's 784 pixels after 60 epochs, and fewer ReLUs are dead "
        f"(h1 keeps {ms([r['active_neurons'][1] for r in first], digits=0)} of 300 units, the paper 131).",
        f"- Input layer: digits has 64 inputs of which {ms([r['active_neurons'][0] for r in first], digits=0)} stay "
        f"active after one pass, against 380 of MNIST's 784; MNIST's many always-zero border pixels carry no signal "
        f"(E|w x| = 0), so the paper's first layer loses far more inputs. The first layer holds "
        f"{64 * 300 / (64 * 300 + 300 * 100 + 100 * 10):.0%} of the weights here against "
        f"{784 * 300 / (784 * 300 + 300 * 100 + 100 * 10):.0%} on MNIST, so the total retained fraction weighs the "
        "layers differently.",
        f"- Data and training: {cfg['train_size']:,} training images instead of 60,000 and "
        f"{cfg['epochs']} epochs instead of 60, so the trained weights and activations (and hence the score mass per "
        f"connection) differ; the {cfg['calibration']:,} calibration images are "
        f"{cfg['calibration'] / cfg['train_size']:.0%} of the training set instead of {1000 / 60000:.1%}.",
        "- The paper's kept fraction counts only what its masks hold; ours counts weights and biases, after removing "
        "units with no surviving outgoing connection (the authors' code does the same backward pass).",
        f"- Errors are not comparable: digits' test set has {cfg['test_size']} images (one image = "
        f"{100 / cfg['test_size']:.2f} pp).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--summary-only", action="store_true", help="rewrite summary.md from results.json")
    args = parser.parse_args()
    if args.summary_only:
        (OUT / "summary.md").write_text(summary(json.loads((OUT / "results.json").read_text())))
        return
    torch.set_num_threads(1)
    digits = load_digits()
    xtr, xte, ytr, yte = train_test_split(digits.data / 16.0, digits.target, test_size=0.2, random_state=0,
                                          stratify=digits.target)
    data = (torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte))
    results = {"config": {"seeds": args.seeds, "iterations": args.iterations, "epochs": args.epochs, "alpha_fc": 0.95,
                          "calibration": 1000, "train_size": len(xtr), "test_size": len(xte)},
               "paper": PAPER, "runs": [run_seed(s, data, args.iterations, args.epochs) for s in args.seeds]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    (OUT / "summary.md").write_text(summary(results))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
