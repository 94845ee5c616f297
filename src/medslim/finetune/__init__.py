"""Compress-then-fine-tune with stock ``nnUNetv2_train``: config, schedules and the helpers
medslim's nnU-Net trainers (``nnunet_plugin/medslim_trainers.py``) call.

Names are imported on first use (the config imports torch through ``medslim.compress``)."""
from medslim._lazy import lazy_exports

_EXPORTS = {"SCHEDULES": "config", "FinetuneConfig": "config", "read_config_file": "config",
            "resolve_config": "config"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
