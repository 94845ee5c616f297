"""``scripts/bench_bundle.py`` (``medslim.bundle.bench``): the reference bundle, the control
fine-tune, the compressed bundle + the same fine-tune and the compressed architecture from
scratch, all through the bundle's own ``monai.bundle run`` workflows, end to end at a tiny
budget (reference, fine-tunes and scratch: 1 epoch over 4 training cases, 2 validation cases, 2
test cases, channels 4–64, one seed), on real
Hippocampus data and the repo split; the aggregation and verdict on hand-made 3-seed results."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from conftest import REPO

from medslim.bundle import bench, bench_report
from medslim.errors import MedslimError

pytest.importorskip("ignite")
SPLIT = json.loads((REPO / "configs" / "hippocampus_split.json").read_text())
SEED, N_TRAIN, N_VAL, N_TEST = 3, 4, 2, 2
CLASSES = ("anterior", "posterior")


def run_main(*args: str) -> int:
    """``scripts/bench_bundle.py`` in this process (its workflows run in new processes, which
    get one thread and this checkout's ``src``)."""
    with pytest.MonkeyPatch.context() as mp:
        env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        for key, value in env.items():
            mp.setenv(key, value)
        mp.syspath_prepend(str(REPO / "scripts"))
        import bench_bundle

        return bench_bundle.main(list(args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """(results, out folder, work folder) of the tiny run, the reference trained by the script."""
    tmp = tmp_path_factory.mktemp("benchbundle")
    out, work = tmp / "out", tmp / "work"
    assert run_main(str(tmp / "reference"), "--train-reference", "--reference-epochs", "1",
                    "--reference-val-interval", "1", "--reference-seed", "7", "--channels", "4,8,16,32,64",
                    "--epochs", "1", "--val-interval", "1", "--seeds", str(SEED), "--train-cases", str(N_TRAIN),
                    "--val-cases", str(N_VAL), "--test-cases", str(N_TEST), "--df", "0.5", "--prune", "0.5",
                    "--scratch-epochs", "1", "--workdir", str(work), "--out", str(out)) == 0
    return json.loads((out / "results.json").read_text()), out, work


def rows(results):
    return {r["model"]: r for r in results["runs"]}


def test_four_rows_with_finite_dice_and_nsd_per_class(tiny):
    results, _, _ = tiny
    assert [r["model"] for r in results["runs"]] == ["original", "control", "compressed", "scratch"]
    for r in results["runs"]:
        for prefix in ("dice", "nsd1", "nsd3"):
            for name in (*CLASSES, "mean"):
                value = r["metrics"][f"{prefix}_{name}"]
                assert value is not None and math.isfinite(value) and 0 <= value <= 1, (r["model"], prefix, name)
        # MONAI's MeanDice in the bundle's evaluation scored the same label maps as medslim
        assert r["dice_monai_mean"] == pytest.approx(r["metrics"]["dice_mean"], abs=1e-5)
        assert r["metrics"]["nsd1_mean"] <= r["metrics"]["nsd3_mean"] + 1e-9  # a wider tolerance never scores less


def test_compressed_has_fewer_parameters_and_flops_than_the_original(tiny):
    from monai.bundle import ConfigParser

    from medslim.measure import count_parameters

    results, _, work = tiny
    sizes, by = results["sizes"], rows(results)
    assert sizes["compressed"]["params"] < sizes["original"]["params"]
    assert sizes["compressed"]["flops"] < sizes["original"]["flops"]
    # the original is counted as compress-bundle counts its "before"
    assert sizes["compressed"]["before"] == {k: sizes["original"][k] for k in ("params", "flops")}
    assert (by["control"]["params"], by["compressed"]["params"], by["scratch"]["params"]) == (
        sizes["original"]["params"], sizes["compressed"]["params"], sizes["compressed"]["params"])
    # the fine-tuned compressed bundle's own config rebuilds a network of that size
    parser = ConfigParser()
    parser.read_config(str(work / f"compressed_s{SEED}" / "configs" / "inference.json"))
    assert count_parameters(parser.get_parsed_content("network_def")) == sizes["compressed"]["params"]


def test_control_and_compressed_share_budget_seed_and_cases(tiny):
    results, _, work = tiny
    by = rows(results)
    control, compressed = by["control"], by["compressed"]
    for key in ("epochs", "val_interval", "seed", "train_cases", "val_cases", "test_cases", "kd_weight", "trained_by"):
        assert control[key] == compressed[key], key
    assert (control["epochs"], control["seed"], control["trained_by"]) == (1, SEED, "fine-tune")
    assert control["train_cases"] == SPLIT["folds"][0]["train"][:N_TRAIN]
    # checkpoint chosen on the validation cases: the bundle's CheckpointSaver wrote new weights
    assert control["val_cases"] == SPLIT["folds"][0]["val"][:N_VAL] and control["best_val_epoch"] == 1
    start = torch.load(work / "original" / "models" / "model.pt", weights_only=True)
    tuned = torch.load(work / f"control_s{SEED}" / "models" / "model.pt", weights_only=True)
    assert tuned.keys() == start.keys() and any(not torch.equal(tuned[k], start[k]) for k in start)
    for r in (control, compressed):
        assert "configs/finetune.json" in r["train_command"] and "distill.json" not in r["train_command"]
        assert "'$@val_datalist[:2]'" in r["train_command"] and "'$@test_datalist[:2]'" in r["evaluate_command"]
    assert sum("compress-bundle" in c for c in results["commands"]) == 1
    # the scratch control: the compressed bundle's train.json alone (no overlay loads weights), same cases
    scratch = by["scratch"]
    assert (scratch["trained_by"], scratch["epochs"], scratch["seed"]) == ("from scratch", 1, SEED)
    assert "configs/train.json" in scratch["train_command"] and "finetune.json" not in scratch["train_command"]
    assert (scratch["train_cases"], scratch["val_cases"]) == (control["train_cases"], control["val_cases"])
    start = torch.load(work / "compressed" / "models" / "model.pt", weights_only=True)
    trained = torch.load(work / f"scratch_s{SEED}" / "models" / "model.pt", weights_only=True)
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    assert results["config"]["seeds"] == [SEED] and results["config"]["epochs"] == 1


def test_test_cases_are_the_split_test_cases_and_never_trained_on(tiny):
    results, _, work = tiny
    test = SPLIT["test"][:N_TEST]
    assert results["cases"]["test"] == test
    never = set(SPLIT["folds"][0]["train"]) | set(SPLIT["folds"][0]["val"])
    assert not never & set(test)
    for r in results["runs"]:
        assert r["test_cases"] == test and sorted(r["per_case_dice"]) == sorted(test)
        assert not (set(r["train_cases"]) | set(r["val_cases"])) & set(test)
    for folder in ("original", f"control_s{SEED}", f"compressed_s{SEED}", f"scratch_s{SEED}"):
        saved = sorted(p.name for p in (work / folder / "eval" / "predictions").iterdir())
        assert saved == [f"{c}.nii.gz" for c in test]


def test_csv_agrees_with_json(tiny):
    results, out, _ = tiny
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results["runs"]) == 4
    for line, run in zip(table, results["runs"]):
        assert (line["model"], line["trained_by"]) == (run["model"], run["trained_by"])
        assert int(line["n_test_cases"]) == len(run["test_cases"]) == N_TEST
        assert int(line["params"]) == run["params"] and int(line["flops"]) == run["flops"]
        assert float(line["train_wall_s"]) == run["train_wall_s"] and int(line["seed"]) == run["seed"]
        for key, value in run["metrics"].items():
            assert float(line[key]) == value, key
    assert table[0]["kd_weight"] == "" and float(table[2]["kd_weight"]) == 0.0


def test_summary_numbers_are_the_json_numbers(tiny):
    results, out, _ = tiny
    text = (out / "summary.md").read_text()
    by, agg = rows(results), results["aggregate"]
    delta = by["compressed"]["metrics"]["dice_mean"] - by["control"]["metrics"]["dice_mean"]
    assert results["delta"]["dice_mean"]["per_seed"] == {str(SEED): delta}
    within = 100 * delta >= -1
    assert results["verdict"]["within"] is within
    assert f"is {'' if within else 'not '}within 1 pp Dice of the control (at most 1 pp below it)" in text
    assert f"of {100 * delta:+.2f} pp over 1 seed(s)" in text and "not a headline number" in text
    for model in ("control", "compressed", "scratch"):
        assert f"{agg[model]['dice_mean']['mean']:.4f}" in text
    ds = by["compressed"]["metrics"]["dice_mean"] - by["scratch"]["metrics"]["dice_mean"]
    assert results["delta_scratch"]["dice_mean"]["per_seed"] == {str(SEED): ds}
    assert f"trained from scratch (1 epoch(s))" in text and f"seed {SEED}: {100 * ds:+.2f})" in text
    assert f"it is higher on {int(ds > 0)} of 1 seed(s)" in text
    for r in results["runs"]:
        assert f"| {r['metrics']['nsd1_mean']:.4f} | {r['metrics']['nsd3_mean']:.4f} |" in text
    sizes = results["sizes"]
    assert f"{sizes['compressed']['params']:,} parameters against {sizes['original']['params']:,}" in text
    assert ", ".join(results["cases"]["test"]) in text
    # summary.md and results.csv are computed from results.json alone
    written = {name: (out / name).read_text() for name in ("summary.md", "results.csv")}
    for name in written:
        (out / name).unlink()
    assert run_main(str(out / "unused"), "--summary-only", "--out", str(out)) == 0
    assert {name: (out / name).read_text() for name in written} == written


def _runs(control: list[float], compressed: list[float], scratch: list[float] = ()) -> list[dict]:
    def row(model, seed, dice):
        return {"model": model, "seed": seed, "train_wall_s": 10.0 if seed is not None else None,
                "metrics": {"dice_mean": dice, "nsd1_mean": dice}}
    return ([row("original", None, 0.85)] + [row("control", s, d) for s, d in enumerate(control)]
            + [row("compressed", s, d) for s, d in enumerate(compressed)]
            + [row("scratch", s, d) for s, d in enumerate(scratch)])


def test_verdict_and_paired_differences_on_three_seeds():
    results = bench_report.compare(_runs([0.80, 0.82, 0.84], [0.795, 0.805, 0.835]))  # Δ -0.5, -1.5, -0.5 pp
    delta = results["delta"]["dice_mean"]
    assert delta["per_seed"] == pytest.approx({"0": -0.005, "1": -0.015, "2": -0.005})
    assert delta["mean"] == pytest.approx(-0.025 / 3) and delta["sd"] == pytest.approx(0.01 / 3 ** 0.5)
    assert results["aggregate"]["control"]["dice_mean"] == pytest.approx({"mean": 0.82, "sd": 0.02, "n": 3})
    assert results["verdict"] == {"metric": "dice_mean", "margin_pp": 1.0, "n_seeds": 3, "within": True,
                                  "seeds_within": 2, "headline": True}
    text = bench_report.verdict_text(results)
    assert text.startswith("The compressed bundle is within 1 pp Dice of the control (at most 1 pp below it): "
                           "its mean test Dice is "
                           "0.8117 ± 0.0208 against the control's 0.8200 ± 0.0200, a paired difference "
                           "(compressed − control) of -0.83 ± 0.58 pp over 3 seed(s)")
    assert "2 of 3 seed(s) are within" in text and "headline" not in text

    worse = bench_report.compare(_runs([0.80, 0.82, 0.84], [0.78, 0.80, 0.82]))
    assert not worse["verdict"]["within"] and worse["verdict"]["seeds_within"] == 0
    assert "is not within 1 pp" in bench_report.verdict_text(worse) and "-2.00 ± 0.00 pp" in bench_report.verdict_text(worse)
    two = bench_report.compare(_runs([0.80, 0.82], [0.80, 0.82]))
    assert two["verdict"]["within"] and not two["verdict"]["headline"]
    assert "With 2 seed(s) this is not a headline number" in bench_report.verdict_text(two)
    assert "scratch" not in two["aggregate"] and "delta_scratch" not in two


def test_paired_difference_against_the_scratch_control():
    results = bench_report.compare(_runs([0.80, 0.82, 0.84], [0.795, 0.805, 0.835], [0.70, 0.81, 0.85]))
    ds = results["delta_scratch"]["dice_mean"]
    assert ds["per_seed"] == pytest.approx({"0": 0.095, "1": -0.005, "2": -0.015})
    assert ds["mean"] == pytest.approx(0.025) and ds["n"] == 3
    assert results["aggregate"]["scratch"]["dice_mean"]["mean"] == pytest.approx(2.36 / 3)
    # the verdict is still against the control
    assert results["verdict"]["within"] and results["delta"]["dice_mean"]["mean"] == pytest.approx(-0.025 / 3)
    text = bench_report.verdict_text({**results, "config": {"scratch_epochs": 100}})
    assert "trained from scratch (100 epoch(s)), whose mean test Dice is 0.7867 ± 0.0777" in text
    assert "differs by +2.50 ± 6.08 pp (paired, compressed − scratch; seed 0: +9.50, seed 1: -0.50, seed 2: -1.50)" in text
    assert "it is higher on 1 of 3 seed(s)" in text


def test_settings_and_inputs_are_checked_before_any_work(tmp_path):
    with pytest.raises(MedslimError, match=r"--epochs \(3\) must be a positive multiple of --val-interval \(2\)"):
        bench.BenchConfig(epochs=3, val_interval=2, seeds=(0,))
    with pytest.raises(MedslimError, match="different seeds"):
        bench.BenchConfig(epochs=1, val_interval=1, seeds=(1, 1))
    with pytest.raises(MedslimError, match=r"--df must be in \(0, 1\]"):
        bench.BenchConfig(epochs=1, val_interval=1, seeds=(0,), df=2.0)
    with pytest.raises(MedslimError, match="needs calibration data"):
        bench.BenchConfig(epochs=1, val_interval=1, seeds=(0,), criterion="hvs_data")
    with pytest.raises(MedslimError, match=r"--scratch-epochs \(3\) must be 0 or a positive multiple"):
        bench.BenchConfig(epochs=2, val_interval=2, seeds=(0,), scratch_epochs=3)
    config = bench.BenchConfig(epochs=1, val_interval=1, seeds=(0,))
    with pytest.raises(MedslimError, match="not a trained bundle"):
        bench.run_benchmark(tmp_path, tmp_path / "work", config)
    (tmp_path / "work" / "old").mkdir(parents=True)
    with pytest.raises(MedslimError, match="is not empty"):
        bench.check_work(tmp_path / "work")
    assert bench.finetune_files("control", 1.0) == (["configs/train.json", "configs/finetune.json"], {})
    assert bench.finetune_files("compressed", 1.0) == (
        ["configs/train.json", "configs/finetune.json", "configs/distill.json"], {"medslim_kd_weight": 1.0})
    assert bench.finetune_files("scratch", 1.0) == (["configs/train.json"], {})
