"""Compress-then-fine-tune with stock ``nnUNetv2_train``: config, schedules and the helpers
medslim's nnU-Net trainers (``nnunet_plugin/medslim_trainers.py``) call."""
from medslim.finetune.config import (
    SCHEDULES,
    FinetuneConfig,
    read_config_file,
    resolve_config,
)

__all__ = ["SCHEDULES", "FinetuneConfig", "read_config_file", "resolve_config"]
