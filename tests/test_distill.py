"""Knowledge distillation loss (SPEC §4) checked by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medslim.finetune.distill import DistillationLoss, frozen_copy, kd_loss


def kd_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """T²·mean over (batch, voxels) of Σ_k p_k (log p_k − log q_k), with plain Python loops."""
    b, k = student.shape[:2]
    s = student.reshape(b, k, -1)
    te = teacher.reshape(b, k, -1)
    total, count = 0.0, 0
    for i in range(b):
        for v in range(s.shape[2]):
            zs = [float(s[i, c, v]) / t for c in range(k)]
            zt = [float(te[i, c, v]) / t for c in range(k)]
            ls = [z - math.log(sum(math.exp(x) for x in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(x) for x in zt)) for z in zt]
            total += sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(k))
            count += 1
    return t * t * total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 2, 3, 2, generator=g)
    teacher = 2 * torch.randn(2, 3, 2, 3, 2, generator=g)
    got = kd_loss(student, teacher, temperature).item()
    assert got == pytest.approx(kd_by_hand(student, teacher, temperature), rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_gradient_reaches_student_only():
    z = torch.randn(1, 4, 3, 3, 3)
    assert kd_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = z.clone().requires_grad_(True)
    teacher = (z + 1.0 * torch.randn_like(z)).requires_grad_(True)
    kd_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


class CountingLoss(nn.Module):
    """Stand-in for nnU-Net's DC+CE: a known value per level, so the KD term can be read off."""

    def forward(self, output, target):
        outs = output if isinstance(output, list) else [output]
        return sum(0.0 * o.sum() for o in outs) + torch.tensor(3.0)


def test_distillation_adds_weighted_levels_and_only_while_a_teacher_output_is_set():
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g),
                torch.randn(2, 3, 1, 1, 1, generator=g)]
    teachers = [torch.randn_like(s) for s in students]
    weights = [4 / 7, 2 / 7, 0.0]  # nnU-Net's deep-supervision weights for 3 levels
    loss = DistillationLoss(CountingLoss(), weight=0.5, temperature=2.0, level_weights=weights, levels="all")
    assert loss(students, None).item() == pytest.approx(3.0)  # validation: no teacher output
    loss.teacher_output = teachers
    expected = 3.0 + 0.5 * sum(w * kd_by_hand(s, t, 2.0) for w, s, t in zip(weights, students, teachers) if w)
    assert loss(students, None).item() == pytest.approx(expected, rel=1e-5)
    top = DistillationLoss(CountingLoss(), weight=0.5, temperature=2.0, level_weights=weights, levels="top")
    top.teacher_output = teachers
    assert top(students, None).item() == pytest.approx(3.0 + 0.5 * kd_by_hand(students[0], teachers[0], 2.0), rel=1e-5)


def test_frozen_teacher_is_a_detached_eval_copy():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True)).train()
    teacher = frozen_copy(net)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(net[0].weight, teacher[0].weight)
