"""Classifier factory: torchvision / timm architectures or a medslim checkpoint, with a new head.

``source`` forms accepted by :func:`build_classifier`:

- ``resnet18`` | ``resnet50`` | ``vgg16`` (and any other torchvision classifier name): random init;
- ``resnet18_28`` | ``resnet34_28`` | ``resnet50_28``: MedMNIST v2's "ResNet (28)" for 28×28 inputs
  (a 3×3 stride-1 stem and no max-pool), random init;
- ``torchvision:<name>``: ImageNet weights, only if already in the torch hub cache (never downloads);
- ``timm:<name>``: a timm model, ``pretrained=False``;
- a path to a ``.pt`` file written by :func:`save_classifier` (state_dict + metadata, no pickle).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medslim.atomic import atomic_file
from medslim.errors import MedslimError, did_you_mean

CHECKPOINT_FORMAT = "medslim-classifier/1"
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg16_bn")
# torchvision's stem (7×7 stride 2 + max-pool) leaves 1×1 maps in layer4 at 28×28; MedMNIST v2
# (Yang et al. 2023) trains its "ResNet (28)" baselines with this stem instead
SMALL_INPUT_ARCHS = ("resnet18_28", "resnet34_28", "resnet50_28")


def head_name(model: nn.Module) -> str:
    """Name of the final classifier layer (``fc`` for ResNets, ``classifier.6`` for VGG,
    timm's ``pretrained_cfg['classifier']``), else the last ``nn.Linear`` in module order."""
    cfg = getattr(model, "pretrained_cfg", None)
    names = dict(model.named_modules())
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str) and cfg["classifier"] in names:
        return cfg["classifier"]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise MedslimError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linear[-1]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the final layer by a freshly initialised ``Linear(in_features, num_classes)`` (in place)."""
    if num_classes < 1:
        raise MedslimError(f"num_classes must be ≥ 1, got {num_classes}")
    name = head_name(model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise MedslimError(f"head '{name}' is a {type(old).__name__}, not nn.Linear")
    _set_module(model, name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return n, m
    raise MedslimError(f"{type(model).__name__} has no Conv2d layer")


def _set_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    name, conv = _first_conv(model)
    if conv.in_channels != in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        _set_module(model, name, new)
    return model


def _cached_torchvision_state(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise MedslimError(f"torchvision has no pretrained weights for '{name}'") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not file.is_file():
        raise MedslimError(f"ImageNet weights for {name} are not cached at {file} (medslim never downloads); "
                           f"on a machine with internet run: python -c \"import torchvision; "
                           f"torchvision.models.get_model_weights('{name}').DEFAULT.get_state_dict()\" "
                           f"and copy the file there")
    return torch.load(file, map_location="cpu", weights_only=True)


def _build_arch(source: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    """The architecture named by ``source`` (no checkpoint paths), head sized ``num_classes``."""
    if source.startswith("timm:"):
        import timm

        name = source[5:]
        if name not in timm.list_models():
            raise MedslimError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    import torchvision

    if source in SMALL_INPUT_ARCHS:
        model = _build_arch(source[: -len("_28")], num_classes, in_channels, pretrained=False)
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    tv = source[len("torchvision:"):] if source.startswith("torchvision:") else source
    available = torchvision.models.list_models(module=torchvision.models)
    if tv not in available:
        known = TORCHVISION_ARCHS + SMALL_INPUT_ARCHS
        raise MedslimError(f"unknown model source '{source}'{did_you_mean(tv, known)}; use resnet18 | resnet18_28 | "
                           "resnet50 | vgg16 | torchvision:<name> | timm:<name> | a .pt checkpoint")
    model = torchvision.models.get_model(tv, weights=None)
    if source.startswith("torchvision:") and pretrained:
        model.load_state_dict(_cached_torchvision_state(tv))
    replace_head(model, num_classes)
    return _set_in_channels(model, in_channels)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a :func:`save_classifier` file: ``{format, arch, num_classes, in_channels, state_dict, meta}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MedslimError(f"classifier checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise MedslimError(f"cannot read {path} as a medslim classifier checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedslimError(f"{path} is not a medslim classifier checkpoint (write one with save_classifier)")
    return ckpt


def is_checkpoint_path(source: str) -> bool:
    return source.endswith((".pt", ".pth")) or os.sep in source or Path(source).expanduser().is_file()


def build_classifier(source: str | dict[str, Any], num_classes: int | None = None,
                     in_channels: int | None = None) -> nn.Module:
    """Build a classifier whose final layer has ``num_classes`` outputs and whose stem takes
    ``in_channels`` channels. ``source`` may also be a checkpoint already read with
    :func:`load_checkpoint` (so it is read once). For a checkpoint, ``None`` means its own
    classes / channels, and it keeps its trained head when ``num_classes`` matches (else the
    head is replaced by a fresh one); for an architecture name ``num_classes`` is required and
    ``in_channels`` defaults to 3.

    Raises:
        MedslimError: unknown source, uncached ImageNet weights, unreadable checkpoint.
    """
    if isinstance(source, dict) or is_checkpoint_path(source):
        ckpt = source if isinstance(source, dict) else load_checkpoint(source)
        model = _build_arch(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"], pretrained=False)
        model.load_state_dict(ckpt["state_dict"])
        if in_channels is not None and in_channels != ckpt["in_channels"]:
            name = source if isinstance(source, str) else ckpt["arch"]
            raise MedslimError(f"{name} takes {ckpt['in_channels']} input channels, not {in_channels}")
        if num_classes is None or num_classes == ckpt["num_classes"]:
            return model
        return replace_head(model, num_classes)
    if num_classes is None:
        raise MedslimError(f"the number of classes is needed to build '{source}'")
    return _build_arch(source, num_classes, 3 if in_channels is None else in_channels, pretrained=True)


def save_classifier(model: nn.Module, path: str | Path, source: str, num_classes: int,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as state_dict + metadata (atomically). ``source`` is the architecture it was
    built from (a checkpoint path is resolved to that checkpoint's architecture); ``meta`` is
    free-form JSON-like data (seed, accuracy, data)."""
    arch = load_checkpoint(source)["arch"] if is_checkpoint_path(source) else source
    ckpt = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": int(num_classes),
            "in_channels": _first_conv(model)[1].in_channels,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "meta": dict(meta or {})}
    with atomic_file(path, overwrite=True) as tmp:
        torch.save(ckpt, tmp)
    return Path(path).expanduser()
