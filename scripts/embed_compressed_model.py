"""Embed one finished sweep cell (a compressed + fine-tuned Hippocampus model) beside the
reference model, as ``src/medslim/default_model/Dataset004_Hippocampus_medslim``.

The cell is chosen on validation data (fold 0's validation cases) by whoever runs this; the
script refuses a cell that is not ≥ 10× smaller than the reference. It copies the results
folder (plans.json naming ``medslim.network.CompressedUNet`` + spec, dataset.json, the final
checkpoint without optimizer state, ``trainer_name`` set to the stock ``nnUNetTrainer`` so that
stock nnU-Net loads it without ``nnUNet_extTrainer``) and writes ``provenance.json``: the cell's
definition, its result (params, FLOPs, validation and test scores), the sweep file and the
command that reproduces it.

    python scripts/embed_compressed_model.py SWEEP_DIR CELL_ID --sweep-file configs/sweep/headline.yaml
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "medslim" / "default_model" / "Dataset004_Hippocampus_medslim"
MIN_RATIO = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("cell_id")
    ap.add_argument("--sweep-file", required=True, help="the sweep YAML the cell came from (recorded)")
    args = ap.parse_args()

    import torch

    cell_dir = args.sweep_dir / "cells" / args.cell_id
    result_file = cell_dir / "result.json"
    if not result_file.is_file():
        sys.exit(f"error: {cell_dir} has no result.json (not finished)")
    result = json.loads(result_file.read_text())
    if result["cell"]["kind"] != "compressed" or result["ratio_params"] < MIN_RATIO:
        sys.exit(f"error: {args.cell_id} is a {result['cell']['kind']} cell at ×{result['ratio_params']:.1f}; "
                 f"the embedded model must be compressed ≥ {MIN_RATIO:g}× fewer parameters")
    folder = Path(result["folder"])
    tmp = DEST.with_name(DEST.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(folder / name, tmp / name)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    ckpt.update(optimizer_state=None, grad_scaler_state=None, trainer_name="nnUNetTrainer",
                medslim_trained_with=ckpt.get("trainer_name"))
    torch.save(ckpt, tmp / "fold_0" / "checkpoint_final.pth")
    medslim_config = json.loads((folder / "medslim_config.json").read_text())
    provenance = {
        "cell": result["cell"], "sweep_file": args.sweep_file,
        "reproduce": f"medslim sweep {args.sweep_file} -o SWEEP_DIR --only {args.cell_id}; "
                     f"python scripts/embed_compressed_model.py SWEEP_DIR {args.cell_id} --sweep-file {args.sweep_file}",
        "finetune": medslim_config["config"],
        **{k: result[k] for k in ("params", "flops", "params_original", "flops_original", "ratio_params",
                                  "ratio_flops", "updates", "train_seconds", "cpu_seconds")},
        "scores": {split: {k: v for k, v in m.items() if k != "per_case_dice"} for split, m in result["metrics"].items()},
    }
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1))
    if DEST.exists():
        shutil.rmtree(DEST)
    tmp.rename(DEST)
    print(f"embedded {args.cell_id} (×{result['ratio_params']:.1f} fewer parameters) into {DEST}")


if __name__ == "__main__":
    main()
