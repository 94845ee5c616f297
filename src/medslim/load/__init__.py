"""Load trained nnU-Net models: results folders and TotalSegmentator tasks."""
from medslim.load.nnunet import NnUNetModel, load_model, load_results_folder
from medslim.load.totalseg import TOTALSEG_TASKS, resolve_totalseg_task

__all__ = ["NnUNetModel", "TOTALSEG_TASKS", "load_model", "load_results_folder", "resolve_totalseg_task"]
