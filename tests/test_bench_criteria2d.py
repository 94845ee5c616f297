"""``scripts/bench_criteria2d.py``'s summary on hand-made cells: Δ vs the control of the same
seed, LOBSTER's compression as its zero weights, and the λ chosen on validation accuracy."""
from __future__ import annotations

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "scripts"))
        import bench_criteria2d

        return bench_criteria2d


def cell(method, seed, acc, val, params=(100, 100), ratio=None, lam=None, sparsity=None):
    return {"dataset": "breastmnist", "method": method, "ratio": ratio, "seed": seed, "reg_lambda": lam,
            "params": list(params), "accuracy_pruned": None, "accuracy": acc, "accuracy_val": val,
            "sparsity": sparsity}


def test_summary_chooses_lambda_on_validation_and_pairs_by_seed(bench):
    cells = []
    for seed, ctrl in ((0, 0.85), (1, 0.87)):
        cells += [cell("control", seed, ctrl, 0.88, ratio=0.0),
                  # SeReNe: λ 0.03 removes most but loses 3 pp validation; λ 0.01 is within 1 pp
                  cell("serene", seed, ctrl - 0.01, 0.875, params=(100, 80), lam=0.01),
                  cell("serene", seed, ctrl + 0.02, 0.85, params=(100, 40), lam=0.03),
                  cell("serene", seed, ctrl, 0.88, params=(100, 99), lam=0.001),
                  # LOBSTER is dense: its compression is its zero weights
                  cell("lobster", seed, ctrl - 0.05, 0.80, lam=0.001, sparsity=0.5)]
    cells_df, text = bench.summarise({"cells": cells, "settings": {"val_drop": 1.0}})
    serene = cells_df[(cells_df.method == "serene") & (cells_df.reg_lambda == 0.01)]
    assert serene.delta_control.tolist() == pytest.approx([-0.01, -0.01])
    assert serene.compression.tolist() == pytest.approx([0.2, 0.2])
    assert cells_df[cells_df.method == "lobster"].compression.tolist() == pytest.approx([0.5, 0.5])
    assert "| serene | λ 0.01 (chosen) | 20.0 |" in text
    assert "λ 0.03 (chosen)" not in text
    assert "- lobster: no λ kept validation accuracy within 1 pp of the control." in text
    _, looser = bench.summarise({"cells": cells, "settings": {"val_drop": 3.5}})
    assert "| serene | λ 0.03 (chosen) | 60.0 |" in looser


def test_vs_hvs_exceeds_only_when_a_paired_t_test_says_so(bench):
    cells = []
    for seed, (consistent, noisy) in enumerate(((0.05, 0.05), (0.06, -0.04), (0.04, 0.06))):
        cells += [cell("control", seed, 0.80, 0.80, ratio=0.0), cell("hvs", seed, 0.80, 0.80, ratio=0.3),
                  cell("nisp", seed, 0.80 + consistent, 0.80, ratio=0.3),  # +5 ± 0.58 pp: t = 8.7
                  cell("l1", seed, 0.80 + noisy, 0.80, ratio=0.3)]  # +2.3 ± 3.2 pp: t = 0.7
    _, text = bench.summarise({"cells": cells})
    assert "| nisp | ρ 0.3 | 0.0 | — | 85.0 ± 1.0 | +5.0 ± 1.0 | +5.0 ± 0.6 (exceeds) | 3 |" in text
    assert "| l1 | ρ 0.3 | 0.0 | — | 82.3 ± 5.5 | +2.3 ± 5.5 | +2.3 ± 3.2 | 3 |" in text
