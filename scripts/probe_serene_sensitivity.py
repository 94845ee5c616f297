"""SeReNe's channel sensitivities on a trained 2D base: how far ``max(0, 1 − S_c)`` is from 1,
i.e. whether the SeReNe update (``θ − λθ·max(0, 1 − S_c)``) can tell channels apart. Reads a
base of ``scripts/train_medmnist_bases.py``; CPU, one thread, seconds::

    PYTHONPATH=src .venv/bin/python scripts/probe_serene_sensitivity.py --set breastmnist

Writes ``benchmarks/results/train_time_methods/serene_sensitivity.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from medslim.classify import build_classifier, load_medmnist
    from medslim.finetune.regularize import channel_sensitivity, insensitivity
    from medslim.prune.classifier import classifier_layers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="breastmnist")
    ap.add_argument("--arch", default="resnet18_28")
    ap.add_argument("--images", type=int, default=16, help="first N training images")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_time_methods")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    images = load_medmnist(REPO.parent / "shared" / "data" / "medmnist" / f"{args.set}.npz", "train").images
    base = build_classifier(str(REPO / ".work" / "bases" / f"{args.set}_{args.arch}.pt")).eval()
    layers = classifier_layers(base)
    s = torch.cat(list(channel_sensitivity(base, layers, images[:args.images]).values())).double()
    free = insensitivity(s)
    result = {"set": args.set, "arch": args.arch, "images": args.images, "layers": len(layers), "channels": s.numel(),
              "sensitivity": {"max": float(s.max()), "median": float(s.median()), "min": float(s.min())},
              "insensitivity": {"min": float(free.min()), "median": float(free.median()),
                                "fraction_above_0.99": float((free > 0.99).double().mean())}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serene_sensitivity.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
