"""Layer latency on the device that runs the model: measured once per (device, layer shape)
and cached as JSON, for the ``latency`` rank guard and the ``latency`` rank policy.

A layer is identified by its ``LayerSignature`` (conv type, channels, kernel, stride,
padding, dilation, Tucker ranks or dense, input spatial shape); its time is the median of a
few torch-eager forward passes of a freshly built module of that signature on a zero input
of batch 1 (nnU-Net predicts patch by patch). Weights do not matter for dense float32 convs,
so the time depends on the signature alone and can be cached.

Cache: ``$MEDSLIM_CACHE/latency/<device-key>.json`` (default ``~/.cache/medslim``), one file
per device key = CPU (or GPU) model + torch version + device type + thread count. Each new
measurement is written at once, atomically; a corrupt file is ignored with a warning and
rewritten. A cached entry is never measured again.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from medslim.cache import cache_root
from medslim.decompose.tucker import TuckerConv
from medslim.errors import MedslimError
from medslim.spec import LayerRanks

CACHE_FORMAT = 1

# measure(module, input_shape, *, threads) -> seconds; ``measure_seconds`` or a test double
Measure = Callable[..., float]


def measure_seconds(module: nn.Module, input_shape: Sequence[int], *, threads: int, repeats: int = 3,
                    warmup: int = 1) -> float:
    """Median wall-clock seconds of ``module(x)``, ``x`` a float32 zero tensor of
    ``input_shape`` (``[N, C, *spatial]``) on the module's device; torch eager,
    ``inference_mode``, ``threads`` intra-op threads (the previous count is restored).
    ``warmup`` untimed calls first (oneDNN builds its kernels on the first call)."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"need repeats ≥ 1, warmup ≥ 0, threads ≥ 1; got {repeats}, {warmup}, {threads}")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            x = torch.zeros(tuple(input_shape), dtype=torch.float32, device=device)
            for _ in range(warmup):
                module(x)
            sync()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                module(x)
                sync()
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


@dataclass(frozen=True)
class LayerSignature:
    """What a conv's latency depends on. ``ranks``: Tucker ``(rank_in, rank_out)`` (``None``
    for a mode left dense), or ``None`` for the dense conv. ``spatial``: input spatial shape."""

    op: str  # "Conv3d", "ConvTranspose3d", …
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    padding_mode: str
    bias: bool
    ranks: tuple[int | None, int | None] | None
    spatial: tuple[int, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.c_in, *self.spatial)

    def key(self) -> str:
        """Stable, readable cache key, e.g. ``Conv3d 32>32 k3x3x3 s1x1x1 p1x1x1 d1x1x1 op0x0x0
        zeros bias tucker=10,10 @112x112x128``."""
        def dims(t: Iterable[int]) -> str:
            return "x".join(str(int(v)) for v in t)
        form = "dense" if self.ranks is None else "tucker=" + ",".join("-" if r is None else str(r) for r in self.ranks)
        return (f"{self.op} {self.c_in}>{self.c_out} k{dims(self.kernel)} s{dims(self.stride)} p{dims(self.padding)} "
                f"d{dims(self.dilation)} op{dims(self.output_padding)} {self.padding_mode} "
                f"{'bias' if self.bias else 'nobias'} "
                f"{form} @{dims(self.spatial)}")


def layer_signature(conv: _ConvNd, spatial: Sequence[int], ranks: LayerRanks | None = None) -> LayerSignature:
    """Signature of ``conv`` (dense if ``ranks`` is None, else its ``TuckerConv``) on an input
    with spatial shape ``spatial``."""
    if isinstance(conv.padding, str):
        raise MedslimError(f"latency measurement needs numeric conv padding, got padding={conv.padding!r}")
    # the torch class itself (a subclass of nn.Conv3d times like nn.Conv3d)
    op = next(c.__name__ for c in type(conv).__mro__ if getattr(nn, c.__name__, None) is c)
    return LayerSignature(
        op=op, c_in=conv.in_channels, c_out=conv.out_channels,
        kernel=tuple(conv.kernel_size), stride=tuple(conv.stride), padding=tuple(conv.padding),
        dilation=tuple(conv.dilation), output_padding=tuple(conv.output_padding),
        padding_mode=conv.padding_mode, bias=conv.bias is not None,
        ranks=None if ranks is None else (ranks.rank_in, ranks.rank_out), spatial=tuple(int(s) for s in spatial))


def build_layer(sig: LayerSignature, device: str | torch.device = "cpu") -> nn.Module:
    """A fresh module of ``sig`` (default-initialised, eval mode, no grad) on ``device``."""
    conv_type = getattr(nn, sig.op)
    kw = dict(stride=sig.stride, padding=sig.padding, dilation=sig.dilation, padding_mode=sig.padding_mode,
              bias=sig.bias, device=device)
    if "Transpose" in sig.op:
        kw["output_padding"] = sig.output_padding
    conv = conv_type(sig.c_in, sig.c_out, sig.kernel, **kw)
    module = conv if sig.ranks is None else TuckerConv.empty_like(conv, *sig.ranks)
    return module.eval().requires_grad_(False)


def device_key(threads: int, device: str = "cpu") -> str:
    """``<processor model>__torch-<version>__<device type>__<threads>t``, safe as a file name."""
    kind = torch.device(device).type
    model = torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else cpu_model()
    raw = f"{model}__torch-{torch.__version__}__{kind}__{threads}t"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", raw).strip("-")


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


class LatencyCache:
    """Seconds by ``LayerSignature.key()`` for one device, persisted at ``path`` as
    ``{"format": 1, "device": key, "seconds": {signature key: seconds}}``."""

    def __init__(self, path: str | Path, device: str = "") -> None:
        self.path = Path(path)
        self.device = device
        self.entries: dict[str, float] = _read_entries(self.path, warn=True)

    @classmethod
    def for_device(cls, key: str, root: str | Path | None = None) -> "LatencyCache":
        """The cache file of device ``key`` under ``root`` (default ``cache_root()``)."""
        return cls(Path(root or cache_root()) / "latency" / f"{key}.json", device=key)

    def get(self, sig: LayerSignature) -> float | None:
        return self.entries.get(sig.key())

    def put(self, sig: LayerSignature, seconds: float) -> None:
        """Store and save at once (merging what another process saved meanwhile)."""
        self.entries[sig.key()] = float(seconds)
        self.save()

    def save(self) -> None:
        """Atomic write: temp file in the same folder, then ``os.replace``."""
        merged = {**_read_entries(self.path, warn=False), **self.entries}
        self.entries = merged
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "device": self.device, "seconds": merged}, f, indent=1,
                          sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read_entries(path: Path, *, warn: bool) -> dict[str, float]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["seconds"] if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
        if not isinstance(entries, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in entries.values()):
            raise ValueError("not a medslim latency cache")
        return {str(k): float(v) for k, v in entries.items()}
    except (OSError, ValueError, KeyError) as e:
        if warn:
            warnings.warn(f"ignoring the unreadable latency cache {path} ({e}); it will be rewritten",
                          RuntimeWarning, stacklevel=3)
        return {}


class LayerTimer:
    """Seconds of a layer signature: from the cache, else measured once (``measure``) and
    cached. ``measured`` counts the measurements this timer made."""

    def __init__(self, cache: LatencyCache | None = None, *, threads: int | None = None,
                 measure: Measure = measure_seconds, device: str = "cpu") -> None:
        self.threads = int(threads or torch.get_num_threads())
        self.device = device
        self.cache = cache if cache is not None else LatencyCache.for_device(device_key(self.threads, device))
        self.measure = measure
        self.measured = 0

    def seconds(self, sig: LayerSignature) -> float:
        hit = self.cache.get(sig)
        if hit is not None:
            return hit
        seconds = float(self.measure(build_layer(sig, self.device), sig.input_shape, threads=self.threads))
        self.measured += 1
        self.cache.put(sig, seconds)
        return seconds

    def layer_seconds(self, conv: _ConvNd, spatial: Sequence[int], ranks: LayerRanks | None = None) -> float:
        """Seconds of ``conv`` (dense if ``ranks`` is None, else its ``TuckerConv``)."""
        return self.seconds(layer_signature(conv, spatial, ranks))


def conv_input_shapes(net: nn.Module, input_shape: Sequence[int],
                      names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Input shape ``[N, C_in, *spatial]`` of each named module of ``net`` for one input of
    ``input_shape``, from forward hooks. Runs on the meta device (shapes only, no compute);
    falls back to one real forward pass on zeros (inference_mode) if an op has no meta
    kernel. ``net`` is not modified.

    Raises:
        MedslimError: the network does not run on ``input_shape`` (e.g. a patch too small for
            its strides), or a named module is never called by ``net.forward``.
    """
    names = list(names)
    try:
        try:
            shapes = _hooked_shapes(copy.deepcopy(net).to("meta"), input_shape, names, "meta")
        except (NotImplementedError, RuntimeError):
            shapes = _hooked_shapes(net, input_shape, names, "cpu")
    except (RuntimeError, ValueError) as e:
        raise MedslimError(f"the network does not run on input shape {list(input_shape)}: {e}") from e
    missing = [n for n in names if n not in shapes]
    if missing:
        raise MedslimError(f"`{missing[0]}` is not called in the network's forward pass for input {list(input_shape)}; "
                           f"cannot measure its latency")
    return shapes


def _hooked_shapes(net: nn.Module, input_shape: Sequence[int], names: list[str],
                   device: str) -> dict[str, tuple[int, ...]]:
    modules = dict(net.named_modules(remove_duplicate=False))
    by_id: dict[int, list[str]] = {}
    for n in names:
        by_id.setdefault(id(modules[n]), []).append(n)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        for n in by_id[id(module)]:
            shapes.setdefault(n, tuple(args[0].shape))

    handles = [modules[ns[0]].register_forward_pre_hook(hook) for ns in by_id.values()]
    was_training = net.training
    try:
        with torch.inference_mode():
            net.eval()(torch.zeros(tuple(input_shape), device=device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def format_seconds(s: float) -> str:
    """``0.91 s`` or ``3.2 ms``."""
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"
