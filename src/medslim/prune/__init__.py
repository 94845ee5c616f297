"""Physical channel removal (SPEC §3): choose layers by site, keep top-k channels (per layer
or by one global ranking), remove the rest through Torch-Pruning's dependency graph, and
replay a saved record on a fresh network.

Names are imported on first use (torch and torch_pruning only then)."""
from medslim._lazy import lazy_exports

_EXPORTS = {"build_graph": "graph", "example_input": "graph",
            "PruneRecord": "pruner", "apply_kept": "pruner", "prune_network": "pruner",
            "SELECTIONS": "select", "check_selection": "select", "global_keep_counts": "select",
            "keep_top_k": "select", "PRUNE_SITES": "sites", "prunable_layers": "sites"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
