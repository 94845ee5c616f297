"""2D classifiers (torchvision/timm ResNets and VGGs, plain CNNs): the head is the last Linear
(or, without one, the last convolution); the input size is free."""
from __future__ import annotations

from torch import nn

from medslim.families.base import Family


class ClassifierFamily(Family):
    name = "classifier"

    def matches(self, net: nn.Module) -> bool:
        return any(isinstance(m, nn.Linear) for m in net.modules())

    def heads(self, net: nn.Module) -> list[str]:
        return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1:]
