"""Write compressed models where users' tools load them (names imported on first use)."""
from medslim._lazy import lazy_exports

_EXPORTS = {"write_results_folder": "nnunet_folder"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
