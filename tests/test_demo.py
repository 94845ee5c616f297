"""``medslim demo``, the README's first command: the embedded reference model, compressed
before fine-tuning, and the embedded compressed + fine-tuned model on the demo cases."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from medslim.api import COMPRESSED_MODEL, run_demo
from medslim.cli import app


def test_demo_scores_original_compressed_and_finetuned(tmp_path):
    report = run_demo(tmp_path / "out")
    rows = {r["model"].split(" ")[0]: r for r in report["demo"]["models"]}
    assert len(report["demo"]["cases"]) == 5
    original = rows["original"]
    before = next(r for r in report["demo"]["models"] if "before fine-tuning" in r["model"])
    assert original["params"] == report["params"]["original"] and before["params"] == report["params"]["compressed"]
    assert original["dice"] > 0.8 and before["dice"] < original["dice"]
    assert (tmp_path / "out" / "fold_0" / "checkpoint_final.pth").is_file()
    if COMPRESSED_MODEL.is_dir():
        provenance = json.loads((COMPRESSED_MODEL / "provenance.json").read_text())
        finetuned = report["demo"]["models"][2]
        assert finetuned["params"] * 10 <= original["params"]
        assert finetuned["params"] == provenance["params"]
        # the fine-tune recovers what compression lost on these unseen cases
        assert finetuned["dice"] > before["dice"] + 0.05 and finetuned["dice"] > original["dice"] - 0.03


def test_demo_cli_prints_the_comparison_table(tmp_path):
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "before fine-tuning" in result.output and "NSD @1 mm" in result.output
