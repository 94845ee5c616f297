"""DPRP (Sharma et al. 2025): the SVD-parametrised conv, its losses by hand, the rank cut, the
conversion to TuckerConv + spec on the reference model, config errors, one tiny trainer run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medslim.decompose.svd_param import (SVDConv, compression_loss, cut_rank, orthogonality_loss, ratio_rank,
                                         sorting_loss)
from medslim.errors import MedslimError
from medslim.finetune import resolve_config
from medslim.finetune.dprp import cut_network, factorize, finalize, svd_layers
from medslim.finetune.nnunet import build_compressed, compressed_plans

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("conv", [
    nn.Conv3d(4, 6, 3, padding=1),
    nn.Conv3d(1, 32, 3, padding=1),  # stem: r = C_in·27 = 27 < C_out
    nn.ConvTranspose3d(6, 4, 2, stride=2),
    nn.Conv2d(3, 5, (3, 1), stride=2, padding=(1, 0), bias=False),
], ids=["conv3d", "stem", "transposed", "conv2d-stride-nobias"])
def test_full_rank_reproduces_the_conv(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.dim() - 2)))
    m = SVDConv.from_conv(conv)
    k = math.prod(conv.kernel_size)
    assert m.rank == min(conv.out_channels, conv.in_channels * k)
    assert sum(p.numel() for p in m.parameters()) == (m.rank * (conv.in_channels * k + conv.out_channels + 1)
                                                      + (conv.out_channels if conv.bias is not None else 0))
    with torch.no_grad():
        y = conv(x)
        assert (m(x) - y).abs().max() <= 1e-4 * y.abs().max()
        assert (m.to_tucker()(x) - y).abs().max() <= 1e-4 * y.abs().max()


def test_losses_by_hand():
    # U [3, 2]: UᵀU − I = diag(0, 3), ‖·‖_F = 3; V [2, 2] = [[1, 1], [0, 0]]: VᵀV − I = [[0, 1], [1, 0]], √2
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    v = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(orthogonality_loss(u, v)) == pytest.approx((3 + math.sqrt(2)) / 2 ** 2)
    assert float(orthogonality_loss(torch.eye(3)[:, :2], torch.eye(2))) == 0.0
    # s = [1, 2, −1, 3]: rises 1 and 4 (γ = 2) → 5/2; one negative value −1 (η = 1) → 1
    assert float(sorting_loss(torch.tensor([1.0, 2.0, -1.0, 3.0]))) == pytest.approx(3.5)
    assert float(sorting_loss(torch.tensor([3.0, 2.0, 0.0]))) == 0.0
    # ratio chain 4 → 3 (0.75 > ε) → 0.02 (≤ 0.1·3): τ = 2; penalised |σ_2..σ_4| / (3·‖σ‖₂)
    s = torch.tensor([4.0, 3.0, 0.02, 0.01])
    assert ratio_rank(s, 0.1) == 2
    assert float(compression_loss(s, 0.1)) == pytest.approx(3.03 / (3 * math.sqrt(25.0005)))
    # nothing below the threshold: τ = r, only the smallest value is pushed: 3 / (1·5)
    assert float(compression_loss(torch.tensor([4.0, 3.0]), 0.1)) == pytest.approx(0.6)
    assert ratio_rank(torch.tensor([1.0, 0.5, 0.4]), 0.5) == 1  # ≤ cuts
    assert ratio_rank(torch.tensor([0.0, 3.0, 2.0]), 0.1) == 2  # ordered by |σ| first
    assert ratio_rank(torch.tensor([3.0, -2.0, 0.0]), 0.1) == 2


def test_losses_have_gradients_where_they_should():
    s = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    (sorting_loss(s) + compression_loss(s, 0.1)).backward()
    assert s.grad[0] < 0 < s.grad[1]  # the rise 1 → 2 pulls σ_1 up and σ_2 down
    assert s.grad[2] > 0  # the smallest value is pushed to zero


def test_cut_of_zero_singular_values_leaves_the_output_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 8, 3, padding=1)
    m = SVDConv.from_conv(conv)
    with torch.no_grad():
        m.s[[1, 4, 6]] = 0.0  # not only at the tail: the cut orders by |σ| first
        m.s[2] = -m.s[2]  # a negative value is a kept component
    x = torch.randn(2, 5, 6, 6, 6)
    assert ratio_rank(m.s, 1e-3) == 5
    small = cut_rank(m, ratio_rank(m.s, 1e-3))
    assert small.rank == 5 and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        assert torch.allclose(small(x), m(x), atol=1e-6)
    with pytest.raises(MedslimError, match="cannot cut an SVD layer of rank 5 to rank 6"):
        cut_rank(small, 6)


def test_conversion_to_tucker_equals_the_svd_network_and_rebuilds_from_the_spec(reference, reference_net, hippo_patch):
    net = factorize(reference_net)
    layers = svd_layers(net)
    full = {n: m.rank for n, m in layers.items()}
    assert len(full) == 17 and "decoder.transpconvs.0" in full and not any("seg_layers" in n for n in full)
    with torch.no_grad():
        ref = reference_net(hippo_patch)
        assert (net(hippo_patch) - ref).abs().max() <= 1e-4 * ref.abs().max()
        # trained factors are not orthonormal; zero the tail of two layers so the cut removes it
        torch.manual_seed(0)
        for m in layers.values():
            m.u.mul_(1 + 0.1 * torch.randn_like(m.u))
        for name in ("encoder.stages.1.0.convs.0.conv", "decoder.transpconvs.1"):
            layers[name].s[4:] = 0
        before = net(hippo_patch)
    cut = cut_network(net, 1e-3)
    assert cut == {"encoder.stages.1.0.convs.0.conv": (32, 4), "decoder.transpconvs.1": (32, 4)}
    final, spec, results = finalize(net, full, guard="params")
    # at rank 4 the factored form is smaller; at full rank it is not, so those are written dense
    assert {n: r.to_list() for n, r in spec.ranks.items()} == {n: [None, 4] for n in cut}
    assert all(results[n].written_as == ("tucker" if n in cut else "dense") for n in full)
    assert results["decoder.transpconvs.1"].full_rank == 32
    arch = compressed_plans(reference.plans, "3d_fullres", spec)["configurations"]["3d_fullres"]["architecture"]
    rebuilt = build_compressed(arch["arch_kwargs"], 1, 3, False)
    rebuilt.load_state_dict(final.state_dict())  # strict
    with torch.no_grad():
        after = final.eval()(hippo_patch)
        assert (after - before).abs().max() <= 1e-4 * before.abs().max()
        assert torch.equal(rebuilt.eval()(hippo_patch), after)
    every, spec_all, _ = finalize(net, full, guard="none")
    assert len(spec_all.ranks) == 17 and all(r.rank_in is None and r.rank_out <= full[n]
                                             for n, r in spec_all.ranks.items())


@pytest.mark.parametrize("config, message", [
    ({"dprp_epsilon": 1.0}, "dprp_epsilon must be in (0, 1)"),
    ({"dprp_comp": -0.1}, "dprp_comp must be >= 0"),
    ({"dprp_orth": "big"}, "'dprp_orth' must be a number"),
    ({"dprp_cut_every": 0}, "dprp_cut_every must be >= 1"),
    ({"dprp_guard": "param"}, "unknown dprp_guard 'param'; did you mean 'params'?"),
    ({"regularizer": "lobster"}, "dprp with regularizer 'lobster' is not supported"),
    ({"kd_weight": 1.0}, "dprp with distillation"),
    ({"compress": True}, "the trainer fixes compress=False"),
])
def test_config_errors(tmp_path, config, message):
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(MedslimError) as err:
        resolve_config({"dprp": True, "compress": False}, tmp_path / "c.json")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dprp_needs_the_uncompressed_model():
    with pytest.raises(MedslimError, match="set compress false"):
        resolve_config({"dprp": True})


# --- stock nnUNetv2_train, tiny budget ----------------------------------------------------------

@pytest.mark.slow
def test_dprp_trainer_cuts_ranks_and_its_plans_rebuild_the_final_checkpoint(hippocampus_nnunet, tmp_path, hippo_patch):
    from conftest import REPO
    from test_trainers import CKPT, train

    from medslim.finetune.hippocampus import DATASET, PLANS
    from medslim.load import load_results_folder
    from medslim.network import COMPRESSED_CLASS

    work, env = hippocampus_nnunet
    config = tmp_path / "dprp.json"
    # ε 0.7 cuts two decoder layers of the reference model to rank 1 (its spectra are flat:
    # σ_max/σ_min ≈ 2–4, so paper values ε ≤ 0.1 cut nothing in 4 updates)
    config.write_text(json.dumps({"epochs": 2, "iterations": 2, "val_iterations": 1, "final_validation": False,
                                  "dprp_epsilon": 0.7}))
    results = tmp_path / "results"
    env = dict(env, nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", MEDSLIM_CONFIG=str(config), OMP_NUM_THREADS="1",
               nnUNet_results=str(results), nnUNet_extTrainer=str(REPO / "nnunet_plugin"))
    trainer = "nnUNetTrainerMedslimDPRP"
    run = train(env, trainer, "-pretrained_weights", str(CKPT))
    assert run.returncode == 0, run.stderr[-3000:]
    folder = results / DATASET / f"{trainer}__{PLANS}__3d_fullres"
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == COMPRESSED_CLASS
    ranks = arch["arch_kwargs"]["compression"]["ranks"]
    report = json.loads((folder / "fold_0" / "medslim_dprp.json").read_text())
    layers = report["layers"]
    assert len(layers) == 17 and ranks, report
    for name, (r_in, r_out) in ranks.items():
        assert r_in is None and 1 <= r_out == layers[name]["rank"] < layers[name]["full_rank"]
    assert all(v["written_as"] == "dense" for n, v in layers.items() if n not in ranks)
    assert report["cuts"][0]["why"] == "interval" and report["cuts"][-1]["why"] == "end"
    assert not (folder / "fold_0" / "checkpoint_best.pth").exists()
    model = load_results_folder(folder, "0")  # plans.json + checkpoint_final, strict load
    net = model.build_network().eval()
    assert sum(p.numel() for p in net.parameters()) == report["parameters_after"]
    with torch.no_grad():
        out = net(hippo_patch)
    assert out.shape == (1, 3, *hippo_patch.shape[2:]) and torch.isfinite(out).all()
