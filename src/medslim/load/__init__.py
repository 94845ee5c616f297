"""Load trained nnU-Net models: results folders and TotalSegmentator tasks.

Names are imported on first use: ``medslim.load.totalseg`` alone does not import torch."""
from medslim._lazy import lazy_exports

_EXPORTS = {"NnUNetModel": "nnunet", "load_model": "nnunet", "load_results_folder": "nnunet",
            "TOTALSEG_TASKS": "totalseg", "resolve_totalseg_task": "totalseg"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
