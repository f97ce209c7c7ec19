"""Tests of intensity normalisation (bids_app.core.intensity)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core.intensity import normalise_intensity


@pytest.fixture()
def volume():
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 20), np.float32)
    data[4:16, 4:16, 4:16] = rng.uniform(50, 150, (12, 12, 12))
    data[0, 0, 0] = -30.0  # negative outlier outside the mask
    data[10, 10, 10] = 1000.0  # very bright voxel (vessel) inside the mask
    mask = data > 0
    return data, mask


def test_percentile_maps_to_one(volume):
    data, mask = volume
    out = normalise_intensity(data, mask, percentile=99.0)
    assert out.dtype == np.float32
    assert np.percentile(out[mask], 99.0) == pytest.approx(1.0, rel=1e-5)
    out90 = normalise_intensity(data, mask, percentile=90.0)
    assert np.percentile(out90[mask], 90.0) == pytest.approx(1.0, rel=1e-5)
    # a plain scaling where nothing is clipped
    ref = np.percentile(data[mask], 99.0)
    inside = (data >= 0) & (data <= 2 * ref)
    np.testing.assert_allclose(out[inside], data[inside] / ref, rtol=1e-6)


def test_zero_stays_zero_and_clipping(volume):
    data, mask = volume
    out = normalise_intensity(data, mask, clip_max=2.0)
    assert np.all(out[data == 0] == 0)
    assert out[0, 0, 0] == 0.0  # negative clipped to 0
    assert out[10, 10, 10] == 2.0  # bright voxel clipped to clip_max
    assert out.min() >= 0 and out.max() <= 2.0
    assert normalise_intensity(data, mask, clip_max=1.5).max() == pytest.approx(1.5)


def test_errors(volume):
    data, mask = volume
    with pytest.raises(ValueError, match="empty"):
        normalise_intensity(data, np.zeros_like(mask))
    with pytest.raises(ValueError, match="percentile"):
        normalise_intensity(-np.abs(data), mask)
