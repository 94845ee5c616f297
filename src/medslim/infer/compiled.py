"""A loaded PyTorch network as a callable on the fastest runtime, for code that drives its own
sliding window (the MONAI bundle's ``SlidingWindowInferer``).

The ONNX export is cached by a digest of the network's class and weights, so a bundle
re-run reads it back instead of exporting again.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import nn

from medslim.infer.backends import RuntimeOptions, exported_runner, resolve_backend


def weights_key(network: nn.Module) -> str:
    """Digest of the network's class, parameter/buffer names, shapes and values."""
    h = hashlib.sha256(type(network).__qualname__.encode())
    for name, tensor in network.state_dict().items():
        h.update(name.encode() + str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def compile_network(network: nn.Module, patch_shape: Sequence[int], backend: str = "auto",
                    device: torch.device | str = "cpu",
                    options: RuntimeOptions | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``network`` (eval mode, weights loaded) as ``f(x [1, C, *patch]) -> logits [1, K, *patch]``
    on ``backend`` (``auto``: OpenVINO, else ONNX Runtime on CPU; PyTorch on CUDA or when
    neither is installed). PyTorch returns ``network`` itself.

    Raises:
        MedslimError: unknown or not installed backend (see ``resolve_backend``).
    """
    from medslim.infer.onnx_export import cached_onnx
    from medslim.prune import example_input

    device = torch.device(device)
    name = resolve_backend(backend, device.type)
    if name == "torch":
        return network
    network = network.cpu().eval()
    example = example_input(network, int(patch_shape[1]), patch_size=patch_shape[2:])
    with torch.no_grad():
        channels = int(network(example).shape[1])
    path, _ = cached_onnx(lambda: network, lambda: example, f"net-{weights_key(network)}")
    run = exported_runner(name, path, patch_shape, channels, options or RuntimeOptions())

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(x.detach().cpu().float().numpy()).copy()).to(x.device)
    return forward
