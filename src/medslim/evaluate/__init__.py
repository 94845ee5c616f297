"""Score predicted label maps against references: per-class Dice and NSD (SPEC §7).

``evaluate_case`` / ``evaluate_folder`` return pandas frames (one row per case and class);
``evaluate_command`` is the ``medslim evaluate`` command (optionally predicting first).
"""
from medslim.evaluate.command import EvaluationResult, evaluate_command
from medslim.evaluate.folder import evaluate_case, evaluate_folder
from medslim.evaluate.layouts import dataset_json_class_map, total_class_map
from medslim.evaluate.metrics import ClassScores, dice_per_class, mean_dice_folder, score_label_maps
from medslim.evaluate.outputs import markdown_table, summarize
from medslim.evaluate.surface import normalized_surface_dice

__all__ = ["ClassScores", "EvaluationResult", "dataset_json_class_map", "dice_per_class", "evaluate_case",
           "evaluate_command", "evaluate_folder", "markdown_table", "mean_dice_folder", "normalized_surface_dice",
           "score_label_maps", "summarize", "total_class_map"]
