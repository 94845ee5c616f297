"""One adapter per architecture family (``family_of(net)``): heads, HVS seed, input size and
deep supervision for nnU-Net, MONAI and classifier networks; see ``families.base``."""
from __future__ import annotations

from torch import nn

from medslim.families.base import Family, under
from medslim.families.classifier import ClassifierFamily
from medslim.families.monai import MonaiFamily
from medslim.families.nnunet import NnUNetFamily

#: checked in order; the generic family answers for anything else
FAMILIES: tuple[Family, ...] = (NnUNetFamily(), MonaiFamily(), ClassifierFamily())
_GENERIC = Family()


def family_of(net: nn.Module) -> Family:
    """The adapter for ``net`` (the generic one when no family matches)."""
    return next((f for f in FAMILIES if f.matches(net)), _GENERIC)


def head_names(net: nn.Module) -> list[str]:
    """``family_of(net).heads(net)``."""
    return family_of(net).heads(net)


__all__ = ["FAMILIES", "Family", "family_of", "head_names", "under"]
