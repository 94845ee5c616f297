"""What medslim's nnU-Net trainers call (``nnunet_plugin/medslim_trainers.py``): pretrained
weights, compression of the live network, plans for the compressed network, optimizer and
learning-rate schedule. Torch and plain plans dicts; of nnU-Net only its poly lr scheduler."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medslim.compress import compress_network
from medslim.errors import MedslimError
from medslim.finetune.config import FinetuneConfig
from medslim.network import CompressedUNet, compressed_arch
from medslim.spec import CompressionSpec


def pretrained_weights_arg(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The ``-pretrained_weights`` value of an ``nnUNetv2_train`` command line, else
    ``MEDSLIM_PRETRAINED_WEIGHTS`` (for ``run_training()`` called from Python)."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "-pretrained_weights" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return environ.get("MEDSLIM_PRETRAINED_WEIGHTS") or None


def load_full_weights(net: nn.Module, path: str | Path) -> None:
    """Load every tensor of an nnU-Net checkpoint into ``net``, segmentation heads included
    (nnU-Net's ``load_pretrained_weights`` skips them; compress-then-fine-tune needs them).

    Raises:
        MedslimError: missing file, not an nnU-Net checkpoint, or keys/shapes that differ from ``net``.
    """
    path = Path(path)
    if not path.is_file():
        raise MedslimError(f"-pretrained_weights {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise MedslimError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    weights = {k.removeprefix("module."): v for k, v in ckpt["network_weights"].items()}
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise MedslimError(f"{path} does not match the plans' network: {len(missing)} tensors missing, "
                           f"e.g. '{missing[0]}' (trained with other plans, or already compressed?)")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise MedslimError(f"{path} does not match the plans' network: '{key}' has shape "
                               f"{tuple(weights[key].shape)}, the plans build {tuple(value.shape)}")
    net.load_state_dict({k: weights[k] for k in own})


def compress_live(net: nn.Module, config: FinetuneConfig, input_shape: Sequence[int],
                  calibration: torch.Tensor | None = None,
                  calibration_target: torch.Tensor | None = None) -> tuple[CompressedUNet, dict]:
    """Compress the trainer's (pretrained) U-Net; returns the ``CompressedUNet`` (train mode,
    deep supervision as ``net`` had it, heads following the pruned channels) and a small report.

    ``calibration`` ``[B, C, *patch]`` (and labels ``[B, *patch]``) feed data-aware criteria."""
    from medslim.measure import count_parameters

    ds = bool(getattr(net.decoder, "deep_supervision", False))
    net.decoder.deep_supervision = False
    try:
        result = compress_network(net, config.stage_compression(), input_shape, calibration=calibration,
                                  calibration_target=calibration_target)
    finally:
        net.decoder.deep_supervision = ds
    out = CompressedUNet.wrap(result.network, result.spec)
    out.decoder.deep_supervision = ds
    report = {"parameters_before": count_parameters(net), "parameters_after": count_parameters(out),
              "seconds": result.seconds}
    return out.train(), report


def compressed_plans(plans: Mapping[str, Any], configuration: str, spec: CompressionSpec) -> dict[str, Any]:
    """``plans`` whose ``configuration`` builds ``CompressedUNet`` with ``spec``."""
    new = copy.deepcopy(dict(plans))
    cfg = new["configurations"][configuration]
    base = cfg.get("architecture")
    if base is None:
        raise MedslimError(f"configuration '{configuration}' has no 'architecture' entry of its own "
                           "(inherits_from is not supported for compression)")
    cfg["architecture"] = compressed_arch(base, spec)
    return new


def build_compressed(arch_kwargs: Mapping[str, Any], num_input_channels: int, num_output_channels: int,
                     deep_supervision: bool) -> CompressedUNet:
    """``CompressedUNet`` from a plans ``arch_kwargs`` entry (what ``build_network_architecture`` calls)."""
    return CompressedUNet(num_input_channels, num_output_channels, deep_supervision=deep_supervision,
                          **dict(arch_kwargs))


def check_rebuild(net: nn.Module, plans: Mapping[str, Any], configuration: str, num_input_channels: int,
                  num_output_channels: int) -> None:
    """Raises ``MedslimError`` unless the plans rebuild a network with ``net``'s exact tensors."""
    arch = plans["configurations"][configuration]["architecture"]
    rebuilt = build_compressed(arch["arch_kwargs"], num_input_channels, num_output_channels, True).state_dict()
    own = net.state_dict()
    if list(rebuilt) != list(own) or any(rebuilt[k].shape != own[k].shape for k in own):
        raise MedslimError("the compressed network cannot be rebuilt from its plans; please report this as a medslim bug")


def reinitialize(net: nn.Module) -> nn.Module:
    """Re-draw every weight as nnU-Net initialises a new network (convs He normal, negative
    slope 1e-2, biases 0; norms γ 1, β 0): the train-from-scratch control keeps the
    architecture, not the weights."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    net.apply(InitWeights_He(1e-2))
    for m in net.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.reset_parameters()
    return net


class ConstantLR:
    """Keeps the learning rate; ``step(epoch)`` as nnU-Net calls it (nnU-Net has no constant
    scheduler, and torch's ``ConstantLR`` does not take the epoch nnU-Net passes)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        self.optimizer, self.lr = optimizer, lr

    def step(self, current_step: int | None = None) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr}


def make_optimizer(params, config: FinetuneConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer + per-epoch lr schedule of ``config`` (``poly`` is nnU-Net's own scheduler)."""
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.99, nesterov=True)
    if config.lr_schedule == "poly":
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        return opt, PolyLRScheduler(opt, config.lr, config.epochs)
    return opt, ConstantLR(opt, config.lr)
