"""Knowledge distillation for the fine-tune (SPEC §4; Hinton et al. 2015).

Per voxel ``L = L_seg(z_s, y) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``, the KL term
averaged over voxels. ``L_seg`` is nnU-Net's own loss (DC+CE, wrapped for deep supervision).
With deep supervision the KD term compares each resolution's student logits with the
teacher's own head at that resolution, weighted like nnU-Net weights its deep-supervision
levels (``levels="all"``), or the full resolution only (``levels="top"``).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

KD_LEVELS = ("all", "top")


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over batch and voxels.

    Args:
        student: logits ``[B, K, *spatial]``.
        teacher: logits of the same shape (no gradient flows into them).
        temperature: ``T > 0``.
    Returns:
        scalar tensor.
    """
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # [B, *spatial]
    return kl.mean() * temperature ** 2


class DistillationLoss(nn.Module):
    """nnU-Net's loss plus ``weight``·KD against the teacher logits of the current batch.

    ``teacher_output`` is set by the trainer before each training step (a tensor, or a list
    per deep-supervision level) and cleared after; while it is ``None`` (validation steps)
    only ``seg_loss`` is computed, so validation losses stay comparable with the control's.
    ``level_weights`` are the deep-supervision weights (nnU-Net's ``1/2^i``, normalised, last 0).
    """

    def __init__(self, seg_loss: nn.Module, weight: float, temperature: float,
                 level_weights: Sequence[float] | None = None, levels: str = "all") -> None:
        super().__init__()
        if levels not in KD_LEVELS:
            raise ValueError(f"levels must be one of {KD_LEVELS}, got {levels!r}")
        self.seg_loss, self.weight, self.temperature = seg_loss, float(weight), float(temperature)
        weights = list(level_weights) if level_weights is not None else [1.0]
        self.level_weights = weights if levels == "all" else [1.0] + [0.0] * (len(weights) - 1)
        self.teacher_output: Tensor | list[Tensor] | None = None

    def forward(self, output: Tensor | list[Tensor], target: Tensor | list[Tensor]) -> Tensor:
        loss = self.seg_loss(output, target)
        if self.teacher_output is None or self.weight == 0:
            return loss
        students = output if isinstance(output, (list, tuple)) else [output]
        teachers = self.teacher_output if isinstance(self.teacher_output, (list, tuple)) else [self.teacher_output]
        kd = sum(w * kd_loss(s, t, self.temperature)
                 for w, s, t in zip(self.level_weights, students, teachers) if w != 0)
        return loss + self.weight * kd


def frozen_copy(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with ``requires_grad`` off (the teacher)."""
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
