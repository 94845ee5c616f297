"""Where to prune after Tucker-2 (SPEC §3 ``prune_site``).

A network is read as a list of *conv units*: a ``TuckerConv`` (``reduce → core → restore``),
a ``CPDConv`` (NORTON's CP block; its output is the block itself) or a dense convolution. For each site the candidates are convolutions whose output channels
may be removed:

- ``outer``: the unit's output (``restore`` of a TuckerConv, the conv itself otherwise):
  shrinks feature maps and skips (what thesis §5.3.0.2 describes);
- ``rank``: the ranks inside TuckerConvs (outputs of ``reduce`` and of ``core`` when a
  ``restore`` follows); no graph constraints;
- ``all``: both.

Never candidates: the heads (``medslim.families``: e.g. nnU-Net's ``decoder.seg_layers``), and
by default the stem (the first unit, which reads the network input).
"""
from __future__ import annotations

from torch import nn

from medslim.decompose.cp import CPDConv
from medslim.decompose.tucker import TuckerConv
from medslim.errors import MedslimError
from medslim.families import head_names, under

PRUNE_SITES = ("outer", "rank", "all")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_tucker(module: nn.Module) -> bool:
    return isinstance(module, TuckerConv)


def conv_units(net: nn.Module) -> dict[str, nn.Module]:
    """Conv units in registration order (encoder first), keyed by their first module name."""
    units: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in net.named_modules():
        if id(m) in seen:
            continue
        if is_tucker(m) or isinstance(m, CPDConv):
            units[name] = m
            seen.update(id(c) for c in m.modules())
        elif isinstance(m, _CONV):
            units[name] = m
            seen.add(id(m))
    return units


def is_head(name: str, heads: list[str]) -> bool:
    """Whether unit ``name`` is a head or inside one (``heads``: ``medslim.families.head_names``)."""
    return under(name, heads)


def prunable_layers(net: nn.Module, site: str, *, prune_stem: bool = False) -> list[str]:
    """Names of convolutions whose output channels are pruning candidates at ``site``."""
    if site not in PRUNE_SITES:
        raise MedslimError(f"unknown prune site '{site}'; choose one of {', '.join(PRUNE_SITES)}")
    heads = head_names(net)
    units = [(n, m) for n, m in conv_units(net).items() if not is_head(n, heads)]
    names: list[str] = []
    for i, (name, unit) in enumerate(units):
        tucker = is_tucker(unit)
        if site in ("rank", "all") and tucker:
            if hasattr(unit, "reduce"):
                names.append(f"{name}.reduce")
            if hasattr(unit, "restore"):
                names.append(f"{name}.core")
        if site in ("outer", "all") and (i > 0 or prune_stem):
            if tucker:
                names.append(f"{name}.restore" if hasattr(unit, "restore") else f"{name}.core")
            else:
                names.append(name)
    return names


def stem_output(net: nn.Module) -> str:
    """Name of the conv producing the stem's output (the first unit's last conv)."""
    name, unit = next((n, m) for n, m in conv_units(net).items())
    if is_tucker(unit):
        return f"{name}.restore" if hasattr(unit, "restore") else f"{name}.core"
    return name
