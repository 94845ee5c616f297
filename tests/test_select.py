"""Channel selection (SPEC §2 'Selection'): per-layer top-k and the global ranking, by hand on
tiny score dicts and on the real reference nnU-Net."""
from __future__ import annotations

import pytest
import torch

from medslim.compress import CompressConfig, compress_network
from medslim.errors import MedslimError
from medslim.prune import example_input, global_keep_counts, prunable_layers, prune_network
from medslim.prune.select import keep_count, top_k

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def removed(channels: dict[str, tuple[int, int]]) -> int:
    """Channels removed over all groups of a ``PruneRecord.channels``."""
    return sum(c - k for c, k in channels.values())


def test_global_counts_follow_the_scores_not_the_layers():
    wide, narrow = torch.full((4,), 0.5), t(0.8, 0.6)  # unit L2 norm, as the criteria return them
    scores = {"a": wide, "b": narrow}
    # N = 6, K = 3: the two reserved best channels, then the best of the rest (0.6, in b)
    assert global_keep_counts(scores, 0.5) == {"a": 1, "b": 2}
    assert {n: keep_count(len(s), 0.5) for n, s in scores.items()} == {"a": 2, "b": 1}  # per layer: same total
    assert global_keep_counts(scores, 0.25) == {"a": 3, "b": 2}  # K = 5: b's 0.6, then a's ties in index order
    # each group is L2-normalised first: its scale (or its number of summed members) does not matter
    assert global_keep_counts({"a": 10 * wide, "b": narrow / 3}, 0.5) == {"a": 1, "b": 2}


def test_global_counts_keep_one_per_group():
    scores = {"a": torch.ones(8), "b": t(0.01), "c": t(0.02, 0.01)}
    assert global_keep_counts(scores, 0.9) == {"a": 1, "b": 1, "c": 1}  # K = max(3, ceil(1.1)) = 3
    # K = 6: a0, b0, c0 reserved; then c's 0.447 (normalised) above a's 0.354 ×7
    assert global_keep_counts(scores, 0.5) == {"a": 3, "b": 1, "c": 2}


def test_ties_do_not_change_the_count():
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    # K = 4: each group's first channel, then the earlier group wins the ties
    assert global_keep_counts(scores, 0.5) == {"a": 3, "b": 1}
    assert global_keep_counts({"a": torch.zeros(4)}, 0.5) == {"a": 2}


def test_trivial_inputs():
    assert global_keep_counts({}, 0.5) == {}
    assert global_keep_counts({"a": t(0.3, 0.1), "b": t(0.2)}, 0.0) == {"a": 2, "b": 1}
    assert global_keep_counts({"a": t(0.3, 0.1, 0.2)}, 0.5) == {"a": keep_count(3, 0.5)}  # one group = per layer


@pytest.mark.parametrize("seed", range(20))
def test_global_counts_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
    ratio = float(torch.rand(1, generator=g)) * 0.99
    scores = {f"g{i}": torch.rand(c, generator=g) for i, c in enumerate(sizes)}
    counts = global_keep_counts(scores, ratio)
    n, groups = sum(sizes), len(sizes)
    assert list(counts) == list(scores)
    assert all(1 <= counts[k] <= len(s) for k, s in scores.items())
    assert sum(counts.values()) == max(groups, keep_count(n, ratio))
    # the documented rounding: ≥ as many removed as per layer, fewer than one more per group
    per_layer = sum(c - keep_count(c, ratio) for c in sizes)
    assert 0 <= (n - sum(counts.values())) - per_layer < groups
    # keeping each group's top-k_g is the global ranking: every kept channel that is not its
    # group's best scores (L2-normalised per group) at least as high as every removed channel
    kept_rest, dropped = [], []
    for k, s in scores.items():
        s = s / s.norm()
        keep = set(top_k(s, counts[k]).tolist())
        best = int(top_k(s, 1))
        kept_rest += [float(s[i]) for i in keep if i != best]
        dropped += [float(s[i]) for i in range(len(s)) if i not in keep]
    if kept_rest and dropped:
        assert min(kept_rest) >= max(dropped)


def test_prune_network_refuses_an_unknown_selection(reference_net):
    layers = prunable_layers(reference_net, "outer")
    with pytest.raises(MedslimError, match="did you mean 'global'"):
        prune_network(reference_net, layers, {}, 0.5, example_input(reference_net, 1), selection="globl")


def test_bad_selection_fails_when_the_config_is_built():
    """Before any work (the CLI case is in ``test_cli.py``)."""
    from medslim.finetune.config import resolve_config

    with pytest.raises(MedslimError, match="unknown --selection 'Global'; did you mean 'global'"):
        CompressConfig(selection="Global")
    with pytest.raises(MedslimError, match="unknown --selection"):
        resolve_config({"selection": "per-layer"})
    assert resolve_config({"selection": "global"}).compression().selection == "global"


@pytest.fixture(scope="module")
def compressed(reference) -> dict[str, object]:
    net, shape = reference.build_network(), [1, 1, *reference.patch_size]
    return {sel: compress_network(net, CompressConfig(df=0.3, prune_ratio=0.5, selection=sel), shape)
            for sel in ("layer", "global")}


def test_global_selection_on_the_reference_model(compressed, reference_net, hippo_patch):
    layer, glob = compressed["layer"].pruning, compressed["global"].pruning
    assert layer.members == glob.members  # the same groups, ranked differently
    assert {n: c for n, (c, _) in layer.channels.items()} == {n: c for n, (c, _) in glob.channels.items()}
    n = sum(c for c, _ in glob.channels.values())
    assert n - sum(k for _, k in glob.channels.values()) == n // 2  # floor(ρ·N): no group hit its floor
    assert 0 <= removed(glob.channels) - removed(layer.channels) < len(glob.channels)
    assert glob.channels != layer.channels  # the same total, spread differently
    assert all(k >= 1 for _, k in glob.channels.values())
    assert compressed["global"].spec.provenance["config"]["selection"] == "global"
    with torch.no_grad():
        want = reference_net(hippo_patch)
        got = compressed["global"].network(hippo_patch)
    assert got.shape == want.shape == (1, 3, *hippo_patch.shape[2:])
    assert torch.isfinite(got).all()
