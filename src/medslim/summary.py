"""What compression did, as plain data for ``compression_report.json`` and the CLI table."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from medslim.compress import Compressed
from medslim.decompose.cp import CPDConv
from medslim.measure import count_flops, count_parameters
from medslim.families import head_names
from medslim.prune.sites import conv_units, is_head


def layer_table(original: nn.Module, compressed: Compressed) -> list[dict[str, Any]]:
    """One row per convolution of the original network (heads excluded): channels before and
    after, Tucker ranks after pruning (or the CP rank), parameters before/after, reconstruction error."""
    after = dict(compressed.network.named_modules())
    drec = compressed.decomposition.layers if compressed.decomposition else {}
    rows = []
    heads = head_names(original)
    for name, conv in conv_units(original).items():
        if is_head(name, heads):
            continue
        new = after[name]
        rec = drec.get(name)
        ranks = getattr(new, "ranks", None)
        rows.append({
            "layer": name,
            "kernel": list(getattr(conv, "kernel_size", ())),
            "in": [conv.in_channels, new.in_channels],
            "out": [conv.out_channels, new.out_channels],
            "ranks": list(ranks) if ranks is not None else None,
            "cp_rank": getattr(new, "rank", None) if isinstance(new, CPDConv) else None,
            "params": [count_parameters(conv), count_parameters(new)],
            "rel_error": rec.rel_error if rec is not None else None,
            "decomposed": bool(rec is not None and rec.replaced),
            "skipped_because": rec.reason if rec is not None and not rec.replaced else None,
        })
    return rows


def summarize(original: nn.Module, compressed: Compressed, input_shape: Sequence[int]) -> dict[str, Any]:
    """Physical parameters and FLOPs of one patch, before and after, with their ratios."""
    p0, p1 = count_parameters(original), count_parameters(compressed.network)
    f0, f1 = count_flops(original, input_shape), count_flops(compressed.network, input_shape)
    return {
        "input_shape": list(input_shape),
        "params": {"original": p0, "compressed": p1, "ratio": p0 / p1, "reduction": 1 - p1 / p0},
        "flops": {"original": f0, "compressed": f1, "ratio": f0 / f1, "reduction": 1 - f1 / f0},
        "seconds": {k: round(v, 3) for k, v in compressed.seconds.items()},
        "layers": layer_table(original, compressed),
    }
