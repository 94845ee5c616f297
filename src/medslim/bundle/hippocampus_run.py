"""Run the reference MONAI bundle's own workflows (:mod:`medslim.bundle.hippocampus`
builds it): ``python -m monai.bundle run training`` and ``run evaluating`` in a new process from
the bundle folder, their output echoed and saved under ``eval/``; then the test Dice (MONAI's
``MetricsSaver`` and medslim's evaluator on the saved label maps), recorded in
``eval/summary.json``, ``metadata.json``'s ``eval_metrics`` and ``docs/README.md``."""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medslim.errors import MedslimError
from medslim.bundle.hippocampus import RESULTS_BEGIN, RESULTS_END, case_name


def limit(workflow: str, list_id: str, n: int | None) -> dict[str, str]:
    """Run-time override: ``workflow``'s dataset (``train``/``validate``) uses the first ``n``
    items of the datalist ``list_id`` (``{}``: all of them, as configured)."""
    return {} if n is None else {f"{workflow}#dataset#data": f"$@{list_id}[:{int(n)}]"}


def bundle_command(run_id: str, config_files: Sequence[str], overrides: Mapping[str, Any]) -> list[str]:
    """``python -m monai.bundle run RUN_ID ...`` (run from the bundle folder)."""
    files = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--meta_file", "configs/metadata.json",
           "--config_file", files, "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _quote(arg: str) -> str:
    """``shlex.quote``, but double quotes where they are enough (``"['a.json','b.json']"``)."""
    quoted = shlex.quote(arg)
    return f'"{arg}"' if quoted != arg and not any(c in arg for c in '"$`\\!') else quoted


def shown(cmd: Sequence[str], bundle: Path) -> str:
    """The command as a user types it: ``cd BUNDLE && python -m …``."""
    return f"cd {_quote(str(bundle))} && " + " ".join(_quote(a) for a in ["python", *cmd[1:]])


def run_workflow(bundle: Path, cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in ``bundle`` (``python -m MODULE …``: a bundle workflow, or a medslim command
    run from that folder), echo and save its output to ``log``; returns the wall time (s).

    Raises:
        MedslimError: the workflow failed (the last lines of its output are in the message).
    """
    print("+", shown(cmd, bundle), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc, open(log, "w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            f.write(line)
            lines = (lines + [line])[-20:]
    if proc.returncode:
        raise MedslimError(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}; log {log}): "
                           f"{''.join(lines)[-2000:]}")
    return time.perf_counter() - start


def train(bundle: Path, epochs: int, seed: int, val_interval: int, train_cases: int | None = None,
          val_cases: int | None = None, config_files: Sequence[str] = ("configs/train.json",),
          overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``run training`` with the budget and seed as overrides; returns the bundle's
    ``eval/train_summary.json`` with the command and wall time added (and written back).
    ``config_files``: ``train.json`` and the overlays after it (``finetune.json``, …);
    ``overrides``: further ``--id value`` pairs (e.g. ``medslim_kd_weight``)."""
    bundle = Path(bundle).resolve()
    overrides = {"epochs": epochs, "seed": seed, "val_interval": val_interval, **(overrides or {}),
                 **limit("train", "train_datalist", train_cases), **limit("validate", "val_datalist", val_cases)}
    cmd = bundle_command("training", list(config_files), overrides)
    wall = run_workflow(bundle, cmd, bundle / "eval" / "train_log.txt")
    summary_file = bundle / "eval" / "train_summary.json"
    if not (bundle / "models" / "model.pt").is_file() or not summary_file.is_file():
        raise MedslimError(f"training in {bundle} wrote no models/model.pt or eval/train_summary.json")
    record = {**json.loads(summary_file.read_text()), "val_interval": val_interval, "wall_time_s": round(wall, 1),
              "command": shown(cmd, bundle)}
    summary_file.write_text(json.dumps(record, indent=1))
    return record


def build_and_train(out: Path, source: Path, data_dir: Path, split_file: Path, epochs: int, seed: int,
                    val_interval: int, channels: Sequence[int], train_cases: int | None = None,
                    val_cases: int | None = None) -> dict[str, Any]:
    """Build the reference bundle at ``out`` (:func:`~medslim.bundle.hippocampus.build_bundle`),
    check its metadata offline, and train it (:func:`train`); returns the training record."""
    from medslim.bundle import hippocampus as hb

    hb.build_bundle(out, source, data_dir, split_file, epochs, seed, val_interval, channels)
    hb.verify_metadata(out)
    print(f"built {out} (verify_metadata passed)", flush=True)
    return train(out, epochs, seed, val_interval, train_cases, val_cases)


def monai_dice(raw_csv: Path, labels: Sequence[int]) -> dict[str, Any]:
    """Per-case Dice of MONAI's ``MetricsSaver`` file (``val_mean_dice_raw.csv``: a row per
    case — its image path, then a column per foreground class ``class0, class1, …`` = labels
    1, 2, …, then ``mean``) → per case, per class and overall means."""
    with open(raw_csv, newline="") as f:
        rows = list(csv.reader(f))
    per_case = {case_name(r[0]): {lab: float(v) for lab, v in zip(labels, r[1:1 + len(labels)])} for r in rows[1:]}
    per_label = {lab: _mean([d[lab] for d in per_case.values()]) for lab in labels}
    return {"per_case": per_case, "mean_per_label": per_label,
            "mean": _mean([_mean(list(d.values())) for d in per_case.values()])}


def _mean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def evaluate(bundle: Path, data_dir: Path, test_cases: int | None = None) -> dict[str, Any]:
    """``run evaluating`` on the test cases; returns the per-class and mean Dice of MONAI's
    ``MeanDice`` (``MetricsSaver``) and of medslim's evaluator on the saved label maps (the
    aggregation of the nnU-Net reference's numbers), the cases and the wall time."""
    from medslim.evaluate import mean_dice_folder

    bundle = Path(bundle).resolve()
    lists = json.loads((bundle / "configs" / "datalist.json").read_text())
    cases = [case_name(d["image"]) for d in lists["test"]][:test_cases]
    labels = [int(k) for k in json.loads((bundle / "configs" / "metadata.json").read_text())
              ["network_data_format"]["outputs"]["pred"]["channel_def"] if int(k) > 0]
    cmd = bundle_command("evaluating", ["configs/train.json", "configs/evaluate.json"],
                         limit("validate", "test_datalist", test_cases))
    wall = run_workflow(bundle, cmd, bundle / "eval" / "evaluate_log.txt")
    ours = mean_dice_folder(bundle / "eval" / "predictions", Path(data_dir) / "labelsTr", cases, labels)
    theirs = monai_dice(bundle / "eval" / "val_mean_dice_raw.csv", labels)
    if sorted(theirs["per_case"]) != sorted(cases):
        raise MedslimError(f"the evaluation scored {sorted(theirs['per_case'])}, expected {cases}")
    return {"test_cases": cases, "dice": ours, "dice_monai": theirs, "wall_time_s": round(wall, 1),
            "command": shown(cmd, bundle)}


def record_results(bundle: Path, summary: Mapping[str, Any]) -> str:
    """``eval/summary.json``, the test Dice in ``metadata.json``'s ``eval_metrics`` and the
    Results section of ``docs/README.md``; returns the Dice as one line."""
    bundle = Path(bundle)
    (bundle / "eval" / "summary.json").write_text(json.dumps(summary, indent=1))
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    dice = summary["test"]["dice"]
    meta["eval_metrics"] = {"mean_dice": dice["mean"],
                            **{f"mean_dice_{names[str(k)]}": v for k, v in dice["mean_per_label"].items()}}
    meta_file.write_text(json.dumps(meta, indent=2))
    readme = bundle / "docs" / "README.md"
    text = readme.read_text()
    head, rest = text.split(RESULTS_BEGIN, 1)
    readme.write_text(head + RESULTS_BEGIN + "\n" + _results_text(summary, names) + "\n" + RESULTS_END
                      + rest.split(RESULTS_END, 1)[1])
    per_label = ", ".join(f"{names[str(k)]} {fmt(v)}" for k, v in dice["mean_per_label"].items())
    return (f"test-set Dice ({len(summary['test']['test_cases'])} cases): {per_label}, mean {fmt(dice['mean'])}"
            f"  ->  {bundle / 'eval' / 'summary.json'}")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _results_text(summary: Mapping[str, Any], names: Mapping[str, str]) -> str:
    tr, te = summary["training"], summary["test"]
    ours, theirs = te["dice"], te["dice_monai"]
    rows = "\n".join(f"| {names[str(k)]} | {fmt(v)} | {fmt(theirs['mean_per_label'][k])} |"
                     for k, v in ours["mean_per_label"].items())
    return f"""Test-set Dice ({len(te['test_cases'])} cases; `eval/summary.json` has every case):

| class | Dice (medslim evaluate, as the nnU-Net reference) | Dice (MONAI MeanDice) |
|---|---|---|
{rows}
| mean | {fmt(ours['mean'])} | {fmt(theirs['mean'])} |

Training (`eval/train_summary.json`):

- seed {tr['seed']}; {tr['epochs']} epoch(s) = {tr['iterations']} iterations over {len(tr['train_cases'])} training cases
- validation every {tr['val_interval']} epoch(s) on {len(tr['val_cases'])} cases; best mean validation Dice
  {fmt(tr['best_val_mean_dice'])} at epoch {tr['best_val_epoch']} (`models/model.pt`); last training loss {fmt(tr['last_loss'])}
- wall time: {tr['wall_time_s']:.0f} s of training, {te['wall_time_s']:.0f} s of evaluation; OMP_NUM_THREADS {summary.get('threads', '?')}

Reproduce (from the medslim repository):

    {summary['reproduce']}"""
