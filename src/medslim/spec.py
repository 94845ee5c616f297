"""The compression spec: everything needed to rebuild a compressed network from its base
architecture, as plain JSON data (never pickled modules).

A spec holds three records, in the order they are applied:

1. ``ranks``: for each decomposed convolution (its module name in the *base* network) the
   Tucker-2 ranks ``(rank_in, rank_out)``; ``None`` means that mode is not decomposed
   (e.g. the stem, whose single input channel cannot shrink).
1b. ``cp`` (optional, NORTON): for each convolution replaced by a per-filter CP block
   (``CPDConv``; name in the base network) its CP rank. Written only when non-empty, so
   Tucker-only specs are unchanged and older specs load as they are; a conv is in at most
   one of ``ranks`` and ``cp``.
2. ``kept``: for each pruned convolution (its module name in the *decomposed* network, in the
   order the pruning was applied) the indices of the output channels that were kept. Coupled
   layers (InstanceNorm, consumer inputs, decoder concatenations) follow through the
   dependency graph, so only group roots are listed.

The remaining fields are provenance (how the ranks/channels were chosen) and are not needed
to rebuild the network.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medslim.errors import MedslimError

FORMAT = "medslim.compression/1"


@dataclass(frozen=True)
class LayerRanks:
    """Tucker-2 ranks of one convolution; ``None`` = mode left dense."""

    rank_in: int | None
    rank_out: int | None

    def to_list(self) -> list[int | None]:
        return [self.rank_in, self.rank_out]


@dataclass(frozen=True)
class CompressionSpec:
    ranks: Mapping[str, LayerRanks] = field(default_factory=dict)
    kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    cp: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not self.ranks and not self.kept and not self.cp

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "ranks": {name: r.to_list() for name, r in self.ranks.items()}}
        if self.cp:
            out["cp"] = dict(self.cp)
        out.update(kept={name: list(idx) for name, idx in self.kept.items()}, provenance=dict(self.provenance))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressionSpec":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise MedslimError(f"not a medslim compression spec (expected format '{FORMAT}', "
                               f"got {data.get('format') if isinstance(data, Mapping) else type(data).__name__!r})")
        try:
            ranks = {str(k): LayerRanks(*_ranks(v)) for k, v in data.get("ranks", {}).items()}
            kept = {str(k): tuple(int(i) for i in v) for k, v in data.get("kept", {}).items()}
            cp = {str(k): _cp_rank(v) for k, v in data.get("cp", {}).items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise MedslimError(f"malformed compression spec: {e}") from e
        both = sorted(set(ranks) & set(cp))
        if both:
            raise MedslimError(f"compression spec decomposes {both[0]} both by Tucker-2 (ranks) and by CP (cp)")
        for name, idx in kept.items():
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0:
                raise MedslimError(f"compression spec keeps an empty, negative or repeated channel list for {name}")
        return cls(ranks=ranks, kept=kept, provenance=dict(data.get("provenance", {})), cp=cp)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "CompressionSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise MedslimError(f"cannot read compression spec {path}: {e}") from e


def _ranks(value: Any) -> tuple[int | None, int | None]:
    rin, rout = value
    for r in (rin, rout):
        if r is not None and (not isinstance(r, int) or r < 1):
            raise ValueError(f"rank must be a positive integer or null, got {r!r}")
    return rin, rout


def _cp_rank(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CP rank must be a positive integer, got {value!r}")
    return value
