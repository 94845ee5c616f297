"""``medslim compress`` on bad input: one line on stderr, exit code 2, no output folder, the
input untouched. And on good input: a results folder with a consistent report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_user_error, tree_digest

from medslim.cli import app


def run(*args: str):
    return CliRunner().invoke(app, list(args))






@pytest.fixture
def model_copy(reference_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(reference_dir, dst)
    return dst


def test_compress_writes_folder_and_keeps_input(reference_dir, tmp_path):
    before = tree_digest(reference_dir)
    out = tmp_path / "out"
    result = run("compress", str(reference_dir), "-o", str(out), "--df", "0.3", "--prune", "0.5")
    assert result.exit_code == 0, result.output
    assert tree_digest(reference_dir) == before
    report = json.loads((out / "compression_report.json").read_text())
    plans = json.loads((out / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "medslim.network.CompressedUNet"
    assert arch["arch_kwargs"]["compression"] == json.loads((out / "compression_spec.json").read_text())
    weights = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    unique = {t.data_ptr(): t.numel() for t in weights.values()}
    assert report["params"]["compressed"] == sum(unique.values())
    assert report["params"]["ratio"] > 3
    assert f"{report['params']['compressed']:,}" in result.stdout


@pytest.mark.parametrize("args, match", [
    (["--df", "0"], "--df must be in (0, 1]"),
    (["--df", "1.5"], "--df must be in (0, 1]"),
    (["--prune", "1"], "--prune must be in [0, 1)"),
    (["--prune", "-0.1"], "--prune must be in [0, 1)"),
    (["--criterion", "hsv"], "did you mean 'hvs'"),
    (["--prune-site", "inner"], "prune site"),
    (["--selection", "globl"], "unknown --selection 'globl'; did you mean 'global'"),
])
def test_bad_options(reference_dir, tmp_path, args, match):
    out = tmp_path / "out"
    assert_user_error(run("compress", str(reference_dir), "-o", str(out), *args), out, match)


def test_missing_folder(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("compress", str(tmp_path / "nope"), "-o", str(out)), out, "does not exist")


def test_missing_checkpoint(model_copy, tmp_path):
    (model_copy / "fold_0" / "checkpoint_final.pth").unlink()
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "no checkpoint fold_0/checkpoint_final.pth")


def test_plans_without_architecture(model_copy, tmp_path):
    plans = json.loads((model_copy / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]
    (model_copy / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "no 'architecture'")


def test_unsupported_layer_type(model_copy, tmp_path, reference):
    from unsupported_arch import MixedDimUNet

    plans = json.loads((model_copy / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "unsupported_arch.MixedDimUNet"
    (model_copy / "plans.json").write_text(json.dumps(plans))
    from medslim.network import build_base_network
    net = build_base_network(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3)
    assert isinstance(net, MixedDimUNet)
    ckpt = dict(reference.checkpoint, network_weights=net.state_dict())
    torch.save(ckpt, model_copy / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "out"
    assert_user_error(run("compress", str(model_copy), "-o", str(out)), out, "Conv2d in a 3D network")


def test_existing_output_needs_overwrite(reference_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run("compress", str(reference_dir), "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    result = run("compress", str(reference_dir), "-o", str(out), "--overwrite", "--df", "0.5", "--prune", "0.3")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "plans.json").is_file()


def test_already_compressed_model_is_refused(reference_dir, tmp_path):
    first = tmp_path / "first"
    assert run("compress", str(reference_dir), "-o", str(first)).exit_code == 0
    out = tmp_path / "second"
    assert_user_error(run("compress", str(first), "-o", str(out)), out, "already compressed")


def test_totalseg_task_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    out = tmp_path / "out"
    assert_user_error(run("compress", "total_fast", "-o", str(out)), out, "totalseg_download_weights -t total_fast")


def test_totalseg_task_resolves_weights_dir(totalseg_dir, tmp_path, monkeypatch):
    """A TotalSegmentator weights folder laid out as the package writes it is found by task name."""
    home = tmp_path / "tshome"
    results = home / "nnunet" / "results"
    shutil.copytree(totalseg_dir.parent, results / totalseg_dir.parent.name)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    from medslim.load import load_model

    model = load_model("total_fast")
    assert model.num_classes == 118 and model.patch_size == [112, 112, 128]


# --- options through `medslim compress` on the reference model -----------------------------------

@pytest.fixture(scope="module")
def compressed(reference_dir, tmp_path_factory):
    """``compressed(*flags) -> (spec, report)`` of ``medslim compress REFERENCE -o OUT *flags``,
    each flag set run once per module."""
    done: dict[tuple[str, ...], tuple[dict, dict]] = {}

    def get(*flags: str) -> tuple[dict, dict]:
        if flags not in done:
            out = tmp_path_factory.mktemp("compress") / "out"
            result = run("compress", str(reference_dir), "-o", str(out), *flags)
            assert result.exit_code == 0, result.output
            done[flags] = (json.loads((out / "compression_spec.json").read_text()),
                           json.loads((out / "compression_report.json").read_text()))
        return done[flags]
    return get


def _rows(report: dict) -> dict[str, dict]:
    return {r["layer"]: r for r in report["layers"]}


def test_rank_min_bounds_every_rank(compressed):
    """DF 0.1 gives ranks 2 … 13 on 16 … 128 channels; --rank-min 8 lifts every mode to
    min(8, C) and leaves larger ranks alone."""
    spec, report = compressed("--df", "0.1", "--rank-min", "8", "--prune", "0")
    rows, lifted = _rows(report), 0
    assert spec["provenance"]["config"]["rank_min"] == 8 and spec["ranks"]
    for layer, ranks in spec["ranks"].items():
        for rank, channels in zip(ranks, (rows[layer]["in"][0], rows[layer]["out"][0])):
            if rank is not None:
                want = min(channels, max(8, -(-channels // 10)))  # ceil(0.1·C), exact for these C
                assert rank == want, (layer, rank, channels)
                lifted += want == 8 < channels
    assert lifted >= 10


def test_energy_policy_keeps_the_energy_asked_per_mode(compressed, reference_net):
    """--rank-policy energy --energy 0.8: every mode keeps ≥ 80 % of its Σσ², one rank less would not."""
    from medslim.decompose.tucker import discarded_fraction, mode_spectrum

    spec, _ = compressed("--rank-policy", "energy", "--energy", "0.8", "--prune", "0")
    modules = dict(reference_net.named_modules())
    assert spec["provenance"]["config"]["rank_policy"] == "energy" and len(spec["ranks"]) >= 10
    for layer, ranks in spec["ranks"].items():
        conv = modules[layer]
        for mode, rank in zip(("in", "out"), ranks):
            if rank is None:
                continue
            spectrum = mode_spectrum(conv.weight, mode, transposed=bool(conv.transposed))
            assert 1 - discarded_fraction(spectrum, rank) >= 0.8 - 1e-9, (layer, mode, rank)
            assert rank == 1 or 1 - discarded_fraction(spectrum, rank - 1) < 0.8, (layer, mode, rank)


def test_hooi_keeps_the_ranks_and_lowers_the_error(compressed):
    hosvd, hooi = compressed("--prune", "0"), compressed("--method", "hooi", "--prune", "0")
    assert hooi[0]["provenance"]["config"]["method"] == "hooi"
    assert hooi[0]["ranks"] == hosvd[0]["ranks"]
    a, b = _rows(hosvd[1]), _rows(hooi[1])
    gains = {n: a[n]["rel_error"] - b[n]["rel_error"] for n in hooi[0]["ranks"]}
    assert min(gains.values()) > -1e-6, gains  # never worse; the stem (one mode) is HOSVD-optimal
    both = [n for n, r in hooi[0]["ranks"].items() if None not in r]
    assert len(both) >= 10 and all(gains[n] > 5e-3 for n in both), gains  # measured 0.007 … 0.034


def test_rank_site_leaves_block_outputs_alone(compressed):
    """--prune-site rank removes Tucker ranks only: every layer keeps its input and output
    channels, yet the model is smaller than with ρ = 0; --prune-site all also shrinks outputs."""
    dense = compressed("--prune", "0")[1]
    spec, report = compressed("--prune-site", "rank")
    assert spec["kept"] and all(k.endswith((".reduce", ".core")) for k in spec["kept"])
    assert all(r["in"][0] == r["in"][1] and r["out"][0] == r["out"][1] for r in report["layers"])
    assert report["params"]["compressed"] < dense["params"]["compressed"]
    spec_all, report_all = compressed("--prune-site", "all")
    assert {k.rsplit(".", 1)[1] for k in spec_all["kept"]} == {"reduce", "core", "restore"}
    assert any(r["out"][1] < r["out"][0] for r in report_all["layers"])
    assert report_all["params"]["compressed"] < report["params"]["compressed"]


def test_spatial_and_channel_engines_keep_alike_channels(compressed):
    """SPEC §2: the exact (spatial) and fast (channel) HVS engines rank channels alike, so at
    ρ 0.5 they keep mostly the same channels of every layer (random choice: half)."""
    spatial, channel = compressed("--engine", "spatial")[0], compressed()[0]
    assert spatial["provenance"]["config"]["engine"] == "spatial" and spatial["kept"].keys() == channel["kept"].keys()
    overlap = [len(set(spatial["kept"][n]) & set(channel["kept"][n])) / len(channel["kept"][n]) for n in channel["kept"]]
    assert min(overlap) >= 0.9 and sum(overlap) / len(overlap) > 0.95, overlap  # measured ≥ 0.97, mean 0.996
