"""The ``taylor`` criterion (SPEC §3, Molchanov et al. 2017) on the reference nnU-Net with real,
nnU-Net-preprocessed Hippocampus patches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import held_out_cases, nnunet_images

from medslim import MedslimError
from medslim.decompose import decompose_network, get_rank_policy
from medslim.prune import prunable_layers
from medslim.score import NEEDS_CALIBRATION, ScoreContext, get_criterion
from medslim.score.calibration import calibration_patches
from medslim.score.taylor import tap_module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(reference_net) -> nn.Module:
    return reference_net


@pytest.fixture(scope="module")
def patches(reference, tmp_path_factory) -> torch.Tensor:
    folder = nnunet_images(tmp_path_factory.mktemp("calibration"), held_out_cases(3))
    return calibration_patches(reference, folder, n=3, seed=0)  # [3, 1, 40, 56, 40]


@pytest.fixture(scope="module")
def scores(net, patches) -> dict[str, torch.Tensor]:
    return get_criterion("taylor")(net, prunable_layers(net, "outer"), ScoreContext(calibration=patches))


def test_taylor_scores_are_finite_non_negative_per_channel_and_leave_the_model_alone(net, patches, scores):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = dict(net.named_modules())
    assert "taylor" in NEEDS_CALIBRATION and set(scores) == set(prunable_layers(net, "outer"))
    for name, s in scores.items():
        assert s.shape == (modules[name].out_channels,) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0
    assert all(p.grad is None for p in net.parameters()) and not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_deep_supervision_output_scores_like_the_plain_output(reference, net, patches, scores):
    ds = reference.build_network(deep_supervision=True).eval()
    layers = ["decoder.stages.1.convs.0.conv", "encoder.stages.2.0.convs.1.conv"]
    got = get_criterion("taylor")(ds, layers, ScoreContext(calibration=patches))
    for name in layers:
        torch.testing.assert_close(got[name], scores[name], rtol=1e-4, atol=1e-6)


def loss_without(net: nn.Module, x: torch.Tensor, y: torch.Tensor, tap: nn.Module, channels) -> float:
    """Cross-entropy with ``channels`` of ``tap``'s output zeroed: what their consumers see once
    the channels are removed physically."""
    idx = torch.as_tensor(channels, dtype=torch.long)
    handle = tap.register_forward_hook(lambda mod, args, out: out.index_fill(1, idx, 0.0))
    try:
        with torch.no_grad():
            return F.cross_entropy(net(x), y).item()
    finally:
        handle.remove()


def test_removing_the_lowest_taylor_channels_costs_less_loss_than_the_highest(net, patches, scores):
    name = "decoder.stages.1.convs.0.conv"  # 32 channels
    order = torch.argsort(scores[name])
    k = len(order) // 4
    with torch.no_grad():
        y = net(patches).argmax(1)  # the criterion's pseudo-labels
    base = F.cross_entropy(net(patches), y).item()
    tap = tap_module(net, dict(net.named_modules())[name])
    low = loss_without(net, patches, y, tap, order[:k]) - base
    high = loss_without(net, patches, y, tap, order[-k:]) - base
    assert abs(low) < abs(high) / 3, (low, high)


def test_taylor_reads_channels_after_the_norm_and_inside_tucker_blocks(net):
    modules = dict(net.named_modules())
    block = modules["encoder.stages.1.0.convs.1"]  # ConvDropoutNormReLU: conv → norm → LeakyReLU
    assert tap_module(net, block.conv) is block.all_modules
    tucker, _ = decompose_network(net, get_rank_policy("df", df=0.5))
    modules = dict(tucker.named_modules())
    block = modules["encoder.stages.1.0.convs.1"]
    assert tap_module(tucker, modules["encoder.stages.1.0.convs.1.conv.restore"]) is block.all_modules
    reduce = modules["encoder.stages.1.0.convs.1.conv.reduce"]
    assert tap_module(tucker, reduce) is reduce  # the core reads it directly (rank site)


def test_taylor_without_data_or_with_bad_labels_is_a_user_error(net, patches):
    layers = ["decoder.stages.1.convs.0.conv"]
    with pytest.raises(MedslimError, match="calibration"):
        get_criterion("taylor")(net, layers, ScoreContext())
    with pytest.raises(MedslimError, match=r"calibration_target must be \[B, \*spatial\]"):
        get_criterion("taylor")(net, layers, ScoreContext(calibration=patches,
                                                          calibration_target=torch.zeros(3, 40, 56, dtype=torch.long)))
    labels = torch.zeros((3, *patches.shape[2:]), dtype=torch.long)  # all background: a real target
    got = get_criterion("taylor")(net, layers, ScoreContext(calibration=patches, calibration_target=labels))
    assert torch.isfinite(got[layers[0]]).all()
