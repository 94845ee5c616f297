"""Export a network to ONNX once per model, and keep it in a cache.

The exported file is keyed by the checkpoint (path, size, modification time), the
architecture, the input channels and the versions that shape the graph, so a changed model or
an upgraded torch re-exports, and everything else is read back (export costs seconds; reading
costs milliseconds). Export traces a small input with free spatial axes ``d0, d1, …``: tracing
at the full patch would run one full forward pass (12 s for TotalSegmentator's 3 mm model on
2 CPU threads); the runtimes fix the axes to the patch when they load the file.

The cache lives in ``$MEDSLIM_CACHE`` (default ``~/.cache/medslim``); it holds nothing the
model folder does not determine, so it may be deleted at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from medslim.cache import cache_root
from medslim.errors import MedslimError


def model_key(checkpoint: Path, architecture: Mapping[str, Any], input_channels: int) -> str:
    """A digest that changes whenever the exported graph or weights could change."""
    import torch

    import medslim

    stat = checkpoint.stat()
    ident = {"checkpoint": str(checkpoint.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
             "architecture": architecture, "input_channels": input_channels, "torch": torch.__version__,
             "medslim": getattr(medslim, "__version__", "0")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def export_onnx(net: nn.Module, example, path: Path) -> Path:
    """Write ``net`` (eval mode) to ``path`` with input ``image`` ``[1, C, d0, d1, …]`` and
    output ``logits`` ``[1, K, d0, d1, …]``; atomic (temp file, then rename).

    ``example`` is a small valid input ``[1, C, *size]`` (every size divisible by the
    network's total stride). In-place activations are switched off for tracing (numerically
    identical).
    """
    import torch

    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    spatial = {axis + 2: f"d{axis}" for axis in range(example.ndim - 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "instance_norm exported with train=True": it normalises by input statistics either way
            torch.onnx.export(net.eval(), example, tmp, dynamo=False, opset_version=17, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": spatial, "logits": spatial})
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise MedslimError(f"cannot export this network to ONNX ({type(e).__name__}: {e}); use --backend torch") from e
    return path


def cached_onnx(net_factory, example_factory, key: str) -> tuple[Path, bool]:
    """``(path, exported_now)``: the cached ONNX file for ``key``, exported first if missing.
    The factories are only called when an export is needed."""
    path = cache_root() / "onnx" / f"{key}.onnx"
    if path.is_file():
        return path, False
    return export_onnx(net_factory(), example_factory(), path), True
