"""Layer selection for transfer learning by weight-distribution divergence (thesis ch. 3, Algorithm 1).

``divergence`` holds the measures (pure functions on weight tensors) and the per-layer table;
``select`` turns the table into a layer set; ``pipeline`` runs Algorithm 1 and its baselines;
``command`` is what the ``medslim transfer`` CLI calls.
"""
from medslim.transfer.divergence import MEASURES, candidate_layers, layer_divergence, layer_divergences
from medslim.transfer.select import select_layers

__all__ = ["MEASURES", "candidate_layers", "layer_divergence", "layer_divergences", "select_layers"]
