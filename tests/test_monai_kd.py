"""Distillation in MONAI's ``SupervisedTrainer`` (``medslim.finetune.monai_kd``): with the
learning rate 0 the trainer's loss is the bundle loss plus λ·KD computed by hand, and the
teacher's logits are gone after each step."""
from __future__ import annotations

import pytest
import torch

from medslim.errors import MedslimError
from medslim.finetune.distill import DistillationLoss, kd_loss
from medslim.finetune.monai_kd import TeacherOutputs, load_teacher

monai = pytest.importorskip("monai")
pytest.importorskip("ignite")
pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(seed: int):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance")


def _train_once(weight: float, teacher, student, batch):
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    seg = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = DistillationLoss(seg, weight=weight, temperature=2.0)
    seen: list[float] = []
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch],
                                network=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.0),
                                loss_function=loss, train_handlers=[TeacherOutputs(teacher, loss)],
                                decollate=False)
    trainer.add_event_handler(monai.engines.utils.IterationEvents.LOSS_COMPLETED,
                              lambda e: seen.append(float(e.state.output["loss"].detach())))
    trainer.run()
    return seen[0], loss, seg


def test_trainer_loss_is_bundle_loss_plus_weighted_kd(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 1, 16, 16, 16, generator=g),
             "label": torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g)}
    original, student = _unet(0), _unet(1)
    torch.save(original.state_dict(), tmp_path / "model.pt")
    teacher = load_teacher(_unet(5), tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), original.state_dict().values()))
    with_kd, loss, seg = _train_once(0.5, teacher, student, batch)
    without, _, _ = _train_once(0.0, teacher, student, batch)
    student.train()
    with torch.no_grad():
        s, t = student(batch["image"]), teacher(batch["image"])
        want_seg = float(seg(s, batch["label"]))
        want_kd = float(kd_loss(s, t, 2.0))
    assert without == pytest.approx(want_seg, rel=1e-5)
    assert with_kd == pytest.approx(want_seg + 0.5 * want_kd, rel=1e-5) and want_kd > 1e-4
    assert loss.teacher_output is None  # cleared after the step: validation losses stay the bundle's


def test_teacher_errors(tmp_path):
    with pytest.raises(MedslimError, match="do not exist"):
        load_teacher(_unet(0), tmp_path / "missing.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(MedslimError, match="does not match the teacher"):
        load_teacher(_unet(0), tmp_path / "bad.pt")
    with pytest.raises(MedslimError, match="DistillationLoss"):
        TeacherOutputs(_unet(0), torch.nn.MSELoss())
