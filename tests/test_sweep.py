"""``medslim sweep`` on the real reference model and Hippocampus data, with tiny budgets:
cells and controls from a grid, resuming without recomputing, a failing cell recorded while
the others complete, Ray execution, and the report over the result."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medslim.cli import app
from medslim.errors import MedslimError
from medslim.finetune.hippocampus import DATASET
from medslim.sweep import expand, load_sweep, run_sweep
from medslim.sweep.cell import train_cell
from medslim.sweep.runner import matches

runner = CliRunner()


def sweep_file(tmp_path: Path, work: Path, **overrides) -> Path:
    raw = work / "nnUNet_raw" / DATASET
    spec = {"name": "smoke", "model": "default",
            "data": {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                     "test_images": str(raw / "imagesTsLabeled"), "test_labels": str(raw / "labelsTsLabeled")},
            "finetune": {"schedule": "nnunet", "epochs": 1, "iterations": 2, "val_iterations": 1},
            "seeds": [7], "grid": {"df": [0.3], "prune_ratio": [0.5], "kd_weight": [1.0]},
            "controls": ["original", "control"], "evaluate": {"max_cases": 2}}
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Counting:
    """The real trainer, counting its calls; ``fail`` names cells that raise instead."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, cell, ctx, out):
        self.calls.append(cell.id)
        if any(f in cell.id for f in self.fail):
            raise MedslimError("injected failure\nsecond line")
        return train_cell(cell, ctx, out)


def test_grid_expands_to_cells_with_every_control(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, tmp_path, seeds=[1, 2], grid={"df": [0.3, 0.5], "kd_weight": [0.0, 1.0]},
                                 controls=["original", "control", "scratch", "scratch_full"], full_updates=40))
    cells = expand(spec)
    kinds = [c.kind for c in cells]
    # 1 original; per seed: 2 controls (one per kd_weight), 4 compressed, 4 scratch, 4 scratch_full
    assert kinds.count("original") == 1 and kinds.count("control") == 4
    assert kinds.count("compressed") == kinds.count("scratch") == kinds.count("scratch_full") == 8
    assert len({c.id for c in cells}) == len(cells)
    full = next(c for c in cells if c.kind == "scratch_full")
    assert full.settings["init"] == "scratch" and full.settings["epochs"] * full.settings["iterations"] == 40
    control = next(c for c in cells if c.kind == "control" and c.seed == 2 and "kd_weight-1.0" in c.id)
    assert control.settings["compress"] is False and control.settings["kd_weight"] == 1.0
    assert "df" not in control.settings  # the control's fine-tune is the grid point's, minus compression


def test_variants_are_merged_into_every_grid_point(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, tmp_path, grid={"kd_weight": [0.0, 1.0]}, controls=["control"],
                                 variants=[{"df": 0.25, "prune_ratio": 0.5},
                                           {"rank_policy": "budget", "budget": 0.08, "prune_ratio": 0.0}]))
    compressed = [c for c in expand(spec) if c.kind == "compressed"]
    assert len(compressed) == 4
    budget = [c for c in compressed if c.settings.get("rank_policy") == "budget"]
    assert len(budget) == 2 and all("df" not in c.settings and c.method.startswith("tucker+budget") for c in budget)
    assert "compressed__kd_weight-1.0__rank_policy-budget__budget-0.08__prune_ratio-0.0__s7" in {c.id for c in budget}
    assert sorted(c.id for c in expand(spec) if c.kind == "control") == ["control__kd_weight-0.0__s7",
                                                                          "control__kd_weight-1.0__s7"]


def test_methods_that_compress_while_training_keep_compress_off_and_share_the_plain_control(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, tmp_path, controls=["control", "scratch"], grid={"kd_weight": [0.0]},
                                 variants=[{"df": 0.25, "prune_ratio": 0.5},
                                           {"compress": False, "regularizer": "serene", "reg_lambda": 0.01},
                                           {"compress": False, "dprp": True}]))
    cells = expand(spec)
    by_method = {c.method: c for c in cells if c.kind == "compressed"}
    assert set(by_method) == {"hvs", "serene", "dprp"}
    assert by_method["serene"].settings["compress"] is False and by_method["hvs"].settings["compress"] is True
    controls = [c for c in cells if c.kind == "control"]
    assert [c.id for c in controls] == ["control__kd_weight-0.0__s7"]  # one plain fine-tune for all three
    assert "regularizer" not in controls[0].settings and "dprp" not in controls[0].settings
    assert [c.kind for c in cells].count("scratch") == 1  # only the method whose architecture is known


@pytest.mark.parametrize("overrides, message", [
    ({"grid": {"criterion": ["hvs", "magic"]}}, "unknown criterion 'magic'"),
    ({"grid": {"df": [0.3, 1.5]}}, "--df must be in (0, 1]"),
    ({"controls": ["teacher"]}, "unknown control(s) teacher"),
    ({"variants": [{"budget": 2.0, "rank_policy": "budget"}]}, "--budget must be in (0, 1]"),
    ({"variants": {"df": 0.3}}, "'variants' must be a list of mappings"),
    ({"learning_rate": 1}, "unknown key(s) learning_rate"),
    ({"finetune": {"optimiser": "sgd"}}, "unknown key(s) optimiser"),
])
def test_bad_sweep_fails_before_any_work(tmp_path, overrides, message):
    path = sweep_file(tmp_path, tmp_path, **overrides)
    result = runner.invoke(app, ["sweep", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_only_selects_whole_parts_of_cell_ids():
    ids = ["original", "control__s1", "control__s12345", "compressed__df-0.25__criterion-hvs__s1",
           "compressed__df-0.25__criterion-hvs_data__s1", "compressed__df-0.25__criterion-hvs__s2"]
    pick = lambda pattern: [i for i in ids if matches(i, pattern)]  # noqa: E731
    assert pick("control__s1") == ["control__s1"]  # not the seed-12345 control
    assert pick("__s2") == ["compressed__df-0.25__criterion-hvs__s2"]
    assert pick("criterion-hvs__s1") == ["compressed__df-0.25__criterion-hvs__s1"]
    assert pick("df-0.25") == ids[3:] and pick("df-0.2") == [] and pick("original") == ["original"]
    assert pick("") == [] and pick("__") == []


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_recomputing(tmp_path, hippocampus_nnunet):
    work, _ = hippocampus_nnunet
    spec = load_sweep(sweep_file(tmp_path, work))
    out = tmp_path / "sweep"
    first = Counting()
    run_sweep(spec, out, executor="local", max_cells=2, train=first)  # "interrupted" after 2 of 3 cells
    assert len(first.calls) == 1  # the original is only evaluated
    second = Counting()
    summary = run_sweep(spec, out, executor="local", train=second)
    assert len(second.calls) == 1 and second.calls[0] not in first.calls
    assert summary["finished_before"] == 2 and not summary["failed"]
    third = Counting()
    run_sweep(spec, out, executor="local", train=third)
    assert third.calls == []

    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("*/result.json")}
    assert len(results) == 3
    comp = next(r for r in results.values() if r["cell"]["kind"] == "compressed")
    orig = next(r for r in results.values() if r["cell"]["kind"] == "original")
    assert comp["ratio_params"] > 5 and orig["ratio_params"] == 1 and comp["updates"] == 2
    for r in results.values():
        for split in ("val", "test"):
            m = r["metrics"][split]
            assert len(m["cases"]) == 2 and 0 <= m["dice"] <= 1 and 0 <= m["nsd1"] <= m["nsd3"] <= 1
    # compressed before fine-tuning is scored too, and the per-layer table names real ranks
    assert comp["before_finetune"]["test"]["dice"] < orig["metrics"]["test"]["dice"]
    assert comp["layers"] and all(row["kept"] <= row["channels_out"] for row in comp["layers"])

    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    md = (out / "report.md").read_text()
    assert all(cell_id in md for cell_id in results)


@pytest.mark.slow
def test_stopped_cell_goes_on_from_its_last_checkpoint(tmp_path, hippocampus_nnunet):
    import torch

    from medslim.sweep.data import prepare

    work, _ = hippocampus_nnunet
    finetune = {"schedule": "nnunet", "epochs": 2, "iterations": 2, "val_iterations": 1, "save_every": 1}
    spec = load_sweep(sweep_file(tmp_path, work, finetune=finetune, grid={"df": [0.3]}, controls=[]))
    ctx = prepare(spec, tmp_path / "sweep")
    cell = next(c for c in expand(spec) if c.kind == "compressed")
    out = tmp_path / "cell"
    out.mkdir()
    first = train_cell(cell, ctx, out)
    fold = Path(first["folder"]) / "fold_0"
    assert first["resumed_at_epoch"] is None
    # leave the files a run stopped after its first epoch leaves: checkpoint_latest.pth at epoch 1
    saved = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    saved["current_epoch"] = 1
    saved["logging"] = {k: v[:1] for k, v in saved["logging"].items()}
    torch.save(saved, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    second = train_cell(cell, ctx, out)
    assert second["resumed_at_epoch"] == 1
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and len(final["logging"]["epoch_end_timestamps"]) == 2
    assert second["train_seconds"] > saved["logging"]["epoch_end_timestamps"][0] - saved["logging"]["epoch_start_timestamps"][0]
    assert (out / "train.log").read_text().count("Epoch 0") == 1  # one log, the first attempt kept
    # another definition of the cell starts again instead of mixing two runs
    changed = dataclasses.replace(cell, settings={**cell.settings, "lr": cell.settings.get("lr", 0.01) / 2})
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")
    assert train_cell(changed, ctx, out)["resumed_at_epoch"] is None


def test_only_runs_whose_state_the_checkpoints_hold_can_continue():
    from medslim.finetune.config import config_from_dict

    assert config_from_dict({"df": 0.3}, "t").can_continue
    assert config_from_dict({"compress": False, "kd_weight": 1.0}, "t").can_continue
    for settings in ({"compress": False, "regularizer": "serene"}, {"compress": False, "dprp": True},
                     {"df": 0.3, "epochs": 4, "steps": 2}):
        assert not config_from_dict(settings, "t").can_continue, settings


@pytest.mark.slow
def test_failing_cell_is_recorded_and_the_others_complete(tmp_path, hippocampus_nnunet):
    work, _ = hippocampus_nnunet
    spec = load_sweep(sweep_file(tmp_path, work))
    out = tmp_path / "sweep"
    counting = Counting(fail=("control",))
    summary = run_sweep(spec, out, executor="local", train=counting)
    failed = [c for c in summary["failed"]]
    assert len(failed) == 1 and failed[0].startswith("control")
    error = json.loads((out / "cells" / failed[0] / "error.json").read_text())
    assert error["error"] == "injected failure" and "Traceback" in error["traceback"]
    assert not (out / "cells" / failed[0] / "result.json").exists()
    assert len(list((out / "cells").glob("*/result.json"))) == 2  # original and compressed finished


@pytest.mark.slow
def test_sweep_runs_cells_as_ray_tasks_and_skips_finished_ones(tmp_path, hippocampus_nnunet):
    work, _ = hippocampus_nnunet
    path = sweep_file(tmp_path, work, controls=["original"], grid={"df": [0.3]}, seeds=[3])
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(path), "-o", str(out), "--only", "original"])
    assert result.exit_code == 0, result.output
    assert "1 cell(s) run, 0 finished before, 0 failed" in result.output
    assert json.loads((out / "cells" / "original" / "result.json").read_text())["status"] == "ok"
    again = runner.invoke(app, ["sweep", str(path), "-o", str(out), "--dry-run"])
    assert "finished  original" in again.output and "pending   compressed__df-0.3__s3" in again.output
    only = runner.invoke(app, ["sweep", str(path), "-o", str(out), "--dry-run", "--only", "original"])
    assert "left out  compressed__df-0.3__s3" in only.output and "finished  original" in only.output
    assert "2 cells, 0 to run" in only.output
