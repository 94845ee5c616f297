"""Where one patch's time goes, per layer, on the backend that runs it: forward hooks on the
PyTorch modules, OpenVINO's performance counters, or ONNX Runtime's profiler."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn


def profile_layers(predictor, net: nn.Module, shape: Sequence[int], top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` layers by time for one patch ``[1, C, *patch]`` (after one warm-up call):
    ``[{"layer", "op", "ms", "share"}]``, ``share`` of the summed layer time."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if predictor.backend == "openvino":
        rows = _openvino(predictor, x)
    elif predictor.backend == "onnxruntime":
        rows = _onnxruntime(predictor, x)
    else:  # what the torch backend runs: the trunk, channels-last on CPU
        from medslim.infer.head import trunk
        from medslim.infer.layout import channels_last

        body, fmt = channels_last(trunk(net) if predictor.head is not None else net)
        rows = _torch(body, x, fmt)
    total = sum(r["ms"] for r in rows) or 1.0
    rows = sorted(rows, key=lambda r: -r["ms"])[:top]
    return [{**r, "ms": round(r["ms"], 2), "share": round(r["ms"] / total, 4)} for r in rows]


def _torch(net: nn.Module, x: np.ndarray, memory_format=None) -> list[dict[str, Any]]:
    import torch

    t = torch.from_numpy(x)
    t = t.contiguous(memory_format=memory_format) if memory_format is not None else t

    spent: dict[str, float] = defaultdict(float)
    kinds: dict[str, str] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, module in net.named_modules():
        if next(module.children(), None) is None:  # leaves only: parents would count twice
            kinds[name] = type(module).__name__
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, i, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - starts[n])))
    with torch.inference_mode():
        net(t)
        spent.clear()
        net(t)
    for h in handles:
        h.remove()
    return [{"layer": n, "op": kinds[n], "ms": s * 1e3} for n, s in spent.items()]


def _openvino(predictor, x: np.ndarray) -> list[dict[str, Any]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(predictor.onnx_path))
    model.reshape(list(x.shape))
    request = core.compile_model(model, "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    request.infer({0: x})
    request.infer({0: x})
    return [{"layer": p.node_name, "op": p.node_type, "ms": p.real_time.total_seconds() * 1e3}
            for p in request.profiling_info if p.real_time.total_seconds() > 0]


def _onnxruntime(predictor, x: np.ndarray) -> list[dict[str, Any]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    session = ort.InferenceSession(str(predictor.onnx_path), so, providers=["CPUExecutionProvider"])
    session.run(None, {"image": x})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    return [{"layer": e["name"].removesuffix("_kernel_time"), "op": e.get("args", {}).get("op_name", ""),
             "ms": e["dur"] / 1e3} for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
