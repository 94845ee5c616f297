"""Read a MONAI bundle to compress: its inference config, metadata, network and weights.

Everything is checked here, before any compression work: the folder is a bundle
(``configs/inference.json`` or ``.yaml``/``.yml``, ``configs/metadata.json``,
``models/model.pt``), ``network_def`` builds one of MONAI's networks that medslim compresses
(``medslim.families.monai.CLASSES``), and the weights load strictly. Nothing is written.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from medslim.bundle.network import CompressedNetwork, input_channels
from medslim.errors import MedslimError, first_line
from medslim.families import family_of
from medslim.families.monai import CLASSES, MonaiFamily
from medslim.prune.graph import spatial_dims

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
INFERENCE_CONFIGS = tuple(f"inference{s}" for s in CONFIG_SUFFIXES)
#: patch per axis when neither ``inferer#roi_size`` nor the metadata's input shape gives one
DEFAULT_PATCH = 96


@dataclass
class BundleSource:
    """A readable bundle. ``network``: ``network_def`` with ``models/model.pt`` loaded (eval
    mode); ``weights_key``: ``"model"`` if ``model.pt`` nests the state dict under it (MONAI's
    ``CheckpointSaver``), else ``None``; ``patch``: spatial size of one network input and
    ``patch_source`` where it came from."""

    folder: Path
    config_path: Path
    config: dict[str, Any]
    metadata: dict[str, Any]
    network: nn.Module
    weights_key: str | None
    patch: list[int]
    patch_source: str

    @property
    def input_shape(self) -> list[int]:
        """``[1, C_in, *patch]``."""
        return [1, input_channels(self.network), *self.patch]


def read_bundle(folder: str | Path) -> BundleSource:
    """Read and check the bundle at ``folder`` (see the module docstring).

    Raises:
        MedslimError: not a bundle folder; an unreadable config; no ``network_def``; a network
            medslim does not compress (or one already compressed by medslim); weights that do
            not match ``network_def``.
    """
    from monai.bundle import ConfigParser

    folder = Path(folder).expanduser().resolve()
    if not folder.exists():
        raise MedslimError(f"bundle {folder} does not exist")
    if not folder.is_dir():
        raise MedslimError(f"{folder} is not a MONAI bundle folder (a zipped bundle: unzip it first)")
    config_path = next((folder / "configs" / n for n in INFERENCE_CONFIGS if (folder / "configs" / n).is_file()), None)
    for path, what in ((config_path, "configs/inference.json (or .yaml)"), (folder / "configs" / "metadata.json",
                       "configs/metadata.json"), (folder / "models" / "model.pt", "models/model.pt (the weights)")):
        if path is None or not path.is_file():
            raise MedslimError(f"{folder} is not a MONAI bundle: {what} is missing")
    config = load_config(config_path)
    metadata = load_config(folder / "configs" / "metadata.json")
    if "network_def" not in config:
        raise MedslimError(f"{config_path} defines no network_def; medslim compresses the network it defines")
    parser = ConfigParser(copy.deepcopy(config))  # ConfigParser changes the dicts it is given
    parser.read_meta(copy.deepcopy(metadata))
    network = _supported_network(parser, config_path)
    weights_key = load_weights(network, folder / "models" / "model.pt", f"network_def of {config_path}")
    patch, patch_source = _patch_size(parser, network)
    return BundleSource(folder, config_path, config, metadata, network.eval(), weights_key, patch, patch_source)


def load_config(path: Path) -> dict[str, Any]:
    """A JSON or YAML config file as a dict, unresolved (``$``/``@`` strings kept).

    Raises:
        MedslimError: unreadable, or not a mapping at the top.
    """
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_file(path)
    except Exception as e:  # json/yaml syntax errors, duplicate keys (MONAI refuses them)
        raise MedslimError(f"cannot read {path}: {first_line(e)}") from e
    if not isinstance(config, dict):
        raise MedslimError(f"{path} holds a {type(config).__name__}, not a config mapping")
    return config


def build_from_config(parser: Any, config_path: Path) -> nn.Module:
    """``network_def`` of a parsed bundle config (a ``ConfigParser``), instantiated in its context.

    Raises:
        MedslimError: it cannot be built, or is not a ``torch.nn.Module``.
    """
    try:
        net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as e:  # MONAI wraps every instantiation failure in its own exception types
        raise MedslimError(f"network_def of {config_path} cannot be built: {first_line(e)}") from e
    if not isinstance(net, nn.Module):
        raise MedslimError(f"network_def of {config_path} builds a {type(net).__name__}, not a torch.nn.Module")
    return net


def _supported_network(parser: Any, config_path: Path) -> nn.Module:
    net = build_from_config(parser, config_path)
    if isinstance(net, CompressedNetwork):
        raise MedslimError(f"the network of {config_path} is already compressed by medslim; compress the "
                           f"original bundle instead")
    if not isinstance(family_of(net), MonaiFamily):
        cls = f"{type(net).__module__}.{type(net).__name__}"
        raise MedslimError(f"network_def of {config_path} builds {cls}; compress-bundle supports MONAI's "
                           f"{', '.join(CLASSES)} (monai.networks.nets)")
    return net


def load_weights(net: nn.Module, path: Path, target: str) -> str | None:
    """Load ``path`` into ``net`` strictly: a state dict, or one nested under ``"model"``
    (MONAI's ``CheckpointSaver``). Returns that key (or ``None``). ``target`` names ``net`` in
    the error (e.g. ``"network_def of configs/inference.json"``).

    Raises:
        MedslimError: unreadable file, not a state dict, or keys/shapes that differ from ``net``'s.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects, a truncated file, not a torch file at all
        raise MedslimError(f"cannot read {path} as a state dict: {first_line(e)}") from e
    key = "model" if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else None
    state = ckpt[key] if key else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedslimError(f"{path} is not a state dict (nor one under 'model')")
    problem = state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise MedslimError(f"{path} does not match {target} ({type(net).__name__}): {problem}")
    net.load_state_dict(state, strict=True)
    return key


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What keeps ``given`` from loading strictly where ``expected`` is (``""``: nothing):
    missing and unexpected keys, tensors of another shape, one example each."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of another shape (e.g. '{k}': {list(given[k].shape)} in the weights, "
                     f"{list(expected[k].shape)} in the network)")
    return ", ".join(parts)


def _patch_size(parser: Any, net: nn.Module) -> tuple[list[int], str]:
    """One network input's spatial size: the sliding window's ``inferer#roi_size``, else the
    metadata's input ``spatial_shape`` (when it holds numbers), else ``DEFAULT_PATCH`` per axis;
    rounded up to the family's input multiple."""
    ndim = spatial_dims(net)
    candidates = (("inferer#roi_size", "inferer#roi_size"),
                  ("_meta_#network_data_format#inputs#image#spatial_shape", "metadata spatial_shape"))
    for key, source in candidates:
        try:
            sizes = _sizes(parser.get_parsed_content(key), ndim)
        except Exception:  # absent, or an expression that needs more than the config: try the next source
            sizes = None
        if sizes:
            break
    else:
        sizes, source = [DEFAULT_PATCH] * ndim, "default"
    multiple = family_of(net).input_multiple(net) or 1
    multiples = list(multiple) if isinstance(multiple, (list, tuple)) else [int(multiple)] * ndim
    return [math.ceil(s / m) * m for s, m in zip(sizes, multiples)], source


def _sizes(value: Any, ndim: int) -> list[int] | None:
    """``ndim`` positive ints from an int or a sequence (MONAI's ``roi_size`` forms), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = [value] * ndim
    if not isinstance(value, Sequence) or len(value) != ndim:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return None
    return [int(v) for v in value]
