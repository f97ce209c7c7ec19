"""Tests of the intracranial and brain masks (bids_app.core.masks)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core import masks

N = 56
VS = 2.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def head():
    """Synthetic T1w-like head: scalp (bright), skull (dark ring), CSF (dark), GM, WM, ventricles."""
    c = (np.indices((N, N, N)) - (N - 1) / 2) * VS
    r = np.sqrt(((c / np.array([1.0, 1.15, 0.95])[:, None, None, None]) ** 2).sum(axis=0))
    data = np.zeros((N, N, N), np.float32)
    data[r < 48] = 60  # scalp
    data[r < 42] = 12  # skull
    data[r < 37] = 25  # CSF
    data[r < 33] = 70  # GM
    data[r < 26] = 110  # WM
    vent = (((c - np.array([0, 0, 4])[:, None, None, None]) / np.array([8, 14, 6])[:, None, None, None]) ** 2).sum(
        axis=0
    ) < 1
    data[vent] = 25
    rng = np.random.default_rng(3)
    data = np.clip(data + rng.normal(0, 3, data.shape).astype(np.float32), 0, None)
    return data, r < 37, r < 33, vent


def test_kmeans_1d_finds_known_centres():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 1, 3000), rng.normal(50, 2, 2000), rng.normal(90, 2, 4000)])
    rng.shuffle(values)
    centres = masks.kmeans_1d(values, 3)
    assert centres.shape == (3,)
    assert np.all(np.diff(centres) > 0)
    np.testing.assert_allclose(centres, [10, 50, 90], atol=1.0)


def test_kmeans_1d_two_classes_and_degenerate():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-5, 0.5, 500), rng.normal(5, 0.5, 1500)])
    np.testing.assert_allclose(masks.kmeans_1d(values, 2), [-5, 5], atol=0.3)
    np.testing.assert_array_equal(masks.kmeans_1d(np.full(100, 4.0), 3), [4.0, 4.0, 4.0])
    with pytest.raises(ValueError):
        masks.kmeans_1d(np.array([]), 3)


def test_brain_masks_match_truth(head):
    data, icv_true, brain_true, vent = head
    icv, brain = masks.brain_masks(data, icv_true.astype(np.float32), zooms=(VS,) * 3)
    assert icv.dtype == bool and brain.dtype == bool
    assert icv.shape == data.shape == brain.shape
    assert _dice(icv, icv_true) > 0.9
    assert _dice(brain, brain_true) > 0.9
    assert not (brain & ~icv).any()  # the brain is inside the ICV
    assert brain[vent].mean() > 0.95  # ventricles are part of the brain mask (holes filled)
    # CSF between brain and skull is in the ICV but not in the brain
    csf = icv_true & ~brain_true
    assert icv[csf].mean() > 0.9
    assert brain[csf].mean() < 0.2


def test_brain_masks_soft_prior(head):
    """A blurred prior (as from linear interpolation) thresholded at 0.5 gives the same ICV."""
    from scipy import ndimage as ndi

    data, icv_true, brain_true, _vent = head
    prior = ndi.gaussian_filter(icv_true.astype(np.float32), 1.0)
    icv, brain = masks.brain_masks(data, prior, zooms=(VS,) * 3)
    assert _dice(icv, icv_true) > 0.9
    assert _dice(brain, brain_true) > 0.9


def test_brain_masks_prior_restricted_to_head(head):
    """A prior bigger than the head (skull-stripped input) is cut to the non-air voxels."""
    data, icv_true, _brain, _vent = head
    stripped = np.where(icv_true, data, 0).astype(np.float32)
    big_prior = np.ones(data.shape, np.float32)
    icv, _ = masks.brain_masks(stripped, big_prior, zooms=(VS,) * 3)
    assert _dice(icv, icv_true) > 0.9


def test_empty_prior_raises(head):
    data, *_ = head
    with pytest.raises(ValueError, match="intracranial mask is empty"):
        masks.brain_masks(data, np.zeros(data.shape, np.float32), zooms=(VS,) * 3)


def test_mask_volume_ml():
    mask = np.zeros((10, 10, 10), bool)
    mask[:5, :4, :2] = True  # 40 voxels
    assert masks.mask_volume_ml(mask, (1.0, 1.0, 1.0)) == pytest.approx(0.04)
    assert masks.mask_volume_ml(mask, (2.0, 2.0, 2.0)) == pytest.approx(0.32)
    assert masks.mask_volume_ml(mask, np.array([0.5, 1.0, 4.0])) == pytest.approx(0.08)
    assert masks.mask_volume_ml(np.zeros((3, 3, 3), bool), (1, 1, 1)) == 0.0
