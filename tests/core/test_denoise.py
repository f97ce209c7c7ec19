"""Tests of non-local means denoising (bids_app.core.denoise)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core import denoise, images

N = 40
SIGMA = 15.0
INNER = (slice(15, 25),) * 3  # flat region of the bright block (value 200)
OUTER = (slice(7, 11), slice(8, 32), slice(8, 32))  # flat region of the dimmer shell (value 100)


@pytest.fixture(scope="module")
def noisy():
    clean = np.zeros((N, N, N), np.float32)
    clean[5:35, 5:35, 5:35] = 100.0
    clean[12:28, 12:28, 12:28] = 200.0
    rng = np.random.default_rng(42)
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    data = np.sqrt((clean + rng.normal(0, SIGMA, clean.shape)) ** 2 + rng.normal(0, SIGMA, clean.shape) ** 2)
    return clean, images.new_image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.fixture(scope="module")
def denoised(noisy):
    _clean, img = noisy
    mask = np.zeros((N, N, N), bool)
    mask[3:37, 3:37, 3:37] = True
    return mask, denoise.denoise_nlm(img, mask=mask, patch_radius=1, search_radius=2)


def test_noise_is_reduced_and_mean_kept(noisy, denoised):
    _clean, img = noisy
    _mask, out = denoised
    before = np.asarray(img.dataobj)
    after = np.asarray(out.dataobj)
    assert out.shape == img.shape
    np.testing.assert_allclose(out.affine, img.affine)
    for region in (INNER, OUTER):
        assert after[region].std() < 0.6 * before[region].std()
        assert after[region].mean() == pytest.approx(before[region].mean(), rel=0.03)


def test_outside_mask_unchanged_bit_for_bit(noisy, denoised):
    _clean, img = noisy
    mask, out = denoised
    before = np.asarray(img.dataobj, dtype=np.float32)
    after = np.asarray(out.dataobj)
    assert after.dtype == np.float32
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert not np.array_equal(after[mask], before[mask])


def test_negative_values_clipped_for_rician():
    rng = np.random.default_rng(0)
    data = (rng.normal(50, 10, (16, 16, 16)) - 45).astype(np.float32)
    assert data.min() < 0
    out = denoise.denoise_nlm(images.new_image(data, np.eye(4)), patch_radius=1, search_radius=1)
    assert np.asarray(out.dataobj).min() >= 0


@pytest.mark.parametrize("model", ["gaussian", "Poisson", ""])
def test_invalid_noise_model(noisy, model):
    _clean, img = noisy
    with pytest.raises(ValueError, match="noise_model"):
        denoise.denoise_nlm(img, noise_model=model)
