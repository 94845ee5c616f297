"""Score predicted label maps against references: per-class Dice and NSD (SPEC §7).

``evaluate_case`` / ``evaluate_folder`` return pandas frames (one row per case and class);
``evaluate_command`` is the ``medslim evaluate`` command (optionally predicting first).
Names are imported on first use (pandas only where a frame is built).
"""
from medslim._lazy import lazy_exports

_EXPORTS = {
    "EvaluationResult": "command", "evaluate_command": "command",
    "evaluate_case": "folder", "evaluate_folder": "folder", "mean_dice_folder": "folder",
    "score_cases": "folder",
    "dataset_json_class_map": "layouts", "total_class_map": "layouts",
    "ClassScores": "metrics", "dice_per_class": "metrics", "score_label_maps": "metrics",
    "markdown_table": "outputs", "summarize": "outputs",
    "normalized_surface_dice": "surface",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
