"""``medslim report``: a synthetic sweep folder (numbers from a seeded RNG) gives report.md and a
self-contained report.html that hold every figure they name, one table row per cell / group,
paired Δ equal to the hand-computed ones, the right Pareto set and the failed cell's error; bad
input is one line and exit code 2. The tests check the renderer, not results."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as scipy_t
from typer.testing import CliRunner

from medslim.cli import app
from medslim.errors import MedslimError
from medslim.report import write_report
from medslim.report.load import (cell_row, group_summary, match_baselines, match_controls, method_comparison,
                                 paired_deltas, pareto_mask, read_sweep)

PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
FINETUNE = {"optimizer": "adam", "lr": 1e-4, "epochs": 4, "iterations": 50}
ERROR = "RuntimeError: out of memory | in stage 3"
LAYERS = [{"name": f"encoder.stages.{i}.0.convs.0.conv", "rank_in": 2 + i, "rank_out": 4 + i, "channels_in": 8,
           "channels_out": 16, "kept": 8 if i else None} for i in range(5)]


def write_cell(root: Path, cid: str, kind: str, group: str, method: str, seed: int, rng: np.random.Generator | None,
               ratio: float = 1.0, layers: list | None = None, error: str | None = None, **settings) -> dict:
    """Write ``cells/<cid>/`` (cell.json, then result.json from ``rng``, or error.json, or nothing
    = pending); returns the result (or the cell definition)."""
    folder = root / "cells" / cid
    folder.mkdir(parents=True)
    cell = {"id": cid, "kind": kind, "group": group, "method": method, "seed": seed,
            "settings": {**FINETUNE, **settings}}
    (folder / "cell.json").write_text(json.dumps(cell))
    if error is not None:
        (folder / "error.json").write_text(json.dumps({"cell": cell, "status": "failed", "error": error,
                                                       "traceback": "Traceback ...\nline 2"}))
        return cell
    if rng is None:
        return cell

    def scores() -> dict:
        per_class = {str(c): {m: float(rng.uniform(0.7, 1.0)) for m in ("dice", "nsd1", "nsd3")} for c in (1, 2)}
        return {"cases": ["hippocampus_001", "hippocampus_002"], "per_class": per_class,
                **{m: float(np.mean([v[m] for v in per_class.values()])) for m in ("dice", "nsd1", "nsd3")}}

    result = {"cell": cell, "status": "ok", "params": int(1.4e6 / ratio), "flops": 1e10 / ratio,
              "params_original": 1400000, "flops_original": 1e10, "ratio_params": ratio, "ratio_flops": ratio * 0.9,
              "updates": 0 if kind == "original" else 200, "train_seconds": float(rng.uniform(100, 2000)),
              "cpu_seconds": 2000.0, "metrics": {"val": scores(), "test": scores()},
              "before_finetune": None, "layers": layers or []}
    (folder / "result.json").write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict]:
    """Original, control ×3 seeds, hvs and consumer_l1 ×3 seeds, one scratch, one failed, one
    pending: ``(folder, {cell id: result})``."""
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(1234)
    (root / "sweep.json").write_text(json.dumps({"name": "unit <sweep>", "grid": {"df": [0.3, 0.5]},
                                                  "finetune": FINETUNE, "seeds": list(SEEDS)}))
    res = {"original": write_cell(root, "original", "original", "original", "original", 0, rng, optimizer=None,
                                  lr=None, epochs=None, iterations=None)}
    for s in SEEDS:
        res[f"control_s{s}"] = write_cell(root, f"control_s{s}", "control", "control", "control", s, rng)
        res[f"hvs_s{s}"] = write_cell(root, f"hvs_s{s}", "compressed", "df0.3_p0.5_hvs", "hvs", s, rng, ratio=10.0,
                                      layers=LAYERS, df=0.3, prune_ratio=0.5)
        res[f"l1_s{s}"] = write_cell(root, f"l1_s{s}", "compressed", "df0.5_p0.3_l1", "consumer_l1", s, rng,
                                     ratio=4.0, layers=LAYERS[:3], df=0.5, prune_ratio=0.3)
    res["scratch_s0"] = write_cell(root, "scratch_s0", "scratch", "scratch_df0.3", "scratch", 0, rng, ratio=10.0)
    res["scratch_s0"]["resumed_at_epoch"] = 12  # stopped and continued from its checkpoint
    (root / "cells" / "scratch_s0" / "result.json").write_text(json.dumps(res["scratch_s0"]))
    write_cell(root, "failed_s0", "compressed", "df0.1_p0.9_hvs", "hvs", 0, None, ratio=50.0, error=ERROR)
    write_cell(root, "pending_s0", "compressed", "df0.9_p0.0_hvs", "hvs", 0, None)
    return root, res


@pytest.fixture(scope="module")
def written(sweep) -> dict[str, Path]:
    return write_report(sweep[0])


# --- parsing the outputs -----------------------------------------------------------------------

def md_sections(text: str) -> dict[str, list[list[str]]]:
    """Heading → the Markdown tables below it (each a list of body rows, without header and rule)."""
    sections: dict[str, list[list[str]]] = {}
    heading, table = "", None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, table = line.lstrip("#").strip(), None
            sections[heading] = []
        elif line.startswith("|"):
            if table is None:
                table = []
                sections[heading].append(table)
            table.append(line)
        else:
            table = None
    return {h: [t[2:] for t in tables] for h, tables in sections.items()}


class HtmlOutline(HTMLParser):
    """Headings → body-row counts of the tables below them; every ``<img src>``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[int]] = {}
        self.images: list[str] = []
        self.heading, self._in_heading, self._in_body = "", False, False

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "h3"):
            self._in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables.setdefault(self.heading, []).append(0)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[self.heading][-1] += 1
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3"):
            self._in_heading = False
            self.tables.setdefault(self.heading, [])
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data


def html_outline(path: Path) -> HtmlOutline:
    parser = HtmlOutline()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# --- the report holds every figure it names ---------------------------------------------------------

def test_every_figure_named_exists(written):
    md = written["markdown"].read_text(encoding="utf-8")
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(names) == 4  # 2 Pareto + 2 compressed groups' layers
    for name in names:
        path = written["markdown"].parent / name
        assert path.is_file() and path.read_bytes().startswith(PNG), name
    assert sorted(p.name for p in written["figures"].iterdir()) == sorted(Path(n).name for n in names)

    images = html_outline(written["html"]).images
    assert len(images) == len(names)
    for src in images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
    assert "report_figures" not in written["html"].read_text(encoding="utf-8")  # self-contained
    assert not list(written["markdown"].parent.glob(".report*tmp-*")), "temporary file left behind"


def test_table_rows_match_cells_and_groups(sweep, written):
    cells, groups = 13, 7  # original, control, 2 compressed, scratch, failed, pending groups
    md = md_sections(written["markdown"].read_text(encoding="utf-8"))
    html = html_outline(written["html"]).tables
    expected = {"Cells": [cells], "Summary per group (test)": [groups], "Summary per group (validation)": [groups],
                "Methods against hvs, paired by seed (test)": [1],
                "Methods against hvs, paired by seed (validation)": [1],
                "Per-class results (test, mean over seeds)": [5],  # the groups with a finished cell
                "df0.3_p0.5_hvs": [5], "df0.5_p0.3_l1": [3],  # one row per layer
                "Failed cells": [1]}
    for heading, rows in expected.items():
        assert [len(t) for t in md[heading]] == rows, heading
        assert html[heading] == rows, heading
    assert "Sweep report: unit <sweep>" in md and "Sweep report: unit <sweep>" in html
    cell_ids = [row.split("|")[1].strip() for row in md["Cells"][0]]
    assert sorted(cell_ids) == sorted(p.name for p in (sweep[0] / "cells").iterdir())


def test_header_failed_error_and_pending(written):
    md = written["markdown"].read_text(encoding="utf-8")
    assert "13 cells: 11 ok, 1 failed, 1 pending. Seeds: 0, 1, 2." in md
    assert ERROR.replace("|", "\\|") in md
    page = written["html"].read_text(encoding="utf-8")
    assert "RuntimeError: out of memory | in stage 3" in page and "Traceback" not in page
    pending = next(r for r in md_sections(md)["Cells"][0] if r.startswith("| pending_s0 "))
    assert "| pending |" in pending
    resumed = [r for r in md_sections(md)["Cells"][0] if "(resumed at epoch" in r]
    assert len(resumed) == 1 and resumed[0].startswith("| scratch_s0 ") and "(resumed at epoch 12)" in resumed[0]


# --- the numbers ---------------------------------------------------------------------------------

def test_paired_delta_equals_hand_computed(sweep, written):
    _, res = sweep
    test = {k: v["metrics"]["test"] for k, v in res.items()}
    deltas = {m: [test[f"hvs_s{s}"][m] - test[f"control_s{s}"][m] for s in SEEDS] for m in ("dice", "nsd1")}
    groups = group_summary(paired_deltas(read_sweep(sweep[0]).cells)).set_index("group")
    row = groups.loc["df0.3_p0.5_hvs"]
    for m, d in deltas.items():
        assert row[f"d_test_{m}_mean"] == pytest.approx(np.mean(d), abs=1e-12)
        assert row[f"d_test_{m}_std"] == pytest.approx(np.std(d, ddof=1), abs=1e-12)
    assert row["n_seeds"] == 3
    within = bool(np.mean(deltas["dice"]) >= -0.01 and np.mean(deltas["nsd1"]) >= -0.01)
    assert row["within_test"] is within
    # the rendered summary row says the same
    summary = md_sections(written["markdown"].read_text(encoding="utf-8"))["Summary per group (test)"][0]
    cols = [c.strip() for c in next(r for r in summary if r.startswith("| df0.3_p0.5_hvs ")).split("|")[1:-1]]
    assert cols[8] == f"{100 * np.mean(deltas['dice']):+.2f} ± {100 * np.std(deltas['dice'], ddof=1):.2f}"
    assert cols[10] == ("yes" if within else "no")
    # a single-seed group: the Δ of that seed, no std
    scratch = groups.loc["scratch_df0.3"]
    assert scratch["d_test_dice_mean"] == pytest.approx(test["scratch_s0"]["dice"] - test["control_s0"]["dice"])
    assert np.isnan(scratch["d_test_dice_std"])


def test_control_matches_seed_and_finetune_settings():
    def row(cid, kind, seed, **settings):
        cell = {"id": cid, "kind": kind, "group": cid, "method": kind, "seed": seed,
                "settings": {**FINETUNE, **settings}}
        return cell_row(cell, {"metrics": {"test": {"dice": 0.5}}}, None)

    cells = pd.DataFrame([row("ctl_a", "control", 0), row("ctl_b", "control", 0, lr=1e-5),
                          row("ctl_c", "control", 1, kd_weight=0.5),
                          row("x", "compressed", 0, lr=1e-5, df=0.3),  # same fine-tune as ctl_b
                          row("y", "compressed", 0, lr=3e-3),  # no control with its fine-tune: none
                          row("z", "compressed", 1, kd_weight=0.5), row("w", "compressed", 7),
                          row("v", "compressed", 1)])  # seed 1's control has another fine-tune: none
    assert match_controls(cells).tolist() == ["ctl_a", "ctl_b", "ctl_c", "ctl_b", None, "ctl_c", None, None]


def test_methods_against_hvs_equal_hand_computed_paired_t(sweep, written):
    _, res = sweep
    for split, label in (("test", "test"), ("val", "validation")):
        scores = {k: v["metrics"][split] for k, v in res.items()}
        row = method_comparison(read_sweep(sweep[0]).cells, "hvs", split).set_index("group").loc["df0.5_p0.3_l1"]
        assert row["baseline"] == "df0.3_p0.5_hvs" and row["n_pairs"] == 3 and row["seeds"] == list(SEEDS)
        rendered = next(r for r in md_sections(written["markdown"].read_text(encoding="utf-8"))[
            f"Methods against hvs, paired by seed ({label})"][0])
        cols = [c.strip() for c in rendered.split("|")[1:-1]]
        for i, m in enumerate(("dice", "nsd1")):
            d = np.array([scores[f"l1_s{s}"][m] - scores[f"hvs_s{s}"][m] for s in SEEDS])
            t_stat = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
            p = 2 * float(scipy_t.sf(abs(t_stat), df=len(d) - 1))
            assert row[f"d_{m}_mean"] == pytest.approx(d.mean(), abs=1e-12)
            assert row[f"d_{m}_std"] == pytest.approx(d.std(ddof=1), abs=1e-12)
            assert row[f"p_{m}"] == pytest.approx(p, rel=1e-9)
            verdict = ("higher" if d.mean() > 0 else "lower") if p < 0.05 else "not told apart"
            assert row[f"verdict_{m}"] == verdict
            assert cols[5 + 3 * i] == f"{100 * d.mean():+.2f} ± {100 * d.std(ddof=1):.2f}"
            assert cols[6 + 3 * i] == f"{p:.3f}" and cols[7 + 3 * i] == verdict


def test_baseline_matches_seed_finetune_and_closest_ratio():
    def row(cid, method, seed, ratio, status="ok", kind="compressed", **settings):
        cell = {"id": cid, "kind": kind, "group": cid, "method": method, "seed": seed,
                "settings": {**FINETUNE, **settings}}
        result = {"ratio_params": ratio, "metrics": {"test": {"dice": 0.5, "nsd1": 0.6}}} if status == "ok" else None
        return cell_row(cell, result, None)

    cells = pd.DataFrame([row("h10", "hvs", 0, 10.0), row("h20", "hvs", 0, 20.0), row("h_lr", "hvs", 1, 10.0, lr=1e-5),
                          row("h_pending", "hvs", 2, 10.0, status="pending"),
                          row("a", "nisp", 0, 18.0),  # closest ratio: h20
                          row("b", "nisp", 0, 11.0),  # h10
                          row("c", "nisp", 1, 10.0),  # seed 1's hvs has another fine-tune: none
                          row("d", "nisp", 1, 10.0, lr=1e-5),  # h_lr
                          row("e", "nisp", 2, 10.0),  # seed 2's hvs is not finished: none
                          row("f", "control", 0, 1.0, kind="control")])  # not compressed: none
    assert match_baselines(cells, "hvs").tolist() == [None, None, None, None, "h20", "h10", None, "h_lr", None, None]
    one = method_comparison(cells, "hvs").set_index("group")
    assert set(one.index) == {"a", "b", "d"} and (one["verdict_dice"] == "not told apart").all()  # one pair each
    assert one["p_dice"].isna().all() and one["d_dice_std"].isna().all()
    assert method_comparison(cells, "taylor").empty


def test_no_against_section_when_disabled(sweep, tmp_path):
    md = write_report(sweep[0], tmp_path / "none", against=None)["markdown"].read_text(encoding="utf-8")
    assert "Methods against" not in md and "Summary per group (test)" in md
    cli = CliRunner().invoke(app, ["report", str(sweep[0]), "-o", str(tmp_path / "cli"), "--against", "consumer_l1"])
    assert cli.exit_code == 0, cli.output
    sections = md_sections((tmp_path / "cli" / "report.md").read_text(encoding="utf-8"))
    rows = sections["Methods against consumer_l1, paired by seed (test)"][0]
    assert [r.split("|")[1].strip() for r in rows] == ["df0.3_p0.5_hvs"]


def test_pareto_mask_constructed_case():
    ratio = [1.0, 5.0, 10.0, 10.0, 2.0, 20.0, 3.0, np.nan, 2.0]
    dice = [0.90, 0.85, 0.86, 0.80, 0.89, 0.50, 0.89, 0.99, 0.89]
    # (5, .85) and (10, .80) are dominated by (10, .86); (2, .89) twice by (3, .89); NaN never optimal
    assert pareto_mask(ratio, dice).tolist() == [True, False, True, False, False, True, True, False, False]


def test_pareto_table_lists_the_front(sweep, written):
    groups = group_summary(paired_deltas(read_sweep(sweep[0]).cells))
    done = groups[groups["n_seeds"] > 0]
    expected = set(done.loc[pareto_mask(done["ratio_params"], done["test_dice_mean"]), "group"])
    rows = md_sections(written["markdown"].read_text(encoding="utf-8"))["Pareto front"][0]
    assert {r.split("|")[1].strip() for r in rows} == expected
    assert html_outline(written["html"]).tables["Pareto front"] == [len(expected)]


# --- bad input, empty sweeps, the CLI ------------------------------------------------------------

def test_no_finished_cells_still_writes_a_report(tmp_path):
    root = tmp_path / "sweep"
    write_cell(root, "a", "control", "control", "control", 0, None)
    write_cell(root, "b", "compressed", "g", "hvs", 0, None, error="ValueError: bad rank")
    out = write_report(root, tmp_path / "out")
    md = out["markdown"].read_text(encoding="utf-8")
    assert "No cell has finished yet" in md and "ValueError: bad rank" in md
    assert out["html"].is_file() and list(out["figures"].iterdir()) == []
    empty = tmp_path / "empty"
    (empty / "cells").mkdir(parents=True)
    assert "The sweep has no cells yet." in write_report(empty)["markdown"].read_text(encoding="utf-8")


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("no_cells", "has no cells/ folder"),
    ("bad_json", "cells/c/result.json: invalid JSON"),
    ("missing_key", "cells/c/cell.json: missing key(s) 'group'"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, match):
    root = tmp_path / "sweep"
    if case != "missing":
        root.mkdir()
    if case in ("bad_json", "missing_key"):
        write_cell(root, "c", "control", "control", "control", 0, np.random.default_rng(0))
    if case == "bad_json":
        (root / "cells" / "c" / "result.json").write_text('{"status": "ok", ')
    if case == "missing_key":
        cell = json.loads((root / "cells" / "c" / "cell.json").read_text())
        (root / "cells" / "c" / "cell.json").write_text(json.dumps({k: v for k, v in cell.items() if k != "group"}))
    with pytest.raises(MedslimError, match=re.escape(match)):
        write_report(root)
    assert not (root / "report.md").exists()


def test_cli(sweep, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(sweep[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    bad = CliRunner().invoke(app, ["report", "/nonexistent"])
    assert bad.exit_code == 2, bad.output
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/nonexistent" in lines[0] and "Traceback" not in bad.output


def test_restore_fills_lost_cells_from_an_earlier_cells_csv(sweep, written, tmp_path):
    import shutil

    root = tmp_path / "lost"
    shutil.copytree(sweep[0], root)
    lost = ["hvs_s1", "control_s2"]
    for cid in lost:
        (root / "cells" / cid / "result.json").unlink()  # the cell is pending again, its cell.json kept
    assert read_sweep(root).counts()["pending"] == 3
    out = write_report(root, tmp_path / "out", restore=written["cells"])
    before, after = (pd.read_csv(p).set_index("id") for p in (written["cells"], out["cells"]))
    numbers = ["params", "ratio_params", "test_dice", "test_nsd1", "val_dice", "d_test_dice", "d_val_nsd1"]
    pd.testing.assert_frame_equal(after.loc[before.index, numbers], before[numbers])  # Δ recomputed identically
    assert sorted(after.index[after["restored"]]) == sorted(lost)
    groups_before, groups_after = (pd.read_csv(p).set_index("group") for p in (written["groups"], out["groups"]))
    cols = ["n_seeds", "test_dice_mean", "test_dice_std", "d_test_nsd1_mean"]
    pd.testing.assert_frame_equal(groups_after[cols], groups_before[cols])
    md = out["markdown"].read_text(encoding="utf-8")
    assert "2 of the ok cells were not in this folder" in md and "control_s2" in md
    assert read_sweep(root).counts()["pending"] == 3  # the sweep folder itself is not changed


def test_restore_refuses_a_csv_of_another_sweep(sweep, written, tmp_path):
    other = pd.read_csv(written["cells"])
    other.loc[other["id"] == "pending_s0", ["status", "seed"]] = ["ok", 7]
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(MedslimError, match="cell pending_s0 has seed 7 there but 0"):
        write_report(sweep[0], tmp_path / "o1", restore=tmp_path / "other.csv")
    (tmp_path / "bad.csv").write_text("id,status\nx,ok\n")
    cli = CliRunner().invoke(app, ["report", str(sweep[0]), "-o", str(tmp_path / "o2"),
                                   "--restore", str(tmp_path / "bad.csv")])
    assert cli.exit_code == 2 and "not a cells.csv of medslim report" in cli.stderr, cli.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
