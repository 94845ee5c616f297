"""Short CPU schedules used to train medslim's reference nnU-Net.

nnU-Net finds these through ``nnUNet_extTrainer`` (see ``medslim nnunet-path``). The
checkpoint stores the trainer's class name, so predicting with a model trained here also
needs ``nnUNet_extTrainer`` pointing at this folder.
"""
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerMedslimCPU(nnUNetTrainer):
    """nnU-Net's default recipe (SGD, poly lr 1e-2, deep supervision, full augmentation)
    with a CPU-sized budget: ``MEDSLIM_EPOCHS`` epochs (default 60) of
    ``MEDSLIM_ITERS`` iterations (default 50), seeded by ``MEDSLIM_SEED`` (default 12345;
    augmentation workers keep their own randomness, so runs are close, not bit-identical)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cpu")):
        seed = int(os.environ.get("MEDSLIM_SEED", 12345))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("MEDSLIM_EPOCHS", 60))
        self.num_iterations_per_epoch = int(os.environ.get("MEDSLIM_ITERS", 50))
        self.num_val_iterations_per_epoch = 5
        self.save_every = 5
