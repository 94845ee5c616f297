"""2D classifiers on MedMNIST: datasets, model factory and a small training loop.

Used by ``medslim.transfer`` (layer selection for transfer learning) and by 2D pruning.
Names are imported on first use (torch only then).
"""
from medslim._lazy import lazy_exports

_EXPORTS = {"MedMNIST": "data", "load_medmnist": "data",
            "build_classifier": "models", "head_name": "models", "load_checkpoint": "models",
            "replace_head": "models", "save_classifier": "models",
            "FitHooks": "train", "TrainConfig": "train", "count_trainable": "train", "evaluate": "train", "fit": "train",
            "l2sp_penalty": "train"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
