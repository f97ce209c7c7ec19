"""Geometry and degradation models of the super-resolution stage (pure numpy/scipy).

The network of :mod:`bids_app.models.superres` up-samples by an integer ``scale`` with the
convention of ``torch.nn.functional.interpolate(..., align_corners=False)``: output voxel ``i``
lies at input voxel coordinate ``(i + 0.5) / scale - 0.5``. :func:`upsampled_affine` writes that
into the header, :func:`interpolate` gives the trilinear / B-spline baselines on the same grid,
and :func:`degrade` makes the low-resolution training inputs whose voxels are exactly the
``scale``-blocks of the high-resolution image (box point-spread function), optionally with extra
blur, thick slices along one axis and noise, so that a network trained on 1 mm -> 2 mm -> 1 mm
transfers to 1 mm -> 0.5 mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def upsampled_affine(affine: np.ndarray, scale: int) -> np.ndarray:
    """Affine of the grid ``scale`` times finer than ``affine``'s (same field of view)."""
    s = float(scale)
    step = np.eye(4)
    step[:3, :3] *= 1.0 / s
    step[:3, 3] = (1.0 / s - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ step


def upsampled_shape(shape, scale: int) -> tuple[int, int, int]:
    return tuple(int(n) * int(scale) for n in shape[:3])


def interpolate(data: np.ndarray, scale: int, *, order: int = 1) -> np.ndarray:
    """Up-sample ``data`` by ``scale`` on the network's grid: ``order`` 1 trilinear, 3 cubic B-spline."""
    data = np.asarray(data, dtype=np.float32)
    axes = [(np.arange(n * scale, dtype=np.float64) + 0.5) / scale - 0.5 for n in data.shape]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(data, coords, order=order, mode="nearest", prefilter=order > 1).astype(np.float32)


def block_mean(data: np.ndarray, scale: int) -> np.ndarray:
    """Average of every ``scale``^3 block (the shape is cut to a multiple of ``scale``)."""
    s = int(scale)
    d, h, w = (n // s * s for n in data.shape[:3])
    x = np.asarray(data[:d, :h, :w], dtype=np.float32)
    return x.reshape(d // s, s, h // s, s, w // s, s).mean(axis=(1, 3, 5))


def degrade(hr: np.ndarray, scale: int, rng: np.random.Generator, *, blur_sigma: tuple[float, float] = (0.0, 0.6),
            thick_slice_probability: float = 0.25, thick_sigma: tuple[float, float] = (0.8, 1.6),
            noise_std: tuple[float, float] = (0.0, 0.03)) -> np.ndarray:
    """A realistic low-resolution version of ``hr`` (shape ``hr.shape // scale``).

    Gaussian blur of a random sigma (high-resolution voxels; models a smoother point-spread
    function than the box), sometimes an extra blur along one random axis (thick slices), the
    ``scale``-block mean, then Rician-like noise (magnitude of the image plus complex Gaussian
    noise of a random standard deviation, relative to the image's 99th percentile range of 1).
    """
    x = np.asarray(hr, dtype=np.float32)
    sigma = [float(rng.uniform(*blur_sigma))] * 3
    if rng.random() < thick_slice_probability:
        sigma[int(rng.integers(3))] = float(rng.uniform(*thick_sigma))
    if max(sigma) > 0.05:
        x = ndimage.gaussian_filter(x, sigma, mode="nearest")
    lr = block_mean(x, scale)
    std = float(rng.uniform(*noise_std))
    if std > 0:
        real = lr + rng.normal(0.0, std, lr.shape).astype(np.float32)
        imag = rng.normal(0.0, std, lr.shape).astype(np.float32)
        lr = np.sqrt(real * real + imag * imag) * (lr > 0)
    return lr.astype(np.float32)
