"""A pruned classifier on disk: base architecture + kept-channel spec (JSON) + state_dict.

Folder layout (never a pickled module)::

    pruned_spec.json   {"format", "base": {arch, num_classes, in_channels}, "input_shape",
                        "compression": CompressionSpec.to_dict() (kept channels per group
                        root; Tucker ranks for DPRP's factored convs)}
    model.pt           state_dict of the pruned model (tensors only)

:func:`load_pruned_classifier` builds the base with ``medslim.classify.build_classifier``,
replays the spec with ``medslim.network.rebuild`` and loads the weights strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medslim.errors import MedslimError
from medslim.spec import CompressionSpec, LayerRanks

FORMAT = "medslim.pruned-classifier/1"
SPEC_FILE, WEIGHTS_FILE = "pruned_spec.json", "model.pt"


def save_pruned_classifier(model: nn.Module, folder: str | Path, *, arch: str, num_classes: int,
                           in_channels: int, input_shape: Sequence[int], kept: Mapping[str, Sequence[int]],
                           provenance: Mapping[str, Any] | None = None,
                           ranks: Mapping[str, LayerRanks] | None = None) -> Path:
    """Write ``pruned_spec.json`` and ``model.pt`` into an existing ``folder``.

    Args:
        arch: base architecture as ``build_classifier`` takes it (``resnet18``, ``timm:<name>``).
        input_shape: ``[B, C, H, W]`` the kept channels were traced with.
        kept: ``ClassifierPruneReport.kept`` (group root → kept output channels).
        ranks: convs written as ``TuckerConv`` (DPRP), by name.
    """
    folder = Path(folder)
    spec = CompressionSpec(ranks=dict(ranks or {}), kept={k: tuple(int(i) for i in v) for k, v in kept.items()},
                           provenance=dict(provenance or {}))
    doc = {"format": FORMAT, "base": {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels)},
           "input_shape": [int(s) for s in input_shape], "compression": spec.to_dict()}
    (folder / SPEC_FILE).write_text(json.dumps(doc, indent=1))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    return folder


def read_pruned_spec(folder: str | Path) -> dict[str, Any]:
    """The parsed ``pruned_spec.json`` of ``folder``.

    Raises:
        MedslimError: missing/unreadable file or another format.
    """
    path = Path(folder).expanduser() / SPEC_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedslimError(f"cannot read the pruned-classifier spec {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MedslimError(f"{path} is not a medslim pruned-classifier spec (expected format '{FORMAT}')")
    return doc


def rebuild_pruned(base: nn.Module, doc: Mapping[str, Any]) -> nn.Module:
    """``base`` (may be modified) with the ranks and kept channels of a spec document; weights
    are placeholders until a state_dict is loaded."""
    from medslim.network import rebuild

    spec = CompressionSpec.from_dict(doc["compression"])
    param = next(base.parameters())
    example = torch.zeros(tuple(doc["input_shape"]), dtype=param.dtype, device=param.device)
    return rebuild(base, spec, int(doc["input_shape"][1]), example)


def load_pruned_classifier(folder: str | Path) -> nn.Module:
    """Rebuild a pruned classifier written by :func:`save_pruned_classifier` (eval mode).

    Raises:
        MedslimError: missing files, another format, or weights that do not fit the spec.
    """
    from medslim.classify.models import build_classifier

    folder = Path(folder).expanduser()
    doc = read_pruned_spec(folder)
    base = doc["base"]
    model = rebuild_pruned(build_classifier(base["arch"], base["num_classes"], base["in_channels"]), doc)
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as e:
        raise MedslimError(f"cannot load the pruned weights {folder / WEIGHTS_FILE}: {str(e).splitlines()[0]}") from None
    return model.eval()
