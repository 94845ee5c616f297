"""Score predicted label maps against references."""
from medslim.evaluate.metrics import dice_per_class, mean_dice_folder

__all__ = ["dice_per_class", "mean_dice_folder"]
