"""Train the source model of the transfer benchmark: a torchvision resnet18 from scratch on the
PneumoniaMNIST train split (28×28, grey repeated to 3 channels), saved with ``save_classifier``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/train_source_classifier.py

Writes ``.work/source/pneumonia_resnet18.pt`` (gitignored) and a ``.json`` beside it with the
seed, budget and test accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("-o", "--output", type=Path, default=REPO / ".work" / "source" / "pneumonia_resnet18.pt")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--milestones", default="10", help="comma-separated epochs where lr ×0.1")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from medslim.classify import TrainConfig, build_classifier, evaluate, fit, load_medmnist, save_classifier

    train = load_medmnist(args.data, "train")
    test = load_medmnist(args.data, "test")
    val = load_medmnist(args.data, "val")
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                         milestones=tuple(int(m) for m in args.milestones.split(",") if m), num_threads=args.threads)
    model = build_classifier(args.arch, train.num_classes)

    def progress(epoch: int, batch: int, batches: int, loss: float) -> None:
        if batch == batches - 1:
            print(f"epoch {epoch + 1}/{config.epochs} last-batch loss {loss:.4f}", flush=True)

    history = fit(model, train, config, progress=progress)
    metrics = {"test": evaluate(model, test), "val": evaluate(model, val)}
    meta = {"data": str(args.data.resolve().relative_to(REPO.parent)) if REPO.parent in args.data.resolve().parents
            else str(args.data), "split": "train", "train_items": len(train), "config": config.to_dict(),
            "history": history, **metrics}
    save_classifier(model, args.output, args.arch, train.num_classes, meta)
    args.output.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"test accuracy {metrics['test']['accuracy']:.4f} (AUC {metrics['test']['auc']:.4f}), "
          f"val accuracy {metrics['val']['accuracy']:.4f}; {history['seconds']:.0f} s; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
