"""Physical channel removal (SPEC §3): choose layers by site, keep top-k channels, remove the
rest through Torch-Pruning's dependency graph, and replay a saved record on a fresh network."""
from medslim.prune.graph import build_graph, example_input
from medslim.prune.pruner import PruneRecord, apply_kept, prune_network
from medslim.prune.select import keep_top_k
from medslim.prune.sites import PRUNE_SITES, prunable_layers

__all__ = ["PRUNE_SITES", "PruneRecord", "apply_kept", "build_graph", "example_input",
           "keep_top_k", "prunable_layers", "prune_network"]
