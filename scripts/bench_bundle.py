"""Compressed MONAI bundle vs its control on the reference bundle's test cases (issue 10).

For the reference bundle of ``scripts/train_reference_bundle.py`` (trained: BUNDLE/models/model.pt;
or built and trained first with ``--train-reference``), ``medslim.bundle.bench`` runs, through the
bundle's own ``python -m monai.bundle run`` workflows in copies under a work folder:
  1. original: the bundle as trained, scored on the test cases (``run evaluating``; Dice and NSD
     at 1 and 3 mm by medslim's evaluator on the saved label maps);
  2. control: the original + the fine-tune (its ``train.json`` + ``finetune.json``) for
     ``--epochs`` with each ``--seeds`` value, the checkpoint chosen on the validation cases; scored
     as 1;
  3. compressed: ``medslim compress-bundle`` (``--df``, ``--prune``, ``--criterion``) + the same
     fine-tune (+ ``distill.json`` with ``--kd-weight`` > 0), same budget and seeds; scored as 1;
and writes ``benchmarks/results/bundle_hippocampus/`` (``results.json``, ``results.csv``,
``summary.md``: parameters, FLOPs, wall times, cases, commands, mean ± sd over seeds, paired
Δ compressed − control (and − scratch), and whether the compressed bundle is within 1 pp Dice of the control).

Real benchmark (3 seeds; the reference trained for 100 epochs with the source's channels; 33 min on 2
cores):
  python scripts/bench_bundle.py BUNDLE --seeds 0 1 2 --epochs 20 --val-interval 5
The from-scratch control at the reference's budget adds ``--scratch-epochs 100`` (about 36 min per seed
on 2 cores: its first epochs took 21-22 s each there).
Rewrite summary.md from results.json: python scripts/bench_bundle.py BUNDLE --summary-only
Tiny run (the test): ... BUNDLE --train-reference --reference-epochs 1 --reference-val-interval 1
  --channels 4,8,16,32,64 --epochs 1 --val-interval 1 --seeds 3 --train-cases 4 --val-cases 2 --test-cases 2
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from train_reference_bundle import DATA, REPO, SOURCE, SPLIT, channels

from medslim.bundle import bench, bench_report
from medslim.bundle import hippocampus as hb
from medslim.bundle import hippocampus_run as run
from medslim.errors import run_script

OUT = REPO / "benchmarks" / "results" / "bundle_hippocampus"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="the trained reference bundle (written first with --train-reference)")
    ap.add_argument("--epochs", type=int, default=20, help="fine-tune budget (control and compressed)")
    ap.add_argument("--val-interval", type=int, default=5, help="validate every N epochs (must divide --epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds (headline: 3 or more)")
    ap.add_argument("--df", type=float, default=0.3, help="compress-bundle --df")
    ap.add_argument("--prune", type=float, default=0.5, help="compress-bundle --prune")
    ap.add_argument("--criterion", default="hvs", help="compress-bundle --criterion")
    ap.add_argument("--compress-seed", type=int, default=0, help="compress-bundle --seed")
    ap.add_argument("--kd-weight", type=float, default=0.0, help="> 0: the compressed fine-tune adds distill.json")
    ap.add_argument("--scratch-epochs", type=int, default=0,
                    help="> 0: also train the compressed architecture from scratch for this many epochs "
                         "(fair: the reference's own budget)")
    ap.add_argument("--train-cases", type=int, help="train on the first N training cases only (tests)")
    ap.add_argument("--val-cases", type=int, help="validate on the first N validation cases only (tests)")
    ap.add_argument("--test-cases", type=int, help="score the first N test cases only (tests)")
    ap.add_argument("--train-reference", action="store_true",
                    help="build and train BUNDLE first (as scripts/train_reference_bundle.py; BUNDLE must not exist)")
    ap.add_argument("--reference-epochs", type=int, default=100)
    ap.add_argument("--reference-val-interval", type=int, default=5)
    ap.add_argument("--reference-seed", type=int, default=12345)
    ap.add_argument("--channels", type=channels, default=hb.SOURCE_CHANNELS, help="reference UNet channels")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="MSD Task04_Hippocampus folder for --train-reference (scores use the bundle's dataset_dir)")
    ap.add_argument("--workdir", type=Path, help="keep the work bundles here (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (replaced)")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md and results.csv from results.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.summary_only:
        bench_report.write_results(args.out, json.loads((args.out / "results.json").read_text()))
        print((args.out / "summary.md").read_text())
        return 0
    config = bench.BenchConfig(
        epochs=args.epochs, val_interval=args.val_interval, seeds=tuple(args.seeds), df=args.df, prune=args.prune,
        criterion=args.criterion, compress_seed=args.compress_seed, kd_weight=args.kd_weight,
        scratch_epochs=args.scratch_epochs, train_cases=args.train_cases, val_cases=args.val_cases,
        test_cases=args.test_cases)
    reference = args.bundle.resolve()
    if args.workdir is not None:
        bench.check_work(args.workdir)  # before training the reference
    if args.train_reference:
        run.build_and_train(reference, SOURCE, args.data, SPLIT, args.reference_epochs, args.reference_seed,
                            args.reference_val_interval, args.channels, args.train_cases, args.val_cases)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medslim-bench-bundle-"))
    try:
        results = bench.run_benchmark(reference, work, config)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["reproduce"] = shlex.join(["python", "scripts/bench_bundle.py", *argv])
    bench_report.write_results(args.out, results)
    print("\n" + (args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    run_script(main)
