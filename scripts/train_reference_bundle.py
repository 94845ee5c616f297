"""Build, train and evaluate medslim's reference MONAI bundle on MSD Task04 Hippocampus.

Steps (``medslim.bundle.hippocampus`` builds, ``…hippocampus_run`` runs):
  1. build OUT from the configs of the model-zoo bundle ``spleen_ct_segmentation``
     (``../shared/data/monai_bundles/``, Apache-2.0), read now and changed by a small set of
     overrides (listed with their reasons in OUT/docs/README.md): the Hippocampus folder and the
     fixed split of ``configs/hippocampus_split.json`` (train on fold 0's training cases,
     validate on its validation cases, evaluate on the 40 test cases), 3 output channels, MR
     z-score instead of the CT window, native spacing padded to a multiple of 16, 32³ crops,
     CPU workers; then MONAI's ``verify_metadata`` (offline);
  2. ``python -m monai.bundle run training`` (the bundle's own workflow) for ``--epochs`` with
     ``--seed``: OUT/models/model.pt (best validation Dice), OUT/eval/train_summary.json;
  3. ``python -m monai.bundle run evaluating`` on the test cases: OUT/eval/predictions/,
     MONAI's metric files, and OUT/eval/summary.json (per-class and mean Dice, budget, seed,
     wall times, cases); the Dice goes into metadata.json and docs/README.md;
  4. the commands that reproduce it are printed.

Real training (not run by the tests): 100 epochs of 64 iterations (2 volumes x 4 crops of 32^3, the
source's channels), validation of the 32 validation cases every 5 epochs, took 1,344 s (22 min) on an
otherwise idle 2-core machine at PyTorch's default threads (13 s per epoch):
  python scripts/train_reference_bundle.py OUT --epochs 100 --val-interval 5 --seed 12345
Tiny run (the test): ... OUT --epochs 1 --train-cases 4 --val-cases 2 --test-cases 2 --channels 4,8,16,32,64
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from medslim.errors import MedslimError, run_script
from medslim.bundle import hippocampus as hb
from medslim.bundle import hippocampus_run as run

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATA = SHARED / "Task04_Hippocampus"
SOURCE = SHARED / "monai_bundles" / "spleen_ct_segmentation"
SPLIT = REPO / "configs" / "hippocampus_split.json"


def channels(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != len(hb.SOURCE_CHANNELS) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected {len(hb.SOURCE_CHANNELS)} positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the bundle folder to write (must not exist unless --skip-training)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--val-interval", type=int, default=5, help="validate every N epochs (must divide --epochs)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--channels", type=channels, default=hb.SOURCE_CHANNELS,
                    help="UNet channels, comma-separated (default: the source's 16,32,64,128,256)")
    ap.add_argument("--train-cases", type=int, help="train on the first N training cases only (tests)")
    ap.add_argument("--val-cases", type=int, help="validate on the first N validation cases only (tests)")
    ap.add_argument("--test-cases", type=int, help="evaluate on the first N test cases only (tests)")
    ap.add_argument("--data", type=Path, default=DATA, help="MSD Task04_Hippocampus folder")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the spleen_ct_segmentation bundle")
    ap.add_argument("--split", type=Path, default=SPLIT)
    ap.add_argument("--skip-training", action="store_true", help="evaluate an already trained OUT")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.skip_training:
        if not (out / "eval" / "train_summary.json").is_file():
            raise MedslimError(f"{out} is not a trained bundle (no eval/train_summary.json)")
        training = json.loads((out / "eval" / "train_summary.json").read_text())
    else:
        training = run.build_and_train(out, args.source, args.data, args.split, args.epochs, args.seed,
                                       args.val_interval, args.channels, args.train_cases, args.val_cases)
    test = run.evaluate(out, args.data, args.test_cases)
    reproduce = shlex.join(["python", "scripts/train_reference_bundle.py", *(argv if argv is not None else sys.argv[1:])])
    if args.skip_training and (out / "eval" / "summary.json").is_file():  # keep the command that trained it
        reproduce = json.loads((out / "eval" / "summary.json").read_text())["reproduce"]
    summary = {"training": training, "test": test, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
               "reproduce": reproduce}
    print("\n" + run.record_results(out, summary))
    print("\nReproduce (from the repository root):\n  " + reproduce)
    print("or step by step:\n  " + training["command"] + "\n  " + test["command"])
    return 0


if __name__ == "__main__":
    run_script(main)
