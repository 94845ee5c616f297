"""``CompressedNetwork``: a compressed MONAI network rebuilt from a bundle's original
``network_def`` + a compression spec (the class a compressed bundle's configs name)."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from medslim.errors import MedslimError, first_line
from medslim.network import rebuild
from medslim.spec import CompressionSpec


def build_network_def(network_def: Mapping[str, Any]) -> nn.Module:
    """Instantiate a bundle-config network dict (``_target_`` + arguments) with MONAI's
    ``ConfigParser``; MONAI's short class names (``"UNet"``) resolve as in a bundle.

    Raises:
        MedslimError: the dict cannot be instantiated or does not build a ``torch.nn.Module``.
    """
    from monai.bundle import ConfigParser

    try:
        net = ConfigParser({"network_def": copy.deepcopy(dict(network_def))}).get_parsed_content("network_def")
    except Exception as e:  # MONAI wraps every instantiation failure in its own exception types
        raise MedslimError(f"network_def {network_def.get('_target_')!r} cannot be built: {first_line(e)}") from e
    if not isinstance(net, nn.Module):
        raise MedslimError(f"network_def builds a {type(net).__name__}, not a torch.nn.Module")
    return net


class CompressedNetwork(nn.Module):
    """A MONAI ``UNet``/``SegResNet``/``DynUNet``/``BasicUNet`` with Tucker-2 or CP layers and
    pruned channels, rebuilt from the bundle's original ``network_def`` and a spec.

    A compressed bundle's configs name it in place of the original network::

        "network_def": {"_target_": "medslim.bundle.network.CompressedNetwork",
                        "network_def": {...the original network_def, unchanged...},
                        "compression": {...CompressionSpec.to_dict()...}}

    It wraps rather than adopts: MONAI's forward passes call methods of their own class
    (``SegResNet.encode``/``decode``, ``DynUNet``'s skip layers and heads list), so the rebuilt
    network keeps its class and is the child ``network`` (as ``DataParallel.module``); its
    state-dict keys are the base network's prefixed with ``network.``. ``forward``,
    ``train``/``eval`` and DynUNet's deep supervision (heads returned in training mode) are the
    base network's; read or set its attributes on ``.network``.

    Args:
        network_def: the original network, either as a bundle-config dict (instantiated with
            ``ConfigParser``, see ``build_network_def``) or as the module a bundle's
            ``ConfigParser`` has already built from the nested dict (it instantiates nested
            ``_target_`` dicts first, in the config's own context, so ``@`` references in the
            original ``network_def`` resolve). Its weights are discarded.
        compression: ``CompressionSpec.to_dict()``, names in the base network.
    Input ``[B, C_in, *spatial]`` → the base network's output: logits ``[B, C_out, *spatial]``
    (a DynUNet with deep supervision, in training mode: ``[B, 1 + deep_supr_num, C_out, *spatial]``).
    Weights are placeholders until ``load_state_dict``; training mode, like a new base network.

    Raises:
        MedslimError: ``network_def`` cannot be built; a malformed spec, or one that does not
            fit the network (layer names, channel counts).
    """

    def __init__(self, network_def: Mapping[str, Any] | nn.Module, compression: Mapping[str, Any]) -> None:
        super().__init__()
        spec = CompressionSpec.from_dict(compression)
        base = network_def if isinstance(network_def, nn.Module) else build_network_def(network_def)
        try:
            self.network = rebuild(base, spec, input_channels(base))
        except MedslimError:
            raise
        except Exception as e:  # a spec naming layers or channels the base network does not have
            raise MedslimError(f"the compression spec does not fit network_def ({type(base).__name__}): "
                               f"{first_line(e)}") from e
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


#: the dotted path compressed bundle configs use as ``_target_``
COMPRESSED_TARGET = f"{CompressedNetwork.__module__}.{CompressedNetwork.__name__}"


def input_channels(net: nn.Module) -> int:
    """Image channels: the input channels of the first convolution (the stem, in every
    supported family).

    Raises:
        MedslimError: ``net`` has no convolution.
    """
    conv = next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise MedslimError(f"{type(net).__name__} has no convolution; medslim compresses convolutional networks")
    return conv.in_channels
