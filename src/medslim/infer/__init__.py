"""Fast inference (the ``predict``/``evaluate --model``/``benchmark`` path): network runtimes
(PyTorch, ONNX Runtime, OpenVINO), a streamed float32 sliding window with the segmentation
head split off, and nnU-Net's own preprocessing and export around them.

Names are imported on first use: ``medslim.infer.backends`` alone does not import torch."""
from medslim._lazy import lazy_exports

_EXPORTS = {"BACKENDS": "backends", "PatchRunner": "backends", "RuntimeOptions": "backends",
            "is_installed": "backends", "resolve_backend": "backends",
            "Predictor": "predictor", "case_files": "predictor", "load_predictor": "predictor",
            "nnunet_plans": "predictor", "preprocess_case": "predictor", "segment_files": "predictor",
            "Timer": "sliding_window", "argmax_volume": "sliding_window", "logit_slabs": "sliding_window",
            "mirrored": "sliding_window"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
