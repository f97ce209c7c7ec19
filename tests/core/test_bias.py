"""Tests of N4 bias-field correction (bids_app.core.bias)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core import bias, images

N = 40


@pytest.fixture(scope="module")
def biased():
    clean = np.zeros((N, N, N), np.float32)
    clean[4:36, 4:36, 4:36] = 100.0
    clean[12:28, 12:28, 12:28] = 200.0
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, N),) * 3, indexing="ij")
    field = (1.0 + 0.3 * x + 0.2 * y - 0.15 * z**2).astype(np.float32)  # smooth, 0.55-1.5
    rng = np.random.default_rng(7)
    data = clean * field + rng.normal(0, 1.0, clean.shape).astype(np.float32) * (clean > 0)
    img = images.new_image(data.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    return clean, field, img


@pytest.fixture(scope="module")
def corrected(biased):
    clean, _field, img = biased
    return bias.n4_correct(img, mask=clean > 0)


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_n4_lowers_coefficient_of_variation(biased, corrected):
    clean, _field, img = biased
    out, _bias = corrected
    before = np.asarray(img.dataobj)
    after = np.asarray(out.dataobj)
    assert out.shape == img.shape and after.dtype == np.float32
    np.testing.assert_allclose(out.affine, img.affine)
    for value in (100.0, 200.0):
        tissue = clean == value
        assert _cv(before[tissue]) > 0.08
        assert _cv(after[tissue]) < 0.4 * _cv(before[tissue])
    # the contrast between the classes is kept
    ratio = after[clean == 200].mean() / after[clean == 100].mean()
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_field_correlates_with_truth(biased, corrected):
    clean, field, img = biased
    out, est = corrected
    head = clean > 0
    est = np.asarray(est.dataobj)
    assert est.dtype == np.float32 and np.all(est > 0)
    a = est[head] / est[head].mean()
    b = field[head] / field[head].mean()
    assert np.corrcoef(a, b)[0, 1] > 0.8
    # inside the head, corrected = input / field (up to the small positivity shift of the fit)
    np.testing.assert_allclose(np.asarray(out.dataobj)[head] * est[head], np.asarray(img.dataobj)[head], rtol=0.01)


def test_nonpositive_intensities_are_shifted_and_back(biased):
    clean, _field, img = biased
    data = np.asarray(img.dataobj) - 50.0  # negative background
    out, est = bias.n4_correct(images.like(img, data, dtype=np.float32), mask=clean > 0, iterations=(20, 10))
    out = np.asarray(out.dataobj)
    assert np.all(np.isfinite(out))
    # outside the head the estimated field is close to 1 there, so the background stays near -50
    assert np.median(out[clean == 0]) == pytest.approx(-50.0, abs=15.0)


def test_empty_mask_raises(biased):
    _clean, _field, img = biased
    with pytest.raises(ValueError, match="empty"):
        bias.n4_correct(img, mask=np.zeros(img.shape, bool))
