"""medslim.classify on real MedMNIST data: loading, the model factory, checkpoints, training with
frozen layers (bitwise unchanged, BatchNorm statistics included) and the L2-SP penalty."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SHARED

from medslim.classify import (TrainConfig, build_classifier, count_trainable, evaluate, fit, head_name,
                              l2sp_penalty, load_medmnist, save_classifier)
from medslim.classify.models import load_checkpoint
from medslim.errors import MedslimError

MED = SHARED / "medmnist"
BREAST, PNEUMONIA, RETINA = MED / "breastmnist.npz", MED / "pneumoniamnist.npz", MED / "retinamnist.npz"


def test_load_grey_flat_labels():
    ds = load_medmnist(BREAST, "test")
    raw = np.load(BREAST)
    assert len(ds) == 156 and ds.num_classes == 2 and ds.labels.dtype == torch.int64
    x, y = ds[3]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey repeated
    expected = (torch.from_numpy(raw["test_images"][3].astype(np.float32)) / 255 - 0.5) / 0.5
    assert torch.allclose(x[0], expected) and int(y) == int(raw["test_labels"][3])


def test_load_rgb_column_labels_resize_and_one_channel():
    ds = load_medmnist(RETINA, "val", size=32, channels=1)
    raw = np.load(RETINA)
    assert len(ds) == 120 and ds.num_classes == 5
    assert ds[0][0].shape == (1, 32, 32)
    assert torch.equal(ds.labels, torch.from_numpy(raw["val_labels"][:, 0].astype(np.int64)))
    rgb = load_medmnist(RETINA, "val")
    assert rgb[0][0].shape == (3, 28, 28) and not torch.equal(rgb[0][0][0], rgb[0][0][1])


def test_subset_is_seeded():
    ds = load_medmnist(PNEUMONIA, "train")
    a, b = ds.subset(50, seed=1), ds.subset(50, seed=1)
    assert len(a) == 50 and torch.equal(a.images, b.images) and a.num_classes == 2
    assert not torch.equal(a.images, ds.subset(50, seed=2).images)


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "training"}, "unknown split"),
    ({"channels": 2}, "channels must be 1 or 3"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(MedslimError, match=match):
        load_medmnist(BREAST, **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(MedslimError, match="not found"):
        load_medmnist(tmp_path / "nope.npz")
    raw = dict(np.load(BREAST))
    np.savez(tmp_path / "nokeys.npz", **{k: v for k, v in raw.items() if k != "test_labels"})
    with pytest.raises(MedslimError, match="no 'test_labels'"):
        load_medmnist(tmp_path / "nokeys.npz", "test")
    raw["train_labels"] = raw["train_labels"][:-5]
    np.savez(tmp_path / "short.npz", **raw)
    with pytest.raises(MedslimError, match="546 images but 541 labels"):
        load_medmnist(tmp_path / "short.npz", "train")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(MedslimError, match="cannot read"):
        load_medmnist(tmp_path / "text.npz")


def test_factory_heads_and_errors(tmp_path, monkeypatch):
    r18 = build_classifier("resnet18", 5)
    assert head_name(r18) == "fc" and r18.fc.out_features == 5
    vgg = build_classifier("vgg16", 3, in_channels=1)
    assert head_name(vgg) == "classifier.6" and vgg.features[0].in_channels == 1
    assert vgg.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
    tm = build_classifier("timm:resnet18", 4)
    assert tm.get_classifier().out_features == 4
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MedslimError, match="not cached"):
        build_classifier("torchvision:resnet50", 2)
    # weights present in the hub cache are used (a stand-in file under the official name)
    import torchvision

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(r18.state_dict() | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)},
               tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    cached = build_classifier("torchvision:resnet18", 3)
    assert torch.equal(cached.layer3[0].conv1.weight, r18.layer3[0].conv1.weight) and cached.fc.out_features == 3
    with pytest.raises(MedslimError, match="did you mean 'resnet18'"):
        build_classifier("resnet81", 2)
    with pytest.raises(MedslimError, match="unknown timm model"):
        build_classifier("timm:no_such_net", 2)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 2, in_channels=1).eval()
    path = save_classifier(model, tmp_path / "m.pt", "resnet18", 2, {"seed": 0})
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "resnet18" and ckpt["in_channels"] == 1 and ckpt["meta"] == {"seed": 0}
    back = build_classifier(str(path), 2, in_channels=1).eval()
    x = load_medmnist(BREAST, "test", channels=1).images[:4]
    assert torch.equal(model(x), back(x))
    new_head = build_classifier(str(path), 5, in_channels=1)
    assert new_head.fc.out_features == 5 and torch.equal(new_head.layer4[1].conv2.weight, model.layer4[1].conv2.weight)
    with pytest.raises(MedslimError, match="not a medslim classifier"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
        build_classifier(str(tmp_path / "other.pt"), 2)


def test_frozen_layers_bitwise_unchanged():
    ds = load_medmnist(BREAST, "train").subset(64)
    torch.manual_seed(0)
    model = build_classifier("resnet18", 2)
    before = copy.deepcopy(model.state_dict())
    trainable = {"layer4.1.conv2", "layer4.1.bn2", "fc"}
    history = fit(model, ds, TrainConfig(epochs=1, milestones=()), trainable=trainable)
    assert history["steps"] == 2 and history["trainable_params"] == count_trainable(model, trainable)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"layer4.1.conv2.weight", "fc.weight", "fc.bias", "layer4.1.bn2.weight", "layer4.1.bn2.running_mean",
            "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked"} <= changed
    # everything else, BatchNorm running statistics of frozen layers included, is bitwise identical
    assert all(k.startswith(tuple(t + "." for t in trainable)) for k in changed), sorted(changed)
    assert all(p.requires_grad for p in model.parameters())  # fit restores requires_grad


def test_fit_is_deterministic_and_trains_everything_by_default():
    ds = load_medmnist(BREAST, "train").subset(32)
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        m = build_classifier("resnet18", 2)
        fit(m, ds, TrainConfig(epochs=1, milestones=(), seed=3, batch_size=16))
        models.append(m)
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    fresh = build_classifier("resnet18", 2).state_dict()
    assert not torch.equal(fresh["conv1.weight"], a["conv1.weight"])
    assert not torch.equal(fresh["bn1.running_mean"], a["bn1.running_mean"])


def test_unknown_trainable_layer():
    model = build_classifier("resnet18", 2)
    with pytest.raises(MedslimError, match="no layer 'layer5.0.conv1'"):
        fit(model, load_medmnist(BREAST, "test"), TrainConfig(epochs=1), trainable={"layer5.0.conv1", "fc"})
    assert count_trainable(model, {"fc"}) == 512 * 2 + 2


def test_l2sp_penalty_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model[0].bias.copy_(torch.tensor([1.0, 1.0]))
        model[1].weight.copy_(torch.tensor([[2.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([1.0]))
    source = {"0.weight": torch.tensor([[1.0, 0.0], [3.0, 4.0]]), "0.bias": torch.zeros(2)}
    names = [n for n, _ in model.named_parameters()]
    assert head_name(model) == "1"
    # α/2 (‖Δw‖² = 4, ‖Δb‖² = 2) + β/2 (‖w_head‖² = 4 + ‖b_head‖² = 1)
    value = l2sp_penalty(model, source, names, "1", alpha=0.1, beta=0.2)
    assert value.item() == pytest.approx(0.05 * 6 + 0.1 * 5)
    assert l2sp_penalty(model, source, ["1.weight"], "1", 0.1, 0.0).item() == 0.0


def test_l2sp_pulls_towards_source():
    ds = load_medmnist(BREAST, "train").subset(48)
    torch.manual_seed(0)
    source = build_classifier("resnet18", 2)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    dist = []
    for alpha in (0.0, 100.0):  # the penalty's gradient is 0 at w = w⁰: it acts from the 2nd step on
        m = copy.deepcopy(source)
        fit(m, ds, TrainConfig(epochs=1, milestones=(), l2sp_alpha=alpha, batch_size=16), source_state=state)
        dist.append(float((m.layer1[0].conv1.weight.detach() - state["layer1.0.conv1.weight"]).norm()))
    assert dist[1] < dist[0]
    with pytest.raises(MedslimError, match="source"):
        fit(copy.deepcopy(source), ds, TrainConfig(epochs=1, l2sp_alpha=1.0))


def test_evaluate_matches_argmax():
    ds = load_medmnist(BREAST, "test").subset(64)
    torch.manual_seed(0)
    model = build_classifier("resnet18", 2).eval()
    with torch.no_grad():
        pred = model(ds.images).argmax(1)
    out = evaluate(model, ds, batch_size=20)
    assert out["n"] == 64 and out["accuracy"] == pytest.approx(float((pred == ds.labels).float().mean()))
    assert 0.0 <= out["auc"] <= 1.0


def test_small_input_resnet_keeps_spatial_detail_and_round_trips(tmp_path):
    from medslim.prune.classifier import prune_classifier

    torch.manual_seed(0)
    x = load_medmnist(BREAST, "test").images[:2]
    maps = {}
    for arch in ("resnet18", "resnet18_28"):
        model = build_classifier(arch, 2).eval()
        model.layer4.register_forward_hook(lambda m, i, o, a=arch: maps.__setitem__(a, tuple(o.shape[-2:])))
        model(x)
    assert maps == {"resnet18": (1, 1), "resnet18_28": (4, 4)}  # MedMNIST v2's ResNet (28) keeps 4×4 maps
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    back = build_classifier(str(save_classifier(model, tmp_path / "m.pt", "resnet18_28", 2)), 2).eval()
    assert torch.equal(model(x), back(x))
    pruned, report = prune_classifier(model, 0.5, "hvs", (1, 3, 28, 28))
    assert report.param_reduction > 0.5 and pruned(x).shape == (2, 2)
    with pytest.raises(MedslimError, match="did you mean 'resnet18_28'"):
        build_classifier("resnet18_82", 2)


def test_fit_with_validation_keeps_the_best_epoch():
    train, val = load_medmnist(BREAST, "train").subset(64), load_medmnist(BREAST, "val").subset(48)
    torch.manual_seed(0)
    model = build_classifier("resnet18", 2)
    history = fit(model, train, TrainConfig(epochs=4, lr=0.05, milestones=(), seed=1, batch_size=16), val_ds=val)
    aucs = [v["auc"] for v in history["val"]]
    assert len(aucs) == 4 and history["best_epoch"] == int(np.argmax(aucs))
    assert evaluate(model, val) == history["val"][history["best_epoch"]]  # the best epoch's weights are back
