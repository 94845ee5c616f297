"""NORTON decomposition only (paper Table VI style): accuracy without fine-tuning, NMSE and
parameter reduction vs the per-filter CP rank, on a small CNN trained for seconds on
scikit-learn's ``digits`` (8×8, offline), one thread, several seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bench_norton.py [--seeds 0 1 2]

Writes ``benchmarks/results/norton_cp/results.json`` and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from medslim.decompose import decompose_network_cp

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "norton_cp"
RANKS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# Table VI of Pham et al. 2024 (VGG-16-BN / CIFAR-10): rank → (params CR %, NMSE, acc. without FT %)
PAPER = {1: (87.06, 0.6265, 10.00), 2: (75.98, 0.4114, 10.00), 3: (64.91, 0.2760, 68.37),
         4: (53.84, 0.1837, 88.30), 5: (42.76, 0.1173, 92.44), 6: (31.69, 0.0698, 93.45),
         7: (20.61, 0.0372, 93.90), 8: (9.54, 0.0137, 94.03)}


def small_cnn() -> nn.Sequential:
    """[B, 1, 8, 8] → 10 logits; the first conv (stem, C_in = 1) stays dense by the param guard."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def data(seed: int) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def train(seed: int, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int = 15) -> nn.Module:
    torch.manual_seed(seed)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean()) * 100


def params(net: nn.Module, convs_only: bool = True) -> int:
    mods = [m for m in net.modules() if not list(m.children()) and (not convs_only or not isinstance(m, nn.Linear))]
    return sum(p.numel() for m in mods for p in m.parameters(recurse=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        xtr, ytr, xte, yte = data(seed)
        net = train(seed, xtr, ytr)
        base = accuracy(net, xte, yte)
        for rank in RANKS:
            cp, rec = decompose_network_cp(net, rank, guard=None)
            replaced = [r for r in rec.layers.values() if r.replaced]
            nmse = statistics.fmean(r.discarded_energy["nmse"] for r in replaced) if replaced else 0.0
            rows.append({"seed": seed, "rank": rank, "acc_original": base, "acc_cp": accuracy(cp, xte, yte),
                         "nmse": nmse, "conv_params_cr": 100 * (1 - params(cp) / params(net)),
                         "layers": {n: r.replaced for n, r in rec.layers.items()}})
            print(rows[-1]["seed"], rank, f"{rows[-1]['acc_cp']:.2f}", f"{nmse:.4f}", f"{rows[-1]['conv_params_cr']:.1f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"rows": rows, "paper_table_vi": PAPER}, indent=1))
    lines = ["# NORTON per-filter CP, decomposition only (no fine-tune)", "",
             f"Small CNN on scikit-learn digits (1400 train / 397 test), 15 epochs, seeds {args.seeds}, "
             "1 thread. All three 3×3 convs are CP-decomposed (`guard=None`, the stem included); rank 9 = prod(k) "
             "is the exact construction. CR counts conv parameters only. Mean ± std over seeds.", "",
             "| rank | conv params CR % | NMSE | acc. without FT % (original) | paper: params CR / NMSE / acc. |",
             "|---:|---:|---:|---:|---|"]
    for rank in RANKS:
        r = [x for x in rows if x["rank"] == rank]
        acc = [x["acc_cp"] for x in r]
        p = PAPER.get(rank)
        lines.append(f"| {rank} | {statistics.fmean(x['conv_params_cr'] for x in r):.1f} | "
                     f"{statistics.fmean(x['nmse'] for x in r):.4f} | {statistics.fmean(acc):.2f} ± "
                     f"{statistics.pstdev(acc):.2f} ({statistics.fmean(x['acc_original'] for x in r):.2f}) | "
                     f"{'%.2f / %.4f / %.2f' % p if p else '—'} |")
    lines += ["", "Why the numbers differ from the paper's Table VI (VGG-16-BN, CIFAR-10, 13 convs, C_in 64–512): "
              "a block costs `R·(C_in + Σk)` per filter against `C_in·prod(k)`, so with VGG's wide inputs CR ≈ 1 − R/9, "
              "while this CNN's C_in of 1/16/32 makes rank ≥ 7 *larger* than dense (negative CR); its filters, trained "
              "15 epochs on 8×8 digits, are apparently closer to low rank (lower NMSE; not checked further); and errors compound over 3 layers instead "
              "of 13, so accuracy without fine-tuning holds up at lower ranks (the paper: 10 % at ranks 1–2). "
              "No fine-tuning here, so the paper's 'with FT' column has no counterpart."]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
