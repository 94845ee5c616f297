"""Reports of a sweep folder (``medslim report``): ``report.md`` and a self-contained
``report.html`` with the cells, per-group summaries (paired Δ vs the control), the other
compressed methods paired by seed against one (HVS by default), Pareto fronts, per-layer ranks and
kept channels, per-class scores and the failed cells.

``load`` reads the folder into tables (pure functions), ``figures`` draws PNGs in memory,
``render`` lays out Markdown and HTML and writes them (``write_report``). Names are imported on
first use.
"""
from medslim._lazy import lazy_exports

_EXPORTS = {"write_report": "render", "build_blocks": "render", "read_sweep": "load", "paired_deltas": "load",
            "group_summary": "load", "pareto_mask": "load", "method_comparison": "load"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
