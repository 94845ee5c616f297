"""nnU-Net's ``PlainConvUNet``/``ResidualEncoderUNet`` (dynamic-network-architectures) and
medslim's ``CompressedUNet``: heads ``decoder.seg_layers.<i>``, deep supervision switched by
``decoder.deep_supervision``, input a multiple of the product of ``encoder.strides``."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import nn

from medslim.families.base import Family, strides_product

_SEG_LAYER = re.compile(r"(?:^|\.)decoder\.seg_layers\.(\d+)$")


class NnUNetFamily(Family):
    name = "nnunet"

    def matches(self, net: nn.Module) -> bool:
        return hasattr(getattr(net, "decoder", None), "seg_layers") and hasattr(net, "encoder")

    def heads(self, net: nn.Module) -> list[str]:
        return [n for n, _ in net.named_modules() if _SEG_LAYER.search(n)]

    def output_module(self, net: nn.Module) -> str:
        return max(self.heads(net), key=lambda n: int(_SEG_LAYER.search(n).group(1)))

    def input_multiple(self, net: nn.Module) -> list[int] | None:
        strides = getattr(net.encoder, "strides", None)
        if strides is None:
            return None
        return strides_product(net, strides)

    @contextlib.contextmanager
    def all_heads_active(self, net: nn.Module) -> Iterator[None]:
        decoder = net.decoder
        before = getattr(decoder, "deep_supervision", None)
        if before is not None:
            decoder.deep_supervision = True
        try:
            yield
        finally:
            if before is not None:
                decoder.deep_supervision = before
