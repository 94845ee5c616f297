"""LOBSTER and SeReNe as the fine-tune of a real 2D classifier on BreastMNIST: the threshold
steps keep their validation-loss record, SeReNe's removal leaves the function unchanged, and the
result round-trips through the pruned-classifier format."""
from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from medslim.classify import TrainConfig, build_classifier, load_medmnist
from medslim.classify.sparsify import sparsify_classifier, validation_loss
from medslim.errors import MedslimError
from medslim.measure import count_parameters
from medslim.prune.classifier_io import load_pruned_classifier, save_pruned_classifier

BREAST = SHARED / "medmnist" / "breastmnist.npz"
SHAPE = (1, 3, 28, 28)


@pytest.fixture(scope="module")
def data():
    train = load_medmnist(BREAST, "train").subset(64)
    val = load_medmnist(BREAST, "val").subset(48)
    torch.manual_seed(0)
    return build_classifier("resnet18", 2).eval(), train, val


CONFIG = TrainConfig(epochs=2, lr=1e-3, optimizer="adamw", batch_size=16, milestones=(), seed=0)


def test_serene_removes_the_zeroed_channels_without_changing_the_function(data, tmp_path):
    model, train, val = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.stack([train[i][0] for i in range(8)])
    # a generous tolerance so that the threshold step zeroes channels within a tiny budget
    result = sparsify_classifier(model, "serene", train, val, CONFIG, SHAPE, calib, lam=0.5, tolerance=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input not modified
    report = result.report
    assert report["channels_zeroed"] > 0 and report["thresholds"]
    removed = sum(report["per_layer"][r]["channels"] - len(k) for r, k in result.kept.items())
    assert removed == report["channels_zeroed"]
    assert count_parameters(result.model) < count_parameters(model)
    # the last threshold step measured this loss with the channels zeroed; removed, it is the same
    after = report["thresholds"][-1]["val_loss_after"]
    assert validation_loss(result.model, val) == pytest.approx(after, rel=1e-4)
    save_pruned_classifier(result.model, tmp_path, arch="resnet18", num_classes=2, in_channels=3,
                           input_shape=SHAPE, kept=result.kept)
    x = val.images[:4]
    assert torch.allclose(load_pruned_classifier(tmp_path)(x), result.model(x), atol=1e-5)


def test_lobster_pins_zeros_and_stays_dense(data):
    model, train, val = data
    result = sparsify_classifier(model, "lobster", train, val, CONFIG, SHAPE, lam=0.5, tolerance=1.0)
    report = result.report
    zeros = sum(int((m.weight == 0).sum()) for n, m in result.model.named_modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert report["zeros"] == zeros > 0 and result.kept == {}
    assert count_parameters(result.model) == count_parameters(model)  # unstructured: nothing removed
    assert validation_loss(result.model, val) == pytest.approx(report["thresholds"][-1]["val_loss_after"], rel=1e-4)


def test_bad_regularizer_options(data):
    model, train, val = data
    with pytest.raises(MedslimError, match="unknown regularizer 'serine'"):
        sparsify_classifier(model, "serine", train, val, CONFIG, SHAPE)
    with pytest.raises(MedslimError, match="calibration images"):
        sparsify_classifier(model, "serene", train, val, CONFIG, SHAPE)
