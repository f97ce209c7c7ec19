"""Segmentation metrics: hand-computed overlap values, surface distances against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from bids_app.core import metrics as m


def _cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ---------------------------------------------------------------------------- overlap

def test_shifted_cubes_by_hand():
    pred = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels
    ref = _cube((10, 10, 10), (3, 2, 2), (7, 6, 6))  # 64 voxels, 48 shared
    tp, fp, fn, tn = m.confusion(pred, ref)
    assert (tp, fp, fn, tn) == (48, 16, 16, 920)
    assert m.dice(tp, fp, fn) == pytest.approx(0.75)
    assert m.f_beta(tp, fp, fn) == pytest.approx(240 / 320)
    assert m.volumetric_similarity(tp, fp, fn) == pytest.approx(1.0)
    assert m.balanced_accuracy(tp, fp, fn, tn) == pytest.approx((48 / 64 + 920 / 936) / 2)


def test_nested_cubes_by_hand():
    pred = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels inside
    ref = _cube((10, 10, 10), (1, 1, 1), (7, 7, 7))  # 216 voxels
    tp, fp, fn, tn = m.confusion(pred, ref)
    assert (tp, fp, fn, tn) == (64, 0, 152, 784)
    assert m.dice(tp, fp, fn) == pytest.approx(128 / 280)
    assert m.f_beta(tp, fp, fn, beta=2.0) == pytest.approx(320 / (320 + 4 * 152))
    assert m.f_beta(tp, fp, fn, beta=1.0) == pytest.approx(m.dice(tp, fp, fn))
    assert m.volumetric_similarity(tp, fp, fn) == pytest.approx(1 - 152 / 280)
    assert m.balanced_accuracy(tp, fp, fn, tn) == pytest.approx((64 / 216 + 1.0) / 2)
    # F2 weighs recall: the same errors as false positives score higher
    assert m.f_beta(tp, fn, fp) > m.f_beta(tp, fp, fn)


def test_empty_structures():
    empty = np.zeros((6, 6, 6), dtype=bool)
    cube = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    tp, fp, fn, tn = m.confusion(empty, empty)
    for value in (m.dice(tp, fp, fn), m.f_beta(tp, fp, fn), m.volumetric_similarity(tp, fp, fn),
                  m.balanced_accuracy(tp, fp, fn, tn), m.hd95(empty, empty), m.assd(empty, empty)):
        assert math.isnan(value)
    for pred, ref in ((empty, cube), (cube, empty)):
        tp, fp, fn, tn = m.confusion(pred, ref)
        assert m.dice(tp, fp, fn) == 0.0
        assert m.f_beta(tp, fp, fn) == 0.0
        assert m.volumetric_similarity(tp, fp, fn) == 0.0
        assert math.isnan(m.hd95(pred, ref, (1, 1, 2)))
        assert math.isnan(m.assd(pred, ref))
        d1, d2 = m.surface_distances(pred, ref)
        assert d1.size == 0 and d2.size == 0
    # missed structure: TPR 0, TNR 1; spurious structure: TPR undefined -> TNR only
    assert m.balanced_accuracy(*m.confusion(empty, cube)) == pytest.approx(0.5)
    assert m.balanced_accuracy(*m.confusion(cube, empty)) == pytest.approx(1 - 8 / 216)


def test_identical_masks():
    cube = _cube((8, 8, 8), (2, 2, 2), (5, 6, 7))
    assert m.dice(*m.confusion(cube, cube)[:3]) == 1.0
    assert m.hd95(cube, cube, (0.7, 1.0, 1.3)) == 0.0
    assert m.assd(cube, cube) == 0.0


# ---------------------------------------------------------------------------- surface distances

def _brute_surface_distances(pred, ref, spacing):
    """Whole-image surfaces and all pairwise distances (no cropping, no distance transform)."""
    struct = ndimage.generate_binary_structure(3, 1)
    sp = pred & ~ndimage.binary_erosion(pred, struct, border_value=0)
    sr = ref & ~ndimage.binary_erosion(ref, struct, border_value=0)
    pts_p = np.argwhere(sp) * np.asarray(spacing)
    pts_r = np.argwhere(sr) * np.asarray(spacing)
    d = cdist(pts_p, pts_r)
    return d.min(axis=1), d.min(axis=0)


def _random_mask(rng, shape, box_lo, box_hi, threshold=0.1):
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    mask = noise > threshold
    keep = np.zeros(shape, dtype=bool)
    keep[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))] = True
    return mask & keep


@pytest.mark.parametrize("seed", range(6))
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (22, 18, 20)
    spacing = (0.8, 1.0, 1.7)
    if seed % 2:  # masks that touch the image border
        pred = _random_mask(rng, shape, (0, 0, 0), (14, 12, 20))
        ref = _random_mask(rng, shape, (3, 2, 0), (22, 18, 15))
    else:  # small structures far from the border: only the cropped box is used
        pred = _random_mask(rng, shape, (5, 4, 6), (13, 11, 12))
        ref = _random_mask(rng, shape, (7, 5, 5), (16, 12, 14))
    assert pred.any() and ref.any()
    d_pr, d_rp = m.surface_distances(pred, ref, spacing)
    b_pr, b_rp = _brute_surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(d_pr, b_pr, atol=1e-9)
    np.testing.assert_allclose(d_rp, b_rp, atol=1e-9)
    pooled = np.concatenate([b_pr, b_rp])
    assert m.hd95(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))
    assert m.hd95(pred, ref, spacing, mode="max") == pytest.approx(
        max(np.percentile(b_pr, 95), np.percentile(b_rp, 95)))
    assert m.assd(pred, ref, spacing) == pytest.approx(pooled.mean())
    # symmetric
    assert m.hd95(ref, pred, spacing) == pytest.approx(m.hd95(pred, ref, spacing))


def test_hd95_of_shifted_cube():
    pred = _cube((12, 12, 12), (3, 3, 3), (7, 7, 7))
    ref = np.roll(pred, 2, axis=0)
    d_pr, d_rp = m.surface_distances(pred, ref, (1.5, 1.0, 1.0))
    assert d_pr.max() == pytest.approx(3.0)  # 2 voxels of 1.5 mm
    with pytest.raises(ValueError):
        m.hd95_from_distances(d_pr, d_rp, mode="median")


# ---------------------------------------------------------------------------- all structures

def test_structure_metrics_match_single_masks():
    rng = np.random.default_rng(7)
    shape = (24, 20, 22)
    spacing = (1.0, 1.2, 0.9)
    values = np.array([0, 3, 17, 1002, 2035, 77])  # 77 is not asked for
    ref = values[ndimage.zoom(rng.integers(0, 6, (6, 5, 6)), 4, order=0)[:24, :20, :22]]
    pred = ref.copy()
    flip = rng.random(shape) < 0.15
    pred[flip] = rng.choice(values, size=int(flip.sum()))
    pred[pred == 2035] = 0  # a structure missing from the prediction
    labels = [3, 17, 1002, 2035, 999]  # 999 is in neither image
    rows = m.structure_metrics(pred, ref, labels, spacing, names={3: "a", 17: "b"})
    assert [r["label"] for r in rows] == labels
    assert [r["name"] for r in rows] == ["a", "b", "1002", "2035", "999"]
    voxel = np.prod(spacing)
    for row in rows:
        p, r = pred == row["label"], ref == row["label"]
        tp, fp, fn, tn = m.confusion(p, r)
        expected = {
            "dice": m.dice(tp, fp, fn), "f2": m.f_beta(tp, fp, fn), "volumetric_similarity":
            m.volumetric_similarity(tp, fp, fn), "balanced_accuracy": m.balanced_accuracy(tp, fp, fn, tn),
            "volume_pred_mm3": p.sum() * voxel, "volume_ref_mm3": r.sum() * voxel,
        }
        if p.any() and r.any():
            b_pr, b_rp = _brute_surface_distances(p, r, spacing)
            expected["hd95_mm"] = np.percentile(np.concatenate([b_pr, b_rp]), 95)
            expected["assd_mm"] = np.concatenate([b_pr, b_rp]).mean()
        else:
            expected["hd95_mm"] = expected["assd_mm"] = float("nan")
        for key, value in expected.items():
            np.testing.assert_allclose(row[key], value, rtol=1e-9, equal_nan=True, err_msg=f"{row['label']} {key}")
    by_label = {r["label"]: r for r in rows}
    assert by_label[2035]["dice"] == 0.0 and math.isnan(by_label[2035]["hd95_mm"])
    assert math.isnan(by_label[999]["dice"]) and by_label[999]["volume_ref_mm3"] == 0


def test_structure_metrics_validation():
    a = np.zeros((4, 4, 4), dtype=np.int16)
    with pytest.raises(ValueError):
        m.structure_metrics(a, np.zeros((4, 4, 5), dtype=np.int16), [1])
    with pytest.raises(ValueError):
        m.structure_metrics(a, a, [1, 1])
    with pytest.raises(ValueError):
        m.structure_metrics(a, a, [1], names=["x", "y"])
    with pytest.raises(ValueError):
        m.structure_metrics(a + 0.5, a, [1])
    assert m.structure_metrics(a, a, []) == []


# ---------------------------------------------------------------------------- agreement, summaries

def test_concordance_and_pearson():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    assert m.concordance_correlation(x, x) == pytest.approx(1.0)
    assert m.pearson(x, x) == pytest.approx(1.0)
    y = x + 3.0
    ccc = m.concordance_correlation(x, y)
    assert ccc < 1.0
    assert ccc == pytest.approx(2 * x.var() / (2 * x.var() + 9.0))
    assert m.pearson(x, y) == pytest.approx(1.0)
    # by hand: var = 2/3 each, cov = 2/3, mean difference 1 -> (4/3) / (4/3 + 1)
    assert m.concordance_correlation([1, 2, 3], [2, 3, 4]) == pytest.approx(4 / 7)
    assert m.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(m.concordance_correlation([1.0], [1.0]))
    assert math.isnan(m.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert m.concordance_correlation([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)


def test_summarise_ignores_nan():
    rows = [{"dice": 0.5}, {"dice": float("nan")}, {"dice": 0.7}, {"dice": 0.9}]
    s = m.summarise(rows)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.7)
    assert s["sd"] == pytest.approx(0.2)  # ddof=1
    one = m.summarise([{"hd95_mm": 2.0}], key="hd95_mm")
    assert one["mean"] == 2.0 and math.isnan(one["sd"])
    assert math.isnan(m.summarise([], key="dice")["mean"])
    assert m.summarise([1.0, 3.0], key=None)["mean"] == 2.0
