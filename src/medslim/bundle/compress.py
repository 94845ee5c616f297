"""Compress a MONAI bundle's network into a new bundle (``medslim compress-bundle``).

The new bundle is the input bundle's files, with::

    configs/inference.json   network_def → CompressedNetwork(original network_def, spec); likewise every
                             other config that defines network_def (train.json, …); JSON or YAML as read
    configs/metadata.json    version "+medslim", a changelog entry, package versions, and "medslim":
                             the spec, parameters and FLOPs (one patch) before/after, settings
    models/model.pt          the compressed state dict (keys "network.…"; under "model" if the input's was)
    models/model.ts          TorchScript, traced on one patch in eval mode (MONAI's ckpt_export --use_trace
                             route: Tucker layers and DynUNet do not torch.jit.script)
    docs/meta_schema_20220324.json   if the metadata names that schema: verify_metadata works offline
    large_files.yml          without its models/ entries (they would download the original weights)
    configs/finetune.json    if the source has train.json: overlays that fine-tune the compressed network
    configs/distill.json     with the bundle's own training workflow, with distillation from the original
                             (``medslim.bundle.workflows``)
    docs/README.md           a section on the compression and the commands, above the source's text

Other files in ``models/`` (ONNX, TensorRT, older checkpoints) hold the original network and are
not copied. Written to a temporary sibling and renamed into place when complete; the input
bundle is only read.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from rich.console import Console

from medslim.atomic import atomic_folder, check_output_parent
from medslim.bundle.network import COMPRESSED_TARGET, CompressedNetwork, input_channels
from medslim.bundle.source import (CONFIG_SUFFIXES, BundleSource, build_from_config, load_config, load_weights,
                                   read_bundle)
from medslim.bundle.workflows import DISTILL_FILE, FINETUNE_FILE, distill_overlay, finetune_overlay
from medslim.compress import CompressConfig
from medslim.errors import MedslimError
from medslim.export.bundle import save_traced
from medslim.export.versions import package_versions
from medslim.export.bundle_schema import SCHEMA_JSON, SCHEMA_NAME
from medslim.spec import CompressionSpec

#: what a compressed bundle needs besides MONAI to rebuild its network
PACKAGES = ("medslim", "torch-pruning")
LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")


def compress_bundle(bundle: str | Path, out: str | Path, config: CompressConfig,
                    console: Console | None = None) -> dict[str, Any]:
    """Compress the network of the MONAI bundle ``bundle`` and write the new bundle ``out``
    (which must not exist). The patch (FLOPs, HVS input) is ``inferer#roi_size``, else the
    metadata's input ``spatial_shape``, else 96 per axis (``medslim.bundle.source``).

    Returns:
        The report: ``summarize``'s parameters and FLOPs before/after, per-layer table and
        timings, plus ``bundle``, ``patch_source``, ``settings``, ``configs`` (rewritten) and
        ``not_copied`` (input files left out).
    Raises:
        MedslimError: ``out`` exists or is inside the bundle; anything ``read_bundle`` refuses;
            another config's ``network_def`` builds a network of another structure.
    """
    from medslim.api import compress_with_progress
    from medslim.summary import summarize

    out = Path(out).expanduser().resolve()
    if out.exists():
        raise MedslimError(f"output {out} already exists; choose a new bundle folder")
    check_output_parent(out)
    source = read_bundle(bundle)
    if source.folder == out or source.folder in out.parents:
        raise MedslimError(f"output {out} is inside the bundle {source.folder}; choose another path")
    configs = network_configs(source)
    original = copy.deepcopy(source.network)  # kept apart: compressing traces the network, rebuilding changes it
    compressed = compress_with_progress(source.network, config, source.input_shape, console)
    net = CompressedNetwork(copy.deepcopy(original), compressed.spec.to_dict())  # as the bundle rebuilds it
    net.network.load_state_dict(compressed.network.state_dict())
    report = summarize(original, dataclasses.replace(compressed, network=net.network), source.input_shape)
    models = sorted(p.relative_to(source.folder).as_posix() for p in (source.folder / "models").rglob("*")
                    if p.is_file())
    report.update(bundle=str(source.folder), patch_source=source.patch_source, settings=config.to_dict(),
                  network_class=f"{type(original).__module__}.{type(original).__name__}",
                  configs=[p.relative_to(source.folder).as_posix() for p in configs],
                  not_copied=[m for m in models if m not in ("models/model.pt", "models/model.ts")])
    meta = compressed_metadata(source, compressed.spec, report)
    with atomic_folder(out) as tmp:
        _write_bundle(tmp, source, {p: with_compressed_network(c, compressed.spec) for p, c in configs.items()},
                      net.eval(), meta)
    return report


def _write_bundle(tmp: Path, source: BundleSource, configs: dict[Path, dict[str, Any]], net: CompressedNetwork,
                  meta: dict[str, Any]) -> None:
    """Write the compressed bundle into the empty folder ``tmp`` (see the module docstring)."""
    _copy_files(source.folder, tmp)
    for path, config in configs.items():
        write_config(tmp / path.relative_to(source.folder), config)
    _drop_model_downloads(tmp)
    (tmp / "models").mkdir()
    state = net.state_dict()
    torch.save({source.weights_key: state} if source.weights_key else state, tmp / "models" / "model.pt")
    (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    if str(meta.get("schema", "")).endswith(SCHEMA_NAME) and not (tmp / "docs" / SCHEMA_NAME).exists():
        (tmp / "docs").mkdir(exist_ok=True)
        (tmp / "docs" / SCHEMA_NAME).write_text(SCHEMA_JSON)
    save_traced(net, torch.zeros(source.input_shape), meta, {source.config_path.stem: configs[source.config_path]},
                tmp / "models" / "model.ts")
    trainable = any(p.stem == "train" for p in configs)
    if trainable:  # overlays for the bundle's own training workflow
        write_config(tmp / "configs" / FINETUNE_FILE, finetune_overlay())
        write_config(tmp / "configs" / DISTILL_FILE, distill_overlay(source.config["network_def"],
                                                                     source.folder / "models" / "model.pt"))
    readme = tmp / "docs" / "README.md"
    readme.parent.mkdir(exist_ok=True)
    before = readme.read_text() if readme.is_file() else ""
    readme.write_text(readme_section(meta, source.config_path.name, trainable) + "\n" + before)
    _check_written(tmp / source.config_path.relative_to(source.folder), net)


def network_configs(source: BundleSource) -> dict[Path, dict[str, Any]]:
    """The configs in ``configs/`` that define ``network_def`` (the inference config first),
    unresolved. One whose ``network_def`` differs from the inference config's must build a
    network with the same state-dict keys and shapes, so that the spec and weights fit it.

    Raises:
        MedslimError: a config that cannot be read, or whose network differs in structure.
    """
    from monai.bundle import ConfigParser

    found = {source.config_path: source.config}
    shapes = _shapes(source.network)
    for path in sorted((source.folder / "configs").iterdir()):
        if path == source.config_path or path.suffix not in CONFIG_SUFFIXES or path.name == "metadata.json":
            continue
        raw = load_config(path)
        if "network_def" not in raw:
            continue
        if raw["network_def"] != source.config["network_def"] and \
                _shapes(build_from_config(ConfigParser(copy.deepcopy(raw)), path)) != shapes:
            raise MedslimError(f"network_def of {path} builds a network other than that of {source.config_path}; "
                               f"medslim compresses one network per bundle: make them agree")
        found[path] = raw
    return found


def with_compressed_network(config: dict[str, Any], spec: CompressionSpec) -> dict[str, Any]:
    """``config`` with ``network_def`` replaced by ``CompressedNetwork`` of the original
    ``network_def`` and ``spec`` (same position in the file; nothing else changes)."""
    new = dict(config)
    new["network_def"] = {"_target_": COMPRESSED_TARGET, "network_def": copy.deepcopy(config["network_def"]),
                          "compression": json.loads(json.dumps(spec.to_dict()))}  # plain lists: YAML-safe
    return new


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``config`` as JSON or YAML (by ``path``'s suffix), keys in their order. YAML
    comments of a rewritten file are not kept."""
    import yaml

    if path.suffix == ".json":
        path.write_text(json.dumps(config, indent=4) + "\n")
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))


def compressed_metadata(source: BundleSource, spec: CompressionSpec, report: dict[str, Any]) -> dict[str, Any]:
    """The source bundle's ``metadata.json`` for the compressed bundle: version ``<v>+medslim``
    with a changelog entry, this machine's MONAI/PyTorch/NumPy versions, medslim and
    Torch-Pruning as required packages, and ``"medslim"``: source, spec, parameters and FLOPs
    before/after (one patch ``[1, C_in, *patch]``), settings. Other keys (``eval_metrics``,
    ``network_data_format``, …) are the source's."""
    import monai
    import numpy

    meta = copy.deepcopy(source.metadata)
    old = str(meta.get("version", "0.0.0"))
    new = f"{old}{'.' if '+' in old else '+'}medslim"
    packages = package_versions(PACKAGES)
    s = report["settings"]
    meta["changelog"] = {new: (f"compressed by medslim {packages['medslim']} from version {old} (DF {s['df']}, "
                               f"prune ratio {s['prune_ratio']}, criterion {s['criterion']}); not fine-tuned"),
                         **meta.get("changelog", {})}
    meta.update(version=new, monai_version=monai.__version__, pytorch_version=torch.__version__.split("+")[0],
                numpy_version=numpy.__version__)
    meta["required_packages_version"] = {**meta.get("required_packages_version", {}), **packages}
    meta["name"] = f"{meta.get('name', source.folder.name)} (compressed by medslim)"
    meta["medslim"] = {
        "source_bundle": str(source.folder), "source_version": old, "compression": spec.to_dict(),
        "report_summary": {k: report[k] for k in ("input_shape", "patch_source", "params", "flops", "settings")},
        "network_class": report["network_class"], "configs": report["configs"], "not_copied": report["not_copied"],
        "torchscript": "traced (torch.jit.trace) on one patch in eval mode",
        "note": "eval_metrics and the source part of docs/README.md describe the source network; this one is compressed, not fine-tuned",
    }
    return meta


def readme_section(meta: dict[str, Any], inference: str, trainable: bool) -> str:
    """What ``docs/README.md`` of the compressed bundle says first: what was compressed (from
    ``meta["medslim"]``), how to run and fine-tune it; the source's text follows unchanged."""
    m = meta["medslim"]
    params, flops, s = m["report_summary"]["params"], m["report_summary"]["flops"], m["report_summary"]["settings"]
    lines = [
        "# Compressed by medslim", "",
        f"From `{m['source_bundle']}` (version {m['source_version']}): `network_def` is "
        f"`{COMPRESSED_TARGET}` (the original `network_def` + the compression spec); "
        f"DF {s['df']}, prune ratio {s['prune_ratio']}, criterion {s['criterion']}.", "",
        f"- parameters: {params['original']:,} → {params['compressed']:,} ({params['ratio']:.2f}× fewer)",
        f"- FLOPs per patch {m['report_summary']['input_shape']}: {flops['original']:,} → {flops['compressed']:,} "
        f"({flops['ratio']:.2f}× fewer)", "",
        "**Not fine-tuned:** the accuracy below this section (and `eval_metrics` in `configs/metadata.json`) "
        "is the source network's.", "",
        f"    python -m monai.bundle run --config_file configs/{inference}",
    ]
    if trainable:
        lines += ["", "Fine-tune with this bundle's own training workflow (distillation from the original: add "
                      f"`configs/{DISTILL_FILE}`, set `--medslim_kd_weight`):", "",
                  f"    python -m monai.bundle run --config_file \"['configs/train.json','configs/{FINETUNE_FILE}']\"",
                  f"    python -m monai.bundle run --config_file \"['configs/train.json','configs/{FINETUNE_FILE}',"
                  f"'configs/{DISTILL_FILE}']\""]
    return "\n".join(lines) + "\n\n---\n"


def _drop_model_downloads(folder: Path) -> None:
    """Remove the ``models/`` entries of ``large_files.*`` in ``folder`` (MONAI's
    ``download_large_files`` would put the original weights over the compressed ones)."""
    for name in LARGE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = load_config(path)
        entries = data.get("large_files", [])
        kept = [e for e in entries if not (isinstance(e, dict) and _under_models(e.get("path")))]
        if len(kept) != len(entries):
            write_config(path, {**data, "large_files": kept})


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` but those under ``models/`` into ``dst``, contents only (the
    input's modes, e.g. read-only, are not carried over)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and not _under_models(rel.as_posix()):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)


def _under_models(path: Any) -> bool:
    return PurePosixPath(str(path or "")).parts[:1] == ("models",)


def _shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_written(config_path: Path, net: CompressedNetwork) -> None:
    """The written config rebuilds ``net``: its ``network_def`` loads ``models/model.pt``
    strictly and gives ``net``'s output (a bug in medslim otherwise, not a user error)."""
    from monai.bundle import ConfigParser

    from medslim.prune import example_input

    try:
        rebuilt = build_from_config(ConfigParser(load_config(config_path)), config_path)
        load_weights(rebuilt, config_path.parent.parent / "models" / "model.pt", f"network_def of {config_path}")
    except MedslimError as e:
        raise RuntimeError(f"the written bundle does not rebuild its network: {e}") from e
    x = example_input(net.network, input_channels(net.network))
    with torch.no_grad():
        if not torch.allclose(rebuilt.eval()(x), net.eval()(x), rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the network rebuilt from {config_path.name} differs from the compressed one")
