"""Distillation from the original network inside a MONAI bundle's own training workflow.

MONAI's ``SupervisedTrainer`` calls ``loss_function(pred, label)`` and never shows the loss the
input, so the teacher runs in an Ignite handler: after each forward pass
(``IterationEvents.FORWARD_COMPLETED``) it runs the frozen original network on the same
``engine.state.output["image"]`` and hands the logits to the ``DistillationLoss`` that wraps
the bundle's own loss; after the loss (``LOSS_COMPLETED``) it clears them, so the
validation/evaluation loss stays the bundle's own. A bundle config wires it with three
entries (``medslim.bundle.workflows.distill_overlay`` writes them)::

    "+imports": ["$import medslim.finetune.monai_kd as medslim_kd"],
    "medslim_teacher": "$medslim_kd.load_teacher(@medslim_teacher_def, @medslim_teacher_ckpt, @device)",
    "train#trainer#loss_function": {"_target_": "medslim.finetune.distill.DistillationLoss",
                                    "seg_loss": "@loss", "weight": 1.0, "temperature": 1.0},
    "+train#handlers": [{"_target_": "medslim.finetune.monai_kd.TeacherOutputs",
                         "teacher": "@medslim_teacher", "loss": "@train#trainer#loss_function"}]
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medslim.bundle.source import load_weights
from medslim.errors import MedslimError
from medslim.finetune.distill import DistillationLoss, frozen_copy


def load_teacher(network: nn.Module, checkpoint: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The original network with its weights (a state dict file, plain or under ``"model"``;
    strict), frozen, in eval mode.

    Raises:
        MedslimError: the file is missing or its tensors do not match ``network``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MedslimError(f"teacher weights {path} do not exist; pass the original bundle's models/model.pt")
    load_weights(network, path, "the teacher's network_def")
    return frozen_copy(network).to(device)


class TeacherOutputs:
    """Ignite handler: the teacher's logits for the current training batch, for ``loss``.

    Args:
        teacher: the frozen original network (``load_teacher``).
        loss: the ``DistillationLoss`` the trainer uses as ``loss_function``.
    """

    def __init__(self, teacher: nn.Module, loss: DistillationLoss) -> None:
        if not isinstance(loss, DistillationLoss):
            raise MedslimError(f"TeacherOutputs needs the trainer's DistillationLoss, got {type(loss).__name__}")
        self.teacher, self.loss = teacher, loss

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._clear)

    @torch.no_grad()
    def _forward(self, engine) -> None:
        from monai.utils import CommonKeys

        self.loss.teacher_output = self.teacher(engine.state.output[CommonKeys.IMAGE])

    def _clear(self, engine) -> None:
        self.loss.teacher_output = None
