"""Train medslim's reference nnU-Net on MSD Task04 Hippocampus with the stock nnU-Net pipeline.

Steps (each one the stock nnU-Net command):
  1. ``nnUNetv2_convert_MSD_dataset`` on ``../shared/data/Task04_Hippocampus``;
  2. the 40 test cases of ``configs/hippocampus_split.json`` are moved out of ``imagesTr``
     into ``imagesTsLabeled``/``labelsTsLabeled`` before anything else sees them;
  3. ``nnUNetv2_plan_and_preprocess -c 3d_fullres``; a plans variant ``nnUNetPlansSmall``
     halves ``features_per_stage`` ([16, 32, 64, 128], 1.4 M parameters, batch 4) so that the
     checkpoint fits the package (≤15 MB) and an hour of CPU trains it well;
  4. ``splits_final.json`` = the repo's fold 0 (128 train / 32 val);
  5. ``nnUNetv2_train 4 3d_fullres 0 -p nnUNetPlansSmall -tr nnUNetTrainerMedslimCPU
     -device cpu`` (``nnunet_plugin/``, found through ``nnUNet_extTrainer``);
  6. ``nnUNetv2_predict`` on the 40 test cases and Dice per label, written to
     ``<workdir>/reference_test_dice.json``;
  7. with ``--embed``: the results folder (plans.json, dataset.json,
     fold_0/checkpoint_final.pth without optimizer state, trainer_name set to the stock
     ``nnUNetTrainer``, which builds the identical network) and five test cases are copied
     into ``src/medslim/default_model``.

Reproduce the embedded default model (seed 12345, 40 epochs x 50 iterations, batch 4: about
40-60 min on 2 idle CPU cores; augmentation workers keep their own randomness, so a rerun is
close to, not bit-identical with, the committed weights):
  python scripts/train_reference_model.py --workdir .work --epochs 40 --iters 50 --seed 12345 --embed
The committed run was started with 50 epochs, stopped after epoch 15 and resumed with
``nnUNetv2_train ... --c`` and MEDSLIM_EPOCHS=40 (the poly schedule follows the new total);
``--skip-training --embed`` then predicted the test set and embedded the result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from medslim.evaluate import mean_dice_folder
from medslim.finetune.hippocampus import DATASET, PLANS, nnunet_env, prepare_hippocampus

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
SPLIT = REPO / "configs" / "hippocampus_split.json"
TRAINER = "nnUNetTrainerMedslimCPU"
DEMO_CASES = 5


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / ".work")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--proc-da", type=int, default=2)
    ap.add_argument("--embed", action="store_true", help="copy the result into src/medslim/default_model")
    ap.add_argument("--skip-training", action="store_true", help="reuse an existing results folder")
    args = ap.parse_args()

    workdir = args.workdir.resolve()
    env = nnunet_env(workdir, nnUNet_n_proc_DA=str(args.proc_da), MEDSLIM_EPOCHS=str(args.epochs),
                     MEDSLIM_ITERS=str(args.iters), MEDSLIM_SEED=str(args.seed))
    split = json.loads(SPLIT.read_text())
    raw = workdir / "nnUNet_raw" / DATASET
    results = workdir / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"

    if not args.skip_training:
        prepare_hippocampus(DATA, SPLIT, workdir, quiet=False)
        run(["nnUNetv2_train", "4", "3d_fullres", "0", "-p", PLANS, "-tr", TRAINER, "-device", "cpu"], env)

    pred = workdir / "reference_test_predictions"
    if pred.exists():
        shutil.rmtree(pred)
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTsLabeled"), "-o", str(pred), "-d", "4",
         "-c", "3d_fullres", "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu",
         "-npp", "1", "-nps", "1"], env)
    dice = mean_dice_folder(pred, raw / "labelsTsLabeled", split["test"], [1, 2])
    dice.update(seed=args.seed, epochs=args.epochs, iters=args.iters, test_cases=split["test"])
    (workdir / "reference_test_dice.json").write_text(json.dumps(dice, indent=1))
    print(f"test-set Dice (40 cases): anterior {dice['mean_per_label'][1]:.4f}, "
          f"posterior {dice['mean_per_label'][2]:.4f}, mean {dice['mean']:.4f}")

    if args.embed:
        embed(results, raw, split["test"][:DEMO_CASES], dice)


def embed(results: Path, raw: Path, demo_cases: list[str], dice: dict) -> None:
    import torch

    dest = REPO / "src" / "medslim" / "default_model"
    model_dir = dest / "Dataset004_Hippocampus"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(results / name, model_dir / name)
    ckpt = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    ckpt["optimizer_state"] = None
    ckpt["grad_scaler_state"] = None
    # Our CPU trainer only changes the schedule, not the network: naming the stock trainer
    # lets stock nnUNetv2_predict load the embedded model without nnUNet_extTrainer.
    ckpt["trainer_name"] = "nnUNetTrainer"
    ckpt["medslim_trained_with"] = TRAINER
    torch.save(ckpt, model_dir / "fold_0" / "checkpoint_final.pth")
    cases = dest / "cases"
    if cases.exists():
        shutil.rmtree(cases)
    (cases / "imagesTs").mkdir(parents=True)
    (cases / "labelsTs").mkdir()
    for case in demo_cases:
        shutil.copy(raw / "imagesTsLabeled" / f"{case}_0000.nii.gz", cases / "imagesTs")
        shutil.copy(raw / "labelsTsLabeled" / f"{case}.nii.gz", cases / "labelsTs")
    (dest / "reference_test_dice.json").write_text(json.dumps(dice, indent=1))
    print(f"embedded into {dest}")


if __name__ == "__main__":
    sys.exit(main())
