"""The bundle benchmark's aggregation, verdict and files (``results.json``, ``results.csv``,
``summary.md``), all computed from the runs of :func:`medslim.bundle.bench.run_benchmark`."""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WITHIN_PP = 1.0
"""The verdict's margin: the compressed bundle's mean test Dice at most this many points below the control's."""
HEADLINE_SEEDS = 3
"""Seeds a headline number needs."""
MODELS = {"original": "original", "control": "original + fine-tune (control)", "compressed": "compressed + fine-tune",
          "scratch": "compressed architecture from scratch"}
CSV_FIELDS = ("model", "seed", "trained_by", "epochs", "val_interval", "kd_weight", "n_train_cases", "n_val_cases",
              "n_test_cases", "params", "flops", "train_wall_s", "best_val_dice", "best_val_epoch")


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "n"}`` of the values that are not None; ``sd`` is the sample standard
    deviation (None for fewer than 2 values), ``mean`` None for none."""
    kept = [float(v) for v in values if v is not None]
    return {"mean": statistics.mean(kept) if kept else None,
            "sd": statistics.stdev(kept) if len(kept) > 1 else None, "n": len(kept)}


def compare(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``aggregate``: per model that ran, mean ± sd over seeds of each metric and the train wall
    time (the original: its one evaluation); ``delta``: per metric, compressed − control per
    seed and their mean ± sd; ``delta_scratch``: the same against the scratch control (when it
    ran); ``verdict``: :func:`verdict`."""
    keys = list(runs[0]["metrics"])
    aggregate = {}
    for model in MODELS:
        rows = [r for r in runs if r["model"] == model]
        if rows:
            aggregate[model] = {**{k: stats([r["metrics"][k] for r in rows]) for k in keys},
                                "train_wall_s": stats([r["train_wall_s"] for r in rows])}
    delta = paired(runs, "compressed", "control", keys)
    out = {"aggregate": aggregate, "delta": delta, "verdict": verdict(delta["dice_mean"])}
    if "scratch" in aggregate:
        out["delta_scratch"] = paired(runs, "compressed", "scratch", keys)
    return out


def paired(runs: Sequence[Mapping[str, Any]], a: str, b: str, keys: Sequence[str]) -> dict[str, Any]:
    """Per metric in ``keys``: model ``a`` − model ``b`` for each seed both ran (``per_seed``),
    and the mean ± sd of those differences."""
    by_seed = {m: {r["seed"]: r for r in runs if r["model"] == m} for m in (a, b)}
    seeds = [s for s in by_seed[b] if s in by_seed[a]]
    delta = {}
    for k in keys:
        per_seed = {str(s): _minus(by_seed[a][s]["metrics"][k], by_seed[b][s]["metrics"][k]) for s in seeds}
        delta[k] = {**stats(list(per_seed.values())), "per_seed": per_seed}
    return delta


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def verdict(dice_delta: Mapping[str, Any]) -> dict[str, Any]:
    """Is the compressed bundle within :data:`WITHIN_PP` Dice points of the control: the mean
    over seeds of the paired difference (compressed − control) of the mean test Dice is ≥
    −``WITHIN_PP`` / 100. Also how many seeds are within on their own, and whether there are
    enough seeds (:data:`HEADLINE_SEEDS`) for a headline number."""
    per_seed = {s: v for s, v in dice_delta["per_seed"].items() if v is not None}
    mean = dice_delta["mean"]
    return {"metric": "dice_mean", "margin_pp": WITHIN_PP, "n_seeds": len(per_seed),
            "within": mean is not None and 100 * mean >= -WITHIN_PP,
            "seeds_within": sum(100 * v >= -WITHIN_PP for v in per_seed.values()),
            "headline": len(per_seed) >= HEADLINE_SEEDS}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def csv_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per run: :data:`CSV_FIELDS` (case lists as counts), then every metric, MONAI's
    mean Dice and the evaluation wall time."""
    rows = []
    for r in results["runs"]:
        row = {k: r.get(k) for k in CSV_FIELDS if not k.startswith("n_")}
        row.update(n_train_cases=len(r["train_cases"] or []) or None, n_val_cases=len(r["val_cases"] or []) or None,
                   n_test_cases=len(r["test_cases"]))
        rows.append({**{k: row[k] for k in CSV_FIELDS}, **r["metrics"], "dice_monai_mean": r["dice_monai_mean"],
                     "eval_wall_s": r["eval_wall_s"]})
    return rows


def csv_text(results: Mapping[str, Any]) -> str:
    rows = csv_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def f4(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def pp(value: float | None) -> str:
    """A difference of fractions in percentage points, signed, 2 decimals."""
    return "n/a" if value is None else f"{100 * value:+.2f}"


def mean_sd(s: Mapping[str, Any], fmt=f4) -> str:
    if s["mean"] is None:
        return "n/a"
    return fmt(s["mean"]) if s["sd"] is None else f"{fmt(s['mean'])} ± {fmt(s['sd']).lstrip('+')}"


def _count(n: int) -> str:
    return f"{n:,}"


def verdict_text(results: Mapping[str, Any]) -> str:
    """The verdict in plain words, every number from ``results``."""
    v, agg, d = results["verdict"], results["aggregate"], results["delta"]["dice_mean"]
    per_seed = ", ".join(f"seed {s}: {pp(x)}" for s, x in d["per_seed"].items())
    head = "is" if v["within"] else "is not"
    text = (f"The compressed bundle {head} within {v['margin_pp']:g} pp Dice of the control (at most "
            f"{v['margin_pp']:g} pp below it): its mean test Dice is "
            f"{mean_sd(agg['compressed']['dice_mean'])} against the control's {mean_sd(agg['control']['dice_mean'])}, "
            f"a paired difference (compressed − control) of {mean_sd(d, pp)} pp over {v['n_seeds']} seed(s) "
            f"({per_seed}); {v['seeds_within']} of {v['n_seeds']} seed(s) are within {v['margin_pp']:g} pp "
            "on their own.")
    if not v["headline"]:
        text += (f" With {v['n_seeds']} seed(s) this is not a headline number: "
                 f"that needs at least {HEADLINE_SEEDS} seeds.")
    if "delta_scratch" in results:
        ds = results["delta_scratch"]["dice_mean"]
        values = [x for x in ds["per_seed"].values() if x is not None]
        text += (f" Against the same architecture trained from scratch "
                 f"({results['config'].get('scratch_epochs')} epoch(s)), whose mean test Dice is "
                 f"{mean_sd(agg['scratch']['dice_mean'])}, the compressed + fine-tuned bundle differs by "
                 f"{mean_sd(ds, pp)} pp (paired, compressed − scratch; "
                 + ", ".join(f"seed {s}: {pp(x)}" for s, x in ds["per_seed"].items())
                 + f"); it is higher on {sum(x > 0 for x in values)} of {len(values)} seed(s).")
    return text


def summary_markdown(results: Mapping[str, Any]) -> str:
    """``summary.md``: the verdict, the table of the models, the runs per seed, the
    setup and the commands; computed from ``results`` alone."""
    cfg, sizes, agg, delta = results["config"], results["sizes"], results["aggregate"], results["delta"]
    names = list(results["classes"].values())
    original = next(r for r in results["runs"] if r["model"] == "original")
    p0, f0 = sizes["original"]["params"], sizes["original"]["flops"]
    p1, f1 = sizes["compressed"]["params"], sizes["compressed"]["flops"]
    cases = results["cases"]
    columns = [f"dice_{n}" for n in names] + ["dice_mean", "nsd1_mean", "nsd3_mean"]
    head = ("| model | seeds | params | GFLOPs / patch | train s | " + " | ".join(f"Dice {n}" for n in names)
            + " | mean Dice | mean NSD @1 mm | mean NSD @3 mm |")
    size = {"original": (p0, f0), "control": (p0, f0), "compressed": (p1, f1), "scratch": (p1, f1)}
    lines = [
        f"# Compressed vs control: the MONAI reference bundle on {len(cases['test'])} test cases",
        "",
        "Generated by `scripts/bench_bundle.py` from `results.json` (per run: `results.csv`).",
        "",
        verdict_text(results),
        "",
        f"The compressed network (DF {cfg['df']:g}, ρ {cfg['prune']:g}, criterion {cfg['criterion']}) has "
        f"{_count(p1)} parameters against {_count(p0)} ({p0 / p1:.2f}× fewer) and {f1 / 1e9:.3f} GFLOPs per "
        f"{sizes['original']['input_shape']} patch against {f0 / 1e9:.3f} ({f0 / f1:.2f}× fewer).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for model, label in MODELS.items():
        if model not in agg:
            continue
        a = agg[model]
        seeds = "–" if model == "original" else str(a["dice_mean"]["n"])
        lines.append(f"| {label} | {seeds} | {_count(size[model][0])} | {size[model][1] / 1e9:.3f} | "
                     f"{mean_sd(a['train_wall_s'], lambda x: f'{x:.0f}')} | "
                     + " | ".join(mean_sd(a[c]) for c in columns) + " |")
    lines.append("| Δ compressed − control (paired, pp) | " f"{delta['dice_mean']['n']} | | | | "
                 + " | ".join(mean_sd(delta[c], pp) for c in columns) + " |")
    if "delta_scratch" in results:
        ds = results["delta_scratch"]
        lines.append(f"| Δ compressed − scratch (paired, pp) | {ds['dice_mean']['n']} | | | | "
                     + " | ".join(mean_sd(ds[c], pp) for c in columns) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds. Dice and NSD by medslim's evaluator on the label "
              "maps the bundle's `run evaluating` saved (per case the mean over the classes present, then over "
              f"cases); MONAI's MeanDice on the same maps: original {f4(original['dice_monai_mean'])}. "
              "Train s: the original's is its reference training "
              f"({original['epochs']} epoch(s), seed {original['seed']}), the others' the fine-tune's.",
              "", "## Runs", "",
              "| model | seed | best validation Dice (epoch) | mean Dice | mean NSD @1 mm | mean NSD @3 mm | train s |",
              "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        best = "–" if r["best_val_dice"] is None else f"{f4(r['best_val_dice'])} ({r['best_val_epoch']})"
        wall = "–" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f}"
        lines.append(f"| {MODELS[r['model']]} | {r['seed'] if r['seed'] is not None else '–'} | {best} | "
                     f"{f4(r['metrics']['dice_mean'])} | {f4(r['metrics']['nsd1_mean'])} | "
                     f"{f4(r['metrics']['nsd3_mean'])} | {wall} |")
    kd = (f"; the compressed bundle's adds `distill.json` (distillation from the original, weight {cfg['kd_weight']:g})"
          if cfg["kd_weight"] > 0 else "; no distillation")
    lines += [
        "", "## Setup", "",
        f"- Fine-tune (control and compressed alike): the bundle's own `train.json` + `finetune.json` (training "
        f"starts from `models/model.pt`){kd}; {cfg['epochs']} epoch(s), validation every {cfg['val_interval']} "
        f"epoch(s); seeds {cfg['seeds']}.",
        f"- Cases: {len(cases['training'])} training and {len(cases['validation'])} validation cases (the "
        f"bundle's `CheckpointSaver` keeps the weights with the best mean validation Dice); "
        f"{len(cases['test'])} test cases, used only for this report and never for training or validation: "
        f"{', '.join(cases['test'])}.",
        f"- Compression: `medslim compress-bundle` DF {cfg['df']:g}, ρ {cfg['prune']:g}, criterion "
        f"{cfg['criterion']}, seed {cfg['compress_seed']}; done once, before the fine-tunes.",
    ]
    if cfg.get("scratch_epochs"):
        lines.append(f"- From scratch: the compressed architecture (the compressed bundle's `network_def`) trained "
                     f"by `train.json` alone from its fresh initialisation, {cfg['scratch_epochs']} epoch(s), "
                     f"the same cases, validation and seeds.")
    lines += [
        f"- Machine: {results['machine']['cpus']} CPU(s), OMP_NUM_THREADS {results['machine']['omp_num_threads']}.",
        "", "## Commands run", "", "```", *results["commands"], "```",
    ]
    if results.get("reproduce"):
        lines += ["", "Reproduce (from the repository root):", "", f"    {results['reproduce']}"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: Mapping[str, Any]) -> Path:
    """``out/results.json``, ``results.csv``, ``summary.md`` (the folder is replaced whole)."""
    from medslim.atomic import atomic_folder

    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (tmp / "results.csv").write_text(csv_text(results))
        (tmp / "summary.md").write_text(summary_markdown(results))
    return Path(out)
