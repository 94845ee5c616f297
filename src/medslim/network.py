"""``CompressedUNet``: a compressed nnU-Net rebuilt from its base architecture + a spec.

nnU-Net plans name this class (``network_class_name: "medslim.network.CompressedUNet"``) and
nnU-Net's ``get_network_from_plans`` calls it with the plans' ``arch_kwargs``::

    {"base_network_class_name": "dynamic_network_architectures...PlainConvUNet",
     "base_arch_kwargs": {...the original arch_kwargs...},
     "base_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
     "compression": {...CompressionSpec.to_dict()...}}

The module exposes ``encoder`` and ``decoder`` exactly like the base U-Net, so state-dict keys,
``decoder.deep_supervision`` (toggled by nnU-Net trainers) and the forward pass are unchanged.
MONAI bundle configs name the same class with ``_target_``.
"""
from __future__ import annotations

import copy
import pydoc
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medslim.decompose import apply_cp, apply_ranks
from medslim.errors import MedslimError
from medslim.prune import apply_kept, example_input
from medslim.spec import CompressionSpec


def build_base_network(class_name: str, arch_kwargs: Mapping[str, Any], requires_import: Sequence[str],
                       input_channels: int, num_classes: int, deep_supervision: bool = False) -> nn.Module:
    """Instantiate an nnU-Net architecture from plans entries (strings resolved by ``pydoc``)."""
    cls = pydoc.locate(class_name)
    if cls is None:
        raise MedslimError(f"network class '{class_name}' cannot be imported; is the package that defines it installed?")
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        if kwargs.get(key) is not None:
            resolved = pydoc.locate(kwargs[key])
            if resolved is None:
                raise MedslimError(f"plans entry {key}='{kwargs[key]}' cannot be imported")
            kwargs[key] = resolved
    kwargs["deep_supervision"] = deep_supervision
    return cls(input_channels=input_channels, num_classes=num_classes, **kwargs)


def rebuild(base: nn.Module, spec: CompressionSpec, input_channels: int,
            example: torch.Tensor | None = None) -> nn.Module:
    """``base`` with a spec's structure: Tucker ranks and CP blocks, then kept channels
    (traced on ``example``, by default a small input of ``base``'s family). Weights are
    placeholders; load a state dict afterwards. ``base`` may be modified. 2D or 3D, as
    ``base`` convolves (the plans' ``conv_op``)."""
    net = apply_ranks(base, spec.ranks) if spec.ranks else base
    net = apply_cp(net, spec.cp) if spec.cp else net
    if not spec.kept:
        return net
    return apply_kept(net, spec.kept, example_input(net, input_channels) if example is None else example)


class CompressedUNet(nn.Module):
    """A ``PlainConvUNet``/``ResidualEncoderUNet`` with Tucker-2 or CP layers and pruned channels.

    Args:
        input_channels: image channels (nnU-Net passes it).
        num_classes: segmentation outputs (nnU-Net passes it).
        base_network_class_name: dotted path of the uncompressed architecture.
        base_arch_kwargs: its ``arch_kwargs`` from the original plans (strings as in plans).
        base_kw_requires_import: which of those kwargs are dotted paths to import.
        compression: ``CompressionSpec.to_dict()``.
        deep_supervision: as in nnU-Net's U-Nets.
    Input ``[B, input_channels, *patch]`` → logits ``[B, num_classes, *patch]`` (a list of
    logits at decreasing resolution when deep supervision is on).
    """

    def __init__(self, input_channels: int, num_classes: int, base_network_class_name: str,
                 base_arch_kwargs: Mapping[str, Any], compression: Mapping[str, Any],
                 base_kw_requires_import: Sequence[str] = ("conv_op", "norm_op", "dropout_op", "nonlin"),
                 deep_supervision: bool = False) -> None:
        super().__init__()
        spec = CompressionSpec.from_dict(compression)
        base = build_base_network(base_network_class_name, base_arch_kwargs, base_kw_requires_import,
                                  input_channels, num_classes, deep_supervision)
        net = rebuild(base, spec, input_channels)
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.spec = spec

    @classmethod
    def wrap(cls, net: nn.Module, spec: CompressionSpec) -> "CompressedUNet":
        """Adopt an already compressed U-Net (from the pipeline) without rebuilding it."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.encoder = net.encoder
        obj.decoder = net.decoder
        obj.spec = spec
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


#: the dotted path nnU-Net plans and bundle configs use for ``CompressedUNet``
COMPRESSED_CLASS = f"{CompressedUNet.__module__}.{CompressedUNet.__name__}"


def is_compressed(architecture: Mapping[str, Any]) -> bool:
    """Whether a plans ``architecture`` entry builds a medslim ``CompressedUNet``."""
    return architecture.get("network_class_name") == COMPRESSED_CLASS


def compressed_arch(base_architecture: Mapping[str, Any], spec: CompressionSpec) -> dict[str, Any]:
    """The plans ``architecture`` entry that makes nnU-Net build ``CompressedUNet``."""
    base = copy.deepcopy(dict(base_architecture))
    if is_compressed(base):
        raise MedslimError("this model is already compressed by medslim; compress the original model instead")
    return {
        "network_class_name": COMPRESSED_CLASS,
        "arch_kwargs": {
            "base_network_class_name": base["network_class_name"],
            "base_arch_kwargs": base["arch_kwargs"],
            "base_kw_requires_import": list(base.get("_kw_requires_import", [])),
            "compression": spec.to_dict(),
        },
        "_kw_requires_import": [],
    }
