"""``medslim compress-bundle`` on a small bundle built from the real ``spleen_ct_segmentation``
configs (MONAI ``UNet``, channels shrunk, random weights): an identity round trip through the
written bundle, a compressed bundle that ``python -m monai.bundle`` runs on a real CT and
verifies offline, ``CompressedNetwork`` behaving like its base (DynUNet deep supervision), and
one-line errors (exit 2, no output, input untouched) on bad input."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, assert_user_error, monai_bundle, tree_digest

from medslim.cli import app

SPLEEN = SHARED / "monai_bundles" / "spleen_ct_segmentation"
EXAMPLE_CT = SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"
CHANNELS = [4, 8, 16, 32, 64]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def unet(network_def: dict) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    return ConfigParser({"network_def": network_def}).get_parsed_content("network_def")


def make_bundle(folder: Path, network_def: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """The spleen bundle's files in ``folder`` (writable copies), ``channels`` shrunk in every
    config's ``network_def`` (or ``network_def`` replaced), and random weights — BatchNorm
    statistics included — as ``models/model.pt``. Returns the network, eval mode."""
    for path in SPLEEN.rglob("*"):
        if path.is_file():
            (folder / path.relative_to(SPLEEN)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.relative_to(SPLEEN))
    for name in ("inference.json", "train.json"):
        config = json.loads((folder / "configs" / name).read_text())
        config["network_def"] = network_def or dict(config["network_def"], channels=CHANNELS)
        (folder / "configs" / name).write_text(json.dumps(config, indent=4))
    torch.manual_seed(seed)
    net = unet(json.loads((folder / "configs" / "inference.json").read_text())["network_def"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    (folder / "models").mkdir()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return net.eval()


def rebuilt(bundle: Path, config: str = "inference.json") -> torch.nn.Module:
    """``network_def`` of the written config, ``models/model.pt`` loaded strictly, eval mode."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / config)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    return net.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("spleen") / "bundle"
    return folder, make_bundle(folder)


@pytest.fixture(scope="module")
def compressed(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "bundle"
    result = cli("compress-bundle", source[0], "-o", out, "--df", "0.5", "--prune", "0.5")
    assert result.exit_code == 0, result.output
    return out


def test_identity_round_trip(source, tmp_path):
    """DF 1, ρ 0 through the CLI and full-rank Tucker-2 of every eligible conv (no guard,
    through the library): the written bundle's network_def + model.pt give the original's
    outputs."""
    from medslim.bundle import compress_bundle
    from medslim.compress import CompressConfig

    folder, original = source
    x = torch.randn(1, 1, 48, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(x)
    assert cli("compress-bundle", folder, "-o", tmp_path / "cli", "--df", "1", "--prune", "0").exit_code == 0
    compress_bundle(folder, tmp_path / "tucker", CompressConfig(df=1.0, prune_ratio=0.0, guard=None))
    meta = json.loads((tmp_path / "tucker" / "configs" / "metadata.json").read_text())
    assert len(meta["medslim"]["compression"]["ranks"]) >= 20  # every conv but the heads, decomposed
    for out in ("cli", "tucker"):
        with torch.no_grad():
            assert relative_error(rebuilt(tmp_path / out)(x), expected) <= 1e-4, out


def test_compressed_bundle_runs_on_a_real_ct(source, compressed, tmp_path):
    """DF 0.5, ρ 0.5: fewer parameters; inference.json and train.json rebuild the network and
    load model.pt strictly; model.ts agrees; ``monai.bundle run`` writes a label map with the
    CT's shape and affine, run by the bundle's own ``SupervisedEvaluator`` (its ``CheckpointLoader``
    loads the compressed model.pt)."""
    folder, original = source
    net, train_net = rebuilt(compressed), rebuilt(compressed, "train.json")
    meta = json.loads((compressed / "configs" / "metadata.json").read_text())
    params = meta["medslim"]["report_summary"]["params"]
    assert n_params(net) == n_params(train_net) == params["compressed"] < params["original"] == n_params(original)
    assert (compressed / "configs" / "evaluate.json").read_bytes() == (folder / "configs" / "evaluate.json").read_bytes()
    assert len(_large_files(folder)) == 2 and _large_files(compressed) == []  # both were models/ downloads
    x = torch.randn(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(compressed / "models" / "model.ts"))(x), net(x), atol=1e-4)
        assert torch.equal(train_net(x), net(x))

    # the bundle's own inference workflow (SupervisedEvaluator, CheckpointLoader): only data paths and device set
    run = monai_bundle(compressed, "run", "--config_file", "configs/inference.json", "--datalist", f"['{EXAMPLE_CT}']",
                       "--output_dir", str(tmp_path / "pred"), "--device", "$torch.device('cpu')", threads=1)
    assert "Restored all variables from ./models/model.pt" in run.stdout + run.stderr  # strict by default
    [written] = list((tmp_path / "pred").rglob("*.nii.gz"))
    image, labels = nib.load(EXAMPLE_CT), nib.load(written)
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1}


def _large_files(bundle: Path) -> list[dict]:
    import yaml

    return yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]


def test_metadata_verifies_offline(source, compressed):
    meta = json.loads((compressed / "configs" / "metadata.json").read_text())
    readme = (compressed / "docs" / "README.md").read_text()
    params = meta["medslim"]["report_summary"]["params"]
    assert readme.startswith("# Compressed by medslim") and (source[0] / "docs" / "README.md").read_text() in readme
    assert f"{params['original']:,} → {params['compressed']:,}" in readme and "finetune.json" in readme
    assert meta["version"] == "0.5.9+medslim" and "0.5.9+medslim" in meta["changelog"]
    assert meta["medslim"]["compression"] == json.loads(
        (compressed / "configs" / "inference.json").read_text())["network_def"]["compression"]
    flops = meta["medslim"]["report_summary"]["flops"]
    assert meta["medslim"]["report_summary"]["input_shape"] == [1, 1, 96, 96, 96]  # inferer#roi_size
    assert flops["compressed"] < flops["original"]
    monai_bundle(compressed, "verify_metadata", "--meta_file", "configs/metadata.json",
                 "--filepath", "docs/meta_schema_20220324.json", threads=1)


def test_yaml_bundle(source, tmp_path):
    """A YAML inference config is rewritten as YAML (and rebuilds the network)."""
    import yaml

    from medslim.bundle import compress_bundle
    from medslim.compress import CompressConfig

    folder = tmp_path / "yaml_bundle"
    shutil.copytree(source[0], folder)
    config = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").unlink()
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    compress_bundle(folder, tmp_path / "out", CompressConfig(df=0.5, prune_ratio=0.5))
    written = yaml.safe_load((tmp_path / "out" / "configs" / "inference.yaml").read_text())
    assert not (tmp_path / "out" / "configs" / "inference.json").exists()
    assert written["network_def"]["network_def"] == config["network_def"]
    assert n_params(rebuilt(tmp_path / "out", "inference.yaml")) < n_params(source[1])


def test_segresnet_bundle_prunes_whole_groupnorm_groups(tmp_path):
    """A SegResNet bundle (GroupNorm, residual additions) at ρ 0.5: the written bundle rebuilds
    and loads strictly; every GroupNorm kept its group size and some lost groups."""
    from medslim.bundle import compress_bundle
    from medslim.compress import CompressConfig

    network_def = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                   "init_filters": 16, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]}
    original = make_bundle(tmp_path / "segresnet", network_def)
    report = compress_bundle(tmp_path / "segresnet", tmp_path / "out", CompressConfig(df=0.5, prune_ratio=0.5))
    net = rebuilt(tmp_path / "out")
    assert n_params(net) < 0.5 * n_params(original), report
    before = {n: m.num_channels // m.num_groups for n, m in original.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    after = {n.removeprefix("network."): m for n, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert after.keys() == before.keys() and any(m.num_groups < 8 for m in after.values())
    assert all(m.num_channels // m.num_groups == before[n] for n, m in after.items())
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(net(x)).all() and net(x).shape == (1, 2, 32, 32, 32)


def test_compressed_network_behaves_like_dynunet_with_deep_supervision():
    """Training mode returns the deep-supervision heads ``[B, 1 + n, C, *S]``, eval mode the
    main output, as the compressed DynUNet does; the state dict is its own under ``network.``."""
    from medslim.bundle import CompressedNetwork
    from medslim.compress import CompressConfig, compress_network

    network_def = {"_target_": "DynUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                   "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                   "filters": [8, 16, 32], "deep_supervision": True, "deep_supr_num": 1}
    torch.manual_seed(0)
    done = compress_network(unet(network_def).eval(), CompressConfig(df=0.5, prune_ratio=0.5), (1, 1, 16, 16, 16))
    net = CompressedNetwork(network_def, done.spec.to_dict())
    net.load_state_dict({f"network.{k}": v for k, v in done.network.state_dict().items()}, strict=True)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        net.train(), done.network.train()
        heads = net(x)
        assert heads.shape == (2, 2, 3, 16, 16, 16) and torch.allclose(heads, done.network(x), atol=1e-5)
        net.eval(), done.network.eval()
        assert net(x).shape == (2, 3, 16, 16, 16) and torch.allclose(net(x), done.network(x), atol=1e-5)
    copy.deepcopy(net)  # as a new DynUNet does (the rebuild's trace leaves no graph tensors in its heads)


# --- bad input: one line, exit 2, no output, input untouched ----------------------------------

def _not_a_bundle(folder: Path) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "metadata.json").write_text("{}")
    return folder


def _unsupported(folder: Path) -> Path:
    make_bundle(folder, {"_target_": "AttentionUnet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                         "channels": [4, 8], "strides": [2]})
    return folder


def _mismatched(folder: Path) -> Path:
    make_bundle(folder)
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = [4, 8, 16, 32, 32]
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make, match", [
    (_not_a_bundle, "is not a MONAI bundle: configs/inference.json (or .yaml) is missing"),
    (_unsupported, "builds monai.networks.nets.attentionunet.AttentionUnet; compress-bundle supports"),
    (_mismatched, "does not match network_def"),
], ids=["not-a-bundle", "unsupported-class", "weights-mismatch"])
def test_bad_input(make, match, tmp_path):
    bundle = make(tmp_path / "bundle")
    before = tree_digest(bundle)
    out = tmp_path / "out"
    assert_user_error(cli("compress-bundle", bundle, "-o", out), out, match)
    assert tree_digest(bundle) == before


def test_bad_input_already_compressed_or_output_exists(source, compressed, tmp_path):
    before = tree_digest(compressed)
    out = tmp_path / "out"
    assert_user_error(cli("compress-bundle", compressed, "-o", out), out, "already compressed by medslim")
    assert tree_digest(compressed) == before
    out.mkdir()
    result = cli("compress-bundle", source[0], "-o", out)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "already exists" in result.stderr and not any(out.iterdir())
    assert not list(tmp_path.glob(".out.*"))
