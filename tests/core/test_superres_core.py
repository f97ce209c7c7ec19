"""Geometry, degradation and image-quality helpers of the super-resolution / T2-synthesis stages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bids_app.core import superres as sr
from bids_app.core.image_quality import mae, psnr, ssim


def test_upsampled_affine_keeps_the_field_of_view():
    affine = np.array([[-1.0, 0, 0, 63], [0, 1, 0, -106], [0, 0, 1, -72], [0, 0, 0, 1]])
    hi = sr.upsampled_affine(affine, 2)
    assert np.allclose(np.abs(np.diag(hi)[:3]), 0.5)
    # the first and last fine voxels sit a quarter voxel inside the first/last coarse voxel's edges
    lo_edge = affine @ [-0.5, -0.5, -0.5, 1]
    hi_edge = hi @ [-0.5, -0.5, -0.5, 1]
    assert np.allclose(lo_edge, hi_edge)
    lo_far = affine @ [9.5, 9.5, 9.5, 1]
    assert np.allclose(hi @ [19.5, 19.5, 19.5, 1], lo_far)


def test_interpolate_matches_torch_trilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    data = rng.random((6, 5, 4)).astype(np.float32)
    ours = sr.interpolate(data, 2, order=1)
    ref = torch.nn.functional.interpolate(torch.from_numpy(data)[None, None], scale_factor=2, mode="trilinear",
                                          align_corners=False)[0, 0].numpy()
    assert ours.shape == (12, 10, 8)
    assert np.allclose(ours, ref, atol=1e-5)


def test_block_mean_and_degrade():
    rng = np.random.default_rng(1)
    hr = rng.random((8, 6, 4)).astype(np.float32)
    lr = sr.block_mean(hr, 2)
    assert lr.shape == (4, 3, 2)
    assert np.isclose(lr[0, 0, 0], hr[:2, :2, :2].mean())
    clean = sr.degrade(hr, 2, np.random.default_rng(0), blur_sigma=(0, 0), thick_slice_probability=0,
                       noise_std=(0, 0))
    assert np.allclose(clean, lr)
    a = sr.degrade(hr, 2, np.random.default_rng(5))
    b = sr.degrade(hr, 2, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == lr.shape and (a >= 0).all()
    # background stays zero under noise
    z = np.zeros((8, 8, 8), np.float32)
    assert not sr.degrade(z, 2, np.random.default_rng(0), noise_std=(0.1, 0.1)).any()


def test_psnr_mae_ssim():
    rng = np.random.default_rng(2)
    ref = ndimage_smooth(rng.random((16, 16, 16)).astype(np.float32))
    assert psnr(ref, ref) == math.inf
    assert ssim(ref, ref) == pytest.approx(1.0)
    noisy = ref + 0.1
    assert mae(noisy, ref) == pytest.approx(0.1, abs=1e-6)
    assert psnr(noisy, ref) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 with range 1
    worse = ref + rng.normal(0, 0.2, ref.shape)
    assert ssim(worse, ref) < ssim(ref + rng.normal(0, 0.02, ref.shape), ref) < 1.0
    mask = np.zeros(ref.shape, bool)
    mask[4:8] = True
    assert mae(noisy, ref, mask) == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="empty"):
        mae(noisy, ref, np.zeros(ref.shape, bool))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(ref[:4], ref)


def ndimage_smooth(a):
    from scipy import ndimage

    return ndimage.gaussian_filter(a, 1.5)


def test_correlation_is_scale_free():
    from bids_app.core.image_quality import correlation

    rng = np.random.default_rng(4)
    ref = rng.random((6, 6, 6))
    assert correlation(2 * ref + 1, ref) == pytest.approx(1.0)
    assert correlation(-ref, ref) == pytest.approx(-1.0)
    assert np.isnan(correlation(np.ones_like(ref), ref))
