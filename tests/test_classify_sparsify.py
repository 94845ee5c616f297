"""LOBSTER and SeReNe as the fine-tune of a real 2D classifier on BreastMNIST: the threshold
steps keep their validation-loss record, SeReNe's removal leaves the function unchanged, and the
result round-trips through the pruned-classifier format."""
from __future__ import annotations

import copy

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


def test_dprp_chunks_follow_the_schedule():
    from medslim.classify.dprp import chunk_config

    cfg = TrainConfig(epochs=8, lr=1e-2, milestones=(2, 5), seed=4)
    part = chunk_config(cfg, 3, 3)
    assert (part.epochs, part.milestones, part.seed) == (3, (2,), 7) and part.lr == pytest.approx(1e-3)
    assert chunk_config(cfg, 0, 2).milestones == () and chunk_config(cfg, 6, 2).lr == pytest.approx(1e-4)


def test_dprp_cuts_ranks_and_round_trips(data, tmp_path):
    from medslim.classify.dprp import dprp_classifier

    model, train, val = data
    model = copy.deepcopy(model)
    conv = model.layer4[1].conv2  # made rank 8: DPRP's cut must find it after the first epoch
    u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1), full_matrices=False)
    conv.weight.data = ((u[:, :8] * s[:8]) @ vh[:8]).reshape(conv.weight.shape)
    result = dprp_classifier(model, train, CONFIG, eps=0.1)
    layers = result.report["layers"]
    assert result.ranks["layer4.1.conv2"].rank_out == 8 == layers["layer4.1.conv2"]["rank"]
    assert all(layers[n]["rank"] == r.rank_out < layers[n]["full_rank"] for n, r in result.ranks.items())
    assert len(result.report["cuts"]) == CONFIG.epochs and count_parameters(result.model) < count_parameters(model)
    save_pruned_classifier(result.model, tmp_path, arch="resnet18", num_classes=2, in_channels=3,
                           input_shape=SHAPE, kept={}, ranks=result.ranks)
    x = val.images[:4]
    assert torch.allclose(load_pruned_classifier(tmp_path)(x), result.model(x), atol=1e-5)
