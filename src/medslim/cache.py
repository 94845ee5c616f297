"""Where medslim keeps what it can recompute (ONNX exports, OpenVINO blobs, layer latencies)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEDSLIM_CACHE"


def cache_root() -> Path:
    """``$MEDSLIM_CACHE`` or ``~/.cache/medslim``; safe to delete at any time."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medslim").expanduser()
