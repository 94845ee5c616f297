"""``scripts/select_train_time_settings.py``: the validation-only choice of λ (SeReNe, LOBSTER)
and (λ_comp, ε) (DPRP) — the rule on hand-made rows, and a one-epoch run on real ``digits``
whose choices obey the rule and whose compression matches the models' parameters."""
from __future__ import annotations

import json

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def select(one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "scripts"))
        import select_train_time_settings

        return select_train_time_settings


def row(method, setting, val, compression, test=90.0):
    return {"method": method, "setting": setting, "n": 3, "val": (val, 0.5), "test": (test, 0.5),
            "compression": (compression, 1.0)}


def test_choice_is_the_most_compression_within_the_validation_drop(select):
    summary = [row("resnet32", "—", 98.0, 0.0), row("resnet20", "—", 97.0, 0.0),
               row("serene", "λ 0.001", 98.2, 0.1), row("serene", "λ 0.01", 97.1, 40.0),
               row("serene", "λ 0.03", 96.9, 70.0, test=99.0),  # 1.1 pp below: excluded despite its test score
               row("lobster", "λ 0.001", 95.0, 50.0),
               row("dprp", "λ_comp 0.5, ε 0.1", 96.0, 10.0), row("dprp", "λ_comp 8, ε 0.1", 95.9, 30.0)]
    chosen = select.choose(summary, val_drop=1.0)
    assert chosen["serene"]["setting"] == "λ 0.01"
    assert chosen["lobster"] is None
    assert chosen["dprp"]["setting"] == "λ_comp 0.5, ε 0.1"
    assert select.choose(summary, val_drop=1.2)["dprp"]["setting"] == "λ_comp 8, ε 0.1"
    text = select.render({"config": {"seeds": [0, 1, 2], "epochs": 30, "ft_epochs": 20, "tolerance": 0.05,
                                     "val_drop": 1.0}, "table": summary, "chosen": chosen, "reproduce": "x"})
    assert "lobster: no setting kept validation accuracy within 1 pp" in text
    assert "serene: chosen λ 0.01; compression 40.0 %" in text


def test_one_epoch_run_on_digits(select, tmp_path):
    assert select.main(["--seeds", "0", "--epochs", "1", "--ft-epochs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "selection.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 + sum(len(g) for g in result["grid"].values())
    base = {r["method"]: r for r in rows if r["method"].startswith("resnet")}
    for r in rows:
        if r["method"] in ("serene", "dprp"):  # structured: compression is the parameters removed
            ref = base["resnet32" if r["method"] == "serene" else "resnet20"]["params"]
            assert r["compression"] == pytest.approx(100 * (1 - r["params"] / ref))
    for method, ref in (("serene", "resnet32"), ("lobster", "resnet32"), ("dprp", "resnet20")):
        c = result["chosen"][method]
        tried = [t for t in result["table"] if t["method"] == method]
        baseline = next(t for t in result["table"] if t["method"] == ref)["val"][0]
        eligible = [t for t in tried if t["val"][0] >= baseline - 1.0]
        if c is None:
            assert not eligible
        else:
            assert c["val"][0] >= baseline - 1.0
            assert c["compression"][0] == max(t["compression"][0] for t in eligible)
    assert "settings chosen on validation" in (tmp_path / "selection.md").read_text()
