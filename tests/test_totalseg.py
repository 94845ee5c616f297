"""The same compression on TotalSegmentator's 3 mm architecture (5-stage PlainConvUNet
[32, 64, 128, 256, 320], 118 outputs), through the results-folder path users take."""
from __future__ import annotations

import json

import torch

from medslim.api import compress_model
from medslim.compress import CompressConfig
from medslim.load import load_results_folder
from medslim.network import build_base_network


def test_totalseg_architecture_compresses_and_rebuilds_from_plans(totalseg_dir, tmp_path):
    model = load_results_folder(totalseg_dir)
    original = model.build_network()
    assert sum(p.numel() for p in original.parameters()) == 16_550_518 + sum(
        p.numel() for n, p in original.named_parameters() if n.startswith("decoder.seg_layers.") and not n.startswith("decoder.seg_layers.3."))
    out = tmp_path / "ts_compressed"
    report = compress_model(model, CompressConfig(df=0.3, prune_ratio=0.5), out)
    assert report["params"]["ratio"] > 5
    rows = {r["layer"]: r for r in report["layers"]}
    stem = rows["encoder.stages.0.0.convs.0.conv"]
    assert stem["out"] == [32, 32] and stem["ranks"][0] is None  # stem: output mode only, never pruned

    plans = json.loads((out / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    rebuilt = build_base_network(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 118)
    weights = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    rebuilt.load_state_dict(weights, strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        y = rebuilt.eval()(x)
    assert y.shape == (1, 118, 32, 32, 32) and torch.isfinite(y).all()
    assert sum(p.numel() for p in rebuilt.parameters()) == report["params"]["compressed"]
