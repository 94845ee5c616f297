"""2D classifiers on MedMNIST: datasets, model factory and a small training loop.

Used by ``medslim.transfer`` (layer selection for transfer learning) and by 2D pruning.
"""
from medslim.classify.data import MedMNIST, load_medmnist
from medslim.classify.models import build_classifier, head_name, load_checkpoint, replace_head, save_classifier
from medslim.classify.train import TrainConfig, count_trainable, evaluate, fit, l2sp_penalty

__all__ = ["MedMNIST", "load_medmnist", "build_classifier", "head_name", "load_checkpoint", "replace_head",
           "save_classifier", "TrainConfig", "count_trainable", "evaluate", "fit", "l2sp_penalty"]
