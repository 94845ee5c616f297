"""Network runtimes for one sliding-window patch: PyTorch, ONNX Runtime, OpenVINO.

A backend turns a network into a ``PatchRunner``: ``runner(x)`` maps one patch
``x: float32 [1, C_in, *patch]`` (NumPy) to logits ``float32 [1, K, *patch]``. The exported
runtimes take a fixed patch shape (static shapes let them plan memory and pick kernels: on
this project's CPU, ONNX Runtime ran the compressed TotalSegmentator architecture 1.3× slower
with free spatial dimensions), and write into one output buffer that they reuse, so the
caller must consume (or copy) an output before the next call.

``auto`` picks by device: CUDA → ``torch``; CPU → ``openvino``, else ``onnxruntime``, else
``torch`` (the order measured by ``scripts/bench_speed.py``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medslim.errors import MedslimError, did_you_mean

PatchRunner = Callable[[np.ndarray], np.ndarray]

BACKENDS = ("torch", "onnxruntime", "openvino")
#: the Python module each backend needs, and the pip name that installs it
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino")}


def is_installed(backend: str) -> bool:
    module = _PACKAGES.get(backend, ("torch",))[0]
    return importlib.util.find_spec(module) is not None


def resolve_backend(name: str, device: str = "cpu") -> str:
    """The backend to run: ``name`` checked, or the fastest installed one for ``auto``.

    Raises:
        MedslimError: unknown name, a backend that is not installed, or an exported runtime
            asked to run on CUDA (medslim runs those on CPU only).
    """
    if name == "auto":
        if device != "cpu":
            return "torch"
        return next((b for b in ("openvino", "onnxruntime") if is_installed(b)), "torch")
    if name not in BACKENDS:
        raise MedslimError(f"unknown backend '{name}' (choose auto, {', '.join(BACKENDS)})"
                           f"{did_you_mean(name, list(BACKENDS))}")
    if not is_installed(name):
        raise MedslimError(f"backend '{name}' is not installed; pip install {_PACKAGES[name][1]} "
                           f"(or medslim[fast]), or use --backend torch")
    if name != "torch" and device != "cpu":
        raise MedslimError(f"backend '{name}' runs on CPU here; use --backend torch for --device {device}")
    return name


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime runs: CPU threads (``None``: the runtime's own choice). Every backend
    computes in float32."""

    threads: int | None = None


def torch_runner(net, device: str = "cpu") -> PatchRunner:
    """Eager PyTorch, ``inference_mode``. On CPU the network runs channels-last with its
    instance norms as ``group_norm`` (``medslim.infer.layout``: 2× faster on the compressed
    TotalSegmentator architecture); on CUDA as nnU-Net builds it."""
    import torch

    from medslim.infer.layout import channels_last

    dev = torch.device(device)
    net = net.to(dev).eval()
    fmt = None
    if dev.type == "cpu":
        net, fmt = channels_last(net)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(dev)
            y = net(t.contiguous(memory_format=fmt) if fmt is not None else t)
            return y.float().contiguous().cpu().numpy()
    return run


def onnxruntime_runner(onnx_path: Path, patch_shape: Sequence[int], channels: int,
                       options: RuntimeOptions) -> PatchRunner:
    """ONNX Runtime CPU session with the spatial axes fixed to the patch and a bound output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads:
        so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    for axis, size in enumerate(patch_shape[2:]):
        so.add_free_dimension_override_by_name(f"d{axis}", int(size))
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    out = np.empty((1, channels, *patch_shape[2:]), np.float32)
    binding = session.io_binding()
    binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)

    def run(x: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input("image", np.ascontiguousarray(x, np.float32))
        session.run_with_iobinding(binding)
        return out
    return run


def exported_runner(backend: str, onnx_path: Path, patch_shape: Sequence[int], channels: int,
                    options: RuntimeOptions) -> PatchRunner:
    """The ``onnxruntime`` or ``openvino`` runner of an ONNX file (OpenVINO's compiled-model
    cache beside medslim's ONNX cache)."""
    if backend == "onnxruntime":
        return onnxruntime_runner(onnx_path, patch_shape, channels, options)
    from medslim.cache import cache_root

    return openvino_runner(onnx_path, patch_shape, cache_root() / "openvino", options)


def openvino_runner(onnx_path: Path, patch_shape: Sequence[int], cache_dir: Path | None,
                    options: RuntimeOptions) -> PatchRunner:
    """OpenVINO CPU plugin, latency mode, the model reshaped to the patch. ``f32`` must be asked
    for: on CPUs with bf16 units OpenVINO picks bf16 by itself."""
    import openvino as ov

    core = ov.Core()
    if cache_dir is not None:
        core.set_property({"CACHE_DIR": str(cache_dir)})
    model = core.read_model(str(onnx_path))
    model.reshape([int(s) for s in patch_shape])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    request = core.compile_model(model, "CPU", config).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, np.float32)})
        return request.get_output_tensor(0).data
    return run
