"""Layer selection for transfer learning by weight-distribution divergence (thesis ch. 3, Algorithm 1).

``divergence`` holds the measures (pure functions on weight tensors) and the per-layer table;
``select`` turns the table into a layer set; ``pipeline`` runs Algorithm 1 and its baselines;
``command`` is what the ``medslim transfer`` CLI calls. Names are imported on first use.
"""
from medslim._lazy import lazy_exports

_EXPORTS = {"MEASURES": "divergence", "candidate_layers": "divergence", "layer_divergence": "divergence",
            "layer_divergences": "divergence", "select_layers": "select"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
