"""Evaluate the embedded reference nnU-Net on the 40 held-out test cases with ``medslim
evaluate`` (medslim predict, then per-class Dice and NSD at 3 mm).

The shared data is only read: the test images are copied under nnU-Net's input names
(``<case>_0000.nii.gz``) and the test labels into a temp folder, which is the case list.
Writes ``benchmarks/results/reference_eval/`` (per_case.csv, summary.json, summary.md).
Usage: python scripts/eval_reference_model.py [--model FOLDER] [-o OUT]  (the embedded compressed
model: --model src/medslim/default_model/Dataset004_Hippocampus_medslim -o benchmarks/results/compressed_eval)
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from medslim.api import DEFAULT_MODEL
from medslim.evaluate import evaluate_command

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "Task04_Hippocampus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks" / "results" / "reference_eval")
    args = ap.parse_args()
    cases = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())["test"]
    work = Path(tempfile.mkdtemp(prefix="medslim-refeval-"))
    try:
        (work / "images").mkdir()
        (work / "labels").mkdir()
        for case in cases:
            shutil.copy(HIPPO / "imagesTr" / f"{case}.nii.gz", work / "images" / f"{case}_0000.nii.gz")
            shutil.copy(HIPPO / "labelsTr" / f"{case}.nii.gz", work / "labels" / f"{case}.nii.gz")
        result = evaluate_command(ref=work / "labels", model=args.model, images=work / "images",
                                  output=args.output, overwrite=True)
        print(result.markdown)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
