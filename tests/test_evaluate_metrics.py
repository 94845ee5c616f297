"""Dice and NSD against DeepMind ``surface-distance`` (the oracle), on real label maps,
random masks (hypothesis) and hand-computable cases."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import surface_distance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from medslim.evaluate import evaluate_case, normalized_surface_dice, score_label_maps
from medslim.evaluate.surface import MAX_BALL_OFFSETS, ball_offsets, surfel_area_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TS = SHARED / "totalsegmentator"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:surface_distance")
HIPPO_LABELS = sorted((SHARED / "Task04_Hippocampus" / "labelsTr").glob("*.nii.gz"))


def oracle_nsd(ref: np.ndarray, pred: np.ndarray, spacing, tolerance: float) -> float:
    """DeepMind's NSD with SPEC §7's empty-reference rule (NaN). ``np.Inf`` shim: the package
    still uses it for an empty mask, and NumPy 2 removed it."""
    if not ref.any():
        return float("nan")
    with mock.patch.object(np, "Inf", np.inf, create=True):
        d = surface_distance.compute_surface_distances(ref, pred, list(spacing))
        return float(surface_distance.compute_surface_dice_at_tolerance(d, tolerance))


def oracle_dice(ref: np.ndarray, pred: np.ndarray) -> float:
    n = ref.sum()
    return float("nan") if n == 0 else 2 * (ref & pred).sum() / (n + pred.sum())


def oracle_maps(ref, pred, spacing, labels, tolerance):
    return (np.array([oracle_dice(ref == c, pred == c) for c in labels]),
            np.array([oracle_nsd(ref == c, pred == c, spacing, tolerance) for c in labels]))


def assert_same(a, b, atol=1e-6):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=atol)


def load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))
    return np.rint(np.asanyarray(img.dataobj)).astype(np.uint8), tuple(float(z) for z in img.header.get_zooms())


def test_area_table_is_deepminds():
    from surface_distance import lookup_tables

    for sp in [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0), (0.7, 1.3, 2.5)]:
        np.testing.assert_array_equal(surfel_area_table(sp), lookup_tables.create_table_neighbour_code_to_surface_area(sp))


def test_totalsegmentator_117_classes_match_deepmind():
    ref, sp = load(TS / "example_seg.nii.gz")
    pred, _ = load(TS / "example_seg_fast.nii.gz")
    labels = list(range(1, 118))
    s = score_label_maps(ref, pred, sp, labels, 3.0)
    dice, nsd = oracle_maps(ref, pred, sp, labels, 3.0)
    assert_same(s.dice, dice)
    assert_same(s.nsd, nsd)
    assert 30 <= np.sum(~np.isnan(nsd)) < 117  # real pair: many classes present, some absent
    assert np.nanmin(nsd) < 0.99  # and they disagree somewhere, so the test can fail


@pytest.mark.parametrize("case", [0, 7, 42])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
@pytest.mark.parametrize("tolerance", [1.0, 3.0, 12.0])  # 12 mm: the distance-transform path
def test_hippocampus_shifted_and_eroded_match_deepmind(case, spacing, tolerance):
    ref, _ = load(HIPPO_LABELS[case])
    shifted = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    eroded = ref.copy()
    eroded[(ref == 2) & ~ndimage.binary_erosion(ref == 2)] = 0
    for pred in (shifted, eroded):
        s = score_label_maps(ref, pred, spacing, [1, 2], tolerance)
        dice, nsd = oracle_maps(ref, pred, spacing, [1, 2], tolerance)
        assert_same(s.dice, dice)
        assert_same(s.nsd, nsd)
    assert len(ball_offsets(spacing, 12.0)) > MAX_BALL_OFFSETS >= len(ball_offsets(spacing, 3.0))


def masks(draw, shape, n_labels: int) -> np.ndarray:
    """Random label map: smoothed noise thresholded (blobs, some touching the border), plus
    optional single voxels; any label may end up empty."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    noise = ndimage.uniform_filter(rng.random(shape), size=draw(st.integers(1, 3)))
    cut = np.quantile(noise, np.clip(np.linspace(0, 1, n_labels + 2)[1:-1] + draw(st.floats(-0.3, 0.3)), 0, 1))
    out = np.digitize(noise, cut).astype(np.uint8)
    if draw(st.booleans()):
        out[:] = 0
        for lab in range(1, n_labels + 1):
            out[tuple(rng.integers(0, s) for s in shape)] = lab
    return out


@st.composite
def pairs(draw):
    shape = tuple(draw(st.integers(1, 12)) for _ in range(3))
    spacing = tuple(draw(st.sampled_from([0.5, 0.8, 1.0, 1.5, 3.0, 2.2])) for _ in range(3))
    n = draw(st.integers(1, 3))
    return masks(draw, shape, n), masks(draw, shape, n), spacing, n, draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 4.5]))


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_random_label_maps_match_deepmind(data):
    ref, pred, spacing, n, tol = data
    labels = list(range(1, n + 1))
    s = score_label_maps(ref, pred, spacing, labels, tol)
    dice, nsd = oracle_maps(ref, pred, spacing, labels, tol)
    assert_same(s.dice, dice)
    assert_same(s.nsd, nsd)
    for i, c in enumerate(labels):
        assert_same([normalized_surface_dice(ref == c, pred == c, spacing, tol)], [nsd[i]])


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_analytic_cases():
    sp = (1.0, 1.0, 2.0)
    a = box((20, 20, 20), (2, 2, 2), (8, 8, 8))
    assert normalized_surface_dice(a, a, sp, 0.0) == 1.0
    assert np.isnan(normalized_surface_dice(np.zeros_like(a), a, sp))  # empty reference: not counted
    assert normalized_surface_dice(a, np.zeros_like(a), sp) == 0.0  # missed structure
    # a far copy of the reference added to the prediction: same surfel area S, NSD = 2S / 3S
    far = a | box(a.shape, (12, 12, 12), (18, 18, 18))
    assert normalized_surface_dice(a, far, sp, 3.0) == pytest.approx(2 / 3, abs=1e-12)
    # shift by one voxel along z (2 mm): every surfel within 2 mm, some beyond 1.9 mm
    shifted = np.roll(a, 1, axis=2)
    assert normalized_surface_dice(a, shifted, sp, 2.0) == pytest.approx(1.0, abs=1e-12)
    assert normalized_surface_dice(a, shifted, sp, 1.9) < 1.0
    # disjoint boxes 4 voxels apart along x (4 mm between surfaces)
    b = box(a.shape, (12, 2, 2), (18, 8, 8))
    assert normalized_surface_dice(a, b, sp, 3.9) == 0.0
    assert normalized_surface_dice(a, b, sp, 4.0) > 0.0
    # Dice of a 6-voxel box against its one-voxel shift: 5/6
    labels = np.zeros(a.shape, np.uint8)
    labels[a] = 1
    frame = evaluate_case(np.roll(labels, 1, axis=0), labels, spacing=sp, class_map={1: "box", 2: "absent"})
    assert frame["dice"].iloc[0] == pytest.approx(5 / 6, abs=1e-12)
    assert np.isnan(frame["dice"].iloc[1]) and np.isnan(frame["nsd"].iloc[1])
    assert list(frame["class"]) == ["box", "absent"]


def test_single_voxel_at_corner_and_full_volume():
    sp = (0.5, 1.0, 3.0)
    one = np.zeros((4, 5, 6), bool)
    one[0, 0, 0] = True
    other = np.zeros_like(one)
    other[-1, -1, -1] = True
    full = np.ones_like(one)
    for ref, pred in [(one, one), (one, other), (full, full), (full, one), (one, full)]:
        for tol in (0.0, 1.0, 3.0, 100.0):
            assert_same([normalized_surface_dice(ref, pred, sp, tol)], [oracle_nsd(ref, pred, sp, tol)])


def test_dice_per_class_keeps_its_semantics():
    from medslim.evaluate import dice_per_class

    ref = np.array([[[0, 1, 1, 2]]])
    pred = np.array([[[1, 1, 0, 0]]])
    d = dice_per_class(pred, ref, [1, 2, 3])
    assert d[1] == pytest.approx(0.5) and d[2] == 0.0 and np.isnan(d[3])


def test_one_aggregation_spec7_mean_over_present_classes_then_cases(tmp_path):
    """Case a: label 1 perfect, label 2 missed (case mean 0.5); case b: only label 1 in the
    reference, perfect (1.0). SPEC §7: (0.5 + 1.0) / 2 = 0.75; averaging per label first
    would give (1.0 + 0.0) / 2 = 0.5. ``mean_dice_folder`` and ``medslim evaluate`` agree."""
    from medslim.evaluate import evaluate_command, mean_dice_folder

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    r = np.zeros((6, 6, 6), np.uint8)
    r[:2], r[4:] = 1, 2
    p = np.where(r == 2, 0, r).astype(np.uint8)
    for case, (rr, pp) in {"a": (r, p), "b": (np.where(r == 2, 0, r).astype(np.uint8), p)}.items():
        nib.save(nib.Nifti1Image(rr, np.eye(4)), str(ref / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(pp, np.eye(4)), str(pred / f"{case}.nii.gz"))
    d = mean_dice_folder(pred, ref, ["a", "b"], [1, 2])
    assert d["mean"] == pytest.approx(0.75)
    assert d["mean_per_label"] == {1: pytest.approx(1.0), 2: pytest.approx(0.0)}
    assert d["per_case"]["a"] == {1: 1.0, 2: 0.0} and d["per_case"]["b"][1] == 1.0 and np.isnan(d["per_case"]["b"][2])
    assert evaluate_command(pred, ref, workers=1).summary["overall"]["dice"]["mean"] == pytest.approx(0.75)
