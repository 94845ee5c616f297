"""The methods that compress while training, at their papers' smallest scale that fits offline:
LOBSTER and SeReNe (Tartaglione, HDR 2024, Table 2.1: ResNet-32 on CIFAR-10) and DPRP (Sharma
et al. 2025, Table 2: ResNet-20 on CIFAR-10). CIFAR-10 cannot be downloaded here, so the same
CIFAR ResNets (3 stages of BasicBlocks, 16/32/64 channels, 1×1-conv shortcuts) run on
scikit-learn's ``digits`` (8×8 grey, 10 classes): 1,000 training, 300 validation and 497 test
images per seed (a random split of the 1,797).

Per seed:
  1. ResNet-32 and ResNet-20 trained from PyTorch's default init (SGD, momentum 0.9, weight decay
     5e-4, lr 0.05 ×0.1 at 50 % and 75 %, batch 64, ``--epochs``; the epoch with the best
     validation accuracy is kept): the baselines.
  2. LOBSTER and SeReNe fine-tunes of the ResNet-32 (``medslim.classify.sparsify_classifier``,
     ``--ft-epochs``, lr 0.01, λ ``--lam``, validation-loss tolerance ``--tolerance``), as
     Table 2.1: pruned parameters (%), the simplified topology (float32 parameters left after
     physical removal; LOBSTER leaves a dense network, its all-zero output channels are counted
     but not removed), a compressed bitstream (zlib level 9 of the float32 weights; the paper
     uses MPEG-7 NNR, so only ratios compare), and CPU inference time (batch 1, one thread,
     median of ``--repeats`` passes over 64 test images, all models timed in this process),
     with test accuracy.
  3. DPRP of the ResNet-20 from its fresh init, factorised at epoch 0 as the paper trains
     (``medslim.classify.dprp_classifier``), the baseline's budget, with the paper's "Proposed 1"
     (λ_comp 0.5, ε 0.01) and "Proposed 2" (λ_comp 0.1, ε 0.1) settings: test accuracy and the
     parameter compression beside Table 2.

Writes ``benchmarks/results/train_time_methods/{results.json,summary.md}``. CPU, one thread::

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 10 .venv/bin/python scripts/bench_train_time_methods.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models.resnet import BasicBlock

from medslim.classify import TrainConfig, evaluate, fit
from medslim.classify.dprp import dprp_classifier
from medslim.classify.sparsify import sparsify_classifier
from medslim.measure import count_parameters

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "train_time_methods"
INPUT = (1, 1, 8, 8)
PAPER = {  # quoted from ../shared/seeds (Tartaglione Table 2.1; Sharma et al. Table 2)
    "tartaglione_table2_1_resnet32_cifar10": {
        "no pruning": {"pruned_percent": None, "topology_mb": 2.0, "bitstream_mb": 0.30, "rpi3b_ms": 580},
        "lobster": {"pruned_percent": 81.19, "topology_mb": 1.96, "bitstream_mb": 0.12, "rpi3b_ms": 545},
        "serene": {"pruned_percent": 52.80, "topology_mb": 1.0, "bitstream_mb": 0.09, "rpi3b_ms": 536}},
    "sharma_table2_resnet20_cifar10": {
        "baseline": {"top1": 90.98, "compression_percent": 0.0},
        "proposed1": {"top1": 90.99, "compression_percent": 30.66, "comp": 0.5, "eps": 0.01},
        "proposed2": {"top1": 92.16, "compression_percent": 5.79, "comp": 0.1, "eps": 0.1}},
}
DPRP_SETTINGS = {"proposed1": (0.5, 0.01), "proposed2": (0.1, 0.1)}


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): ``[B, C, H, W]`` → ``[B, classes]``; 1×1-conv shortcuts
    where the shape changes (option B), torchvision's ``BasicBlock``."""

    def __init__(self, depth: int, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], 16
        for out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                down = None
                if s != 1 or width != out:
                    down = nn.Sequential(nn.Conv2d(width, out, 1, stride=s, bias=False), nn.BatchNorm2d(out))
                blocks.append(BasicBlock(width, out, s, down))
                width = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def splits(seed: int) -> dict[str, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, *INPUT[1:]) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": perm[:1000], "val": perm[1000:1300], "test": perm[1300:]}
    return {k: TensorDataset(x[i], y[i]) for k, i in parts.items()}


def base_config(epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64,
                       milestones=(epochs // 2, 3 * epochs // 4), seed=seed)


def baselines(data: dict[str, TensorDataset], epochs: int, seed: int) -> tuple[dict[int, nn.Module], dict[int, dict]]:
    """The ResNet-32 and ResNet-20 baselines of one seed (eval mode) and their ``fit`` histories."""
    nets, histories = {}, {}
    for depth in (32, 20):
        torch.manual_seed(seed)
        nets[depth] = CifarResNet(depth)
        histories[depth] = fit(nets[depth], data["train"], base_config(epochs, seed), val_ds=data["val"])
        nets[depth].eval()
    return nets, histories


def sparsify_config(epochs: int, seed: int) -> TrainConfig:
    """The LOBSTER/SeReNe fine-tune of the ResNet-32."""
    return TrainConfig(epochs=epochs, lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=64,
                       milestones=(3 * epochs // 4,), seed=seed)


def calibration_images(data: dict[str, TensorDataset]) -> torch.Tensor:
    """``[256, 1, 8, 8]``: SeReNe's sensitivity batch, the first training images."""
    return torch.stack([data["train"][i][0] for i in range(256)])


def weights(net: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().float().numpy().ravel() for p in net.parameters()])


def sparsity(net: nn.Module) -> dict[str, float | int]:
    """Zero parameters among conv/Linear weights (what the methods prune), and output channels
    of convolutions whose weights are all zero (a simplify stage could remove them)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m in layers)
    zero = sum(int((m.weight == 0).sum()) for m in layers)
    dead = sum(int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in layers if isinstance(m, nn.Conv2d))
    return {"weights": total, "zero_weights": zero, "zero_channels": dead}


@torch.no_grad()
def latencies_ms(models: dict[str, nn.Module], images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` of the mean batch-1 forward time (ms), the models interleaved so
    that each repeat sees the same machine state."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()(images[:1])
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            for x in images:
                m(x[None])
            times[name].append(1000 * (time.perf_counter() - start) / len(images))
    return {k: statistics.median(v) for k, v in times.items()}


def row(net: nn.Module, data: dict[str, TensorDataset], reference_params: int) -> dict:
    w = weights(net)
    return {"params": count_parameters(net), "compression_percent": 100 * (1 - count_parameters(net) / reference_params),
            "topology_kb": 4 * count_parameters(net) / 1024,
            "bitstream_kb": len(zlib.compress(w.astype(np.float32).tobytes(), 9)) / 1024,
            "test_accuracy": 100 * evaluate(net, data["test"])["accuracy"], **sparsity(net)}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    data = splits(seed)
    out: dict = {"seed": seed}
    bases, histories = baselines(data, args.epochs, seed)
    for depth, net in bases.items():
        out[f"resnet{depth}"] = {**row(net, data, count_parameters(net)), "seconds": histories[depth]["seconds"],
                                 "best_epoch": histories[depth]["best_epoch"] + 1}
    ft = sparsify_config(args.ft_epochs, seed)
    calibration = calibration_images(data)
    sparse = {}
    p32 = count_parameters(bases[32])
    for kind in ("lobster", "serene"):
        result = sparsify_classifier(bases[32], kind, data["train"], data["val"], ft, INPUT,
                                     calibration=calibration if kind == "serene" else None,
                                     lam=args.lam, tolerance=args.tolerance)
        sparse[kind] = result.model.eval()
        r = row(result.model, data, p32)
        r["pruned_percent"] = 100 * (1 - (r["params"] - r["zero_weights"]) / p32)
        r["thresholds"] = result.report.get("thresholds")
        r["channels_zeroed"] = result.report.get("channels_zeroed")
        out[kind] = r
    out["resnet32"]["pruned_percent"] = 100 * out["resnet32"]["zero_weights"] / p32
    ms = latencies_ms({"resnet32": bases[32], **sparse}, data["test"].tensors[0][:64], args.repeats)
    for name, value in ms.items():
        out[name]["latency_ms"] = value
        out[name]["latency_ratio"] = ms["resnet32"] / value
    p20 = count_parameters(bases[20])
    for name, (comp, eps) in DPRP_SETTINGS.items():
        torch.manual_seed(seed)
        result = dprp_classifier(CifarResNet(20), data["train"], base_config(args.epochs, seed), comp=comp, eps=eps)
        r = row(result.model, data, p20)
        r["ranks"] = {n: [v["full_rank"], v["rank"]] for n, v in result.report["layers"].items()}
        out[f"dprp_{name}"] = r
    return out


def aggregate(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k != "seed"]
    fields = ("test_accuracy", "params", "compression_percent", "pruned_percent", "topology_kb", "bitstream_kb",
              "latency_ms", "latency_ratio", "zero_channels")
    agg = {}
    for k in keys:
        agg[k] = {}
        for f in fields:
            values = [r[k][f] for r in runs if r[k].get(f) is not None]
            if values:
                agg[k][f] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}
    return agg


def ms(s: dict | None, fmt: str = ".2f") -> str:
    if s is None:
        return "–"
    return f"{s['mean']:{fmt}}" + ("" if s["sd"] is None else f" ± {s['sd']:{fmt}}")


def summary(results: dict) -> str:
    agg, cfg, paper = results["aggregate"], results["config"], results["paper"]
    t = paper["tartaglione_table2_1_resnet32_cifar10"]
    seeds = ", ".join(str(r["seed"]) for r in results["runs"])
    lines = [
        "# LOBSTER, SeReNe and DPRP at their papers' smallest scale (digits proxy)", "",
        f"Generated by `scripts/bench_train_time_methods.py` from `results.json`. Seeds {seeds}; "
        f"CIFAR ResNets on scikit-learn `digits` (1,000 train / 300 validation / 497 test images per seed); "
        f"baselines {cfg['epochs']} epochs; LOBSTER/SeReNe fine-tunes {cfg['ft_epochs']} epochs, λ {cfg['lam']:g}, "
        f"validation-loss tolerance {cfg['tolerance']:g}. Mean ± sd over seeds.", "",
        "## Tartaglione Table 2.1 (ResNet-32; paper: CIFAR-10, MPEG-7 NNR bitstream, Raspberry Pi 3B)", "",
        "| model | test acc. (%) | pruned params (%) | params left | topology (KB) | all-zero conv channels | "
        "zlib bitstream (KB) | CPU ms / image | speed-up | paper: pruned % / topology MB / bitstream MB / RPi ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label, p in (("resnet32", "no pruning", t["no pruning"]), ("lobster", "LOBSTER", t["lobster"]),
                          ("serene", "SeReNe", t["serene"])):
        a = agg[key]
        pp = "–" if p["pruned_percent"] is None else f"{p['pruned_percent']:.2f}"
        lines.append(f"| {label} | {ms(a['test_accuracy'])} | {ms(a.get('pruned_percent'))} | {ms(a['params'], ',.0f')} | "
                     f"{ms(a['topology_kb'], '.1f')} | {ms(a['zero_channels'], '.1f')} | {ms(a['bitstream_kb'], '.1f')} | "
                     f"{ms(a['latency_ms'], '.3f')} | {ms(a['latency_ratio'])}× | "
                     f"{pp} / {p['topology_mb']} / {p['bitstream_mb']} / {p['rpi3b_ms']} |")
    s = paper["sharma_table2_resnet20_cifar10"]
    lines += ["", "## Sharma et al. Table 2 (ResNet-20, DPRP from the epoch-0 factorisation; paper: CIFAR-10)", "",
              "| model | λ_comp / ε | test acc. (%) | params | compression (%) | paper: top-1 (%) / compression (%) |",
              "|---|---|---|---|---|---|"]
    for key, label, p in (("resnet20", "baseline", s["baseline"]), ("dprp_proposed1", "DPRP proposed 1", s["proposed1"]),
                          ("dprp_proposed2", "DPRP proposed 2", s["proposed2"])):
        a = agg[key]
        setting = "–" if "comp" not in p else f"{p['comp']:g} / {p['eps']:g}"
        lines.append(f"| {label} | {setting} | {ms(a['test_accuracy'])} | {ms(a['params'], ',.0f')} | "
                     f"{ms(a['compression_percent'])} | {p['top1']} / {p['compression_percent']} |")
    lines += ["", "Pruned params: conv/Linear weights that are zero or removed, over the unpruned ResNet-32's "
              "parameters. Topology: float32 parameters left after physical removal (LOBSTER removes nothing). "
              "Bitstream: zlib level 9 of all float32 parameters (the paper's NNR quantises and entropy-codes, so "
              "only the ratios between rows compare). CPU ms: batch 1, one thread, median of "
              f"{cfg['repeats']} interleaved passes over 64 test images on this machine.", "",
              f"Reproduce: `{results['reproduce']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = budget_parser(__doc__)
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run_seed(seed, args) for seed in args.seeds]
    results = {"config": config_of(args), "paper": PAPER, "runs": runs, "aggregate": aggregate(runs),
               "reproduce": reproduce("bench_train_time_methods.py", argv)}
    save(args.out, "results.json", "summary.md", results, summary(results))
    return 0


def budget_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every digits-proxy script shares: seeds, budgets and the threshold tolerance."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="baseline and DPRP budget")
    ap.add_argument("--ft-epochs", type=int, default=20, help="LOBSTER/SeReNe fine-tune budget")
    ap.add_argument("--tolerance", type=float, default=0.05)
    return ap


def config_of(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def reproduce(script: str, argv: list[str] | None) -> str:
    return f"OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/{script}" + "".join(f" {a}" for a in (argv or []))


def save(out: Path, json_name: str, md_name: str, results: dict, text: str) -> None:
    """Write ``results`` and its summary ``text`` into ``out`` and print the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / json_name).write_text(json.dumps(results, indent=1) + "\n")
    (out / md_name).write_text(text)
    print(text)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
