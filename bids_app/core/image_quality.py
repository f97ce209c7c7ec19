"""Image similarity metrics for the image-to-image stages (super-resolution, T2 synthesis).

Pure numpy/scipy. Every metric is computed inside an optional boolean ``mask`` (the brain or the
cerebellum crop's foreground); ``data_range`` is the range the PSNR and SSIM constants refer to
(1.0 for images normalised to their 99th brain percentile).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _masked(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    if mask is None:
        return pred.ravel(), ref.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != ref.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {ref.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return pred[mask], ref[mask]


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error."""
    p, r = _masked(pred, ref, mask)
    return float(np.mean(np.abs(p - r)))


def correlation(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation (scale- and offset-free: a contrast that is right up to a linear map scores 1)."""
    p, r = _masked(pred, ref, mask)
    if p.std() == 0 or r.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, r)[0, 1])


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)`` (inf for identical images)."""
    p, r = _masked(pred, ref, mask)
    mse = float(np.mean((p - r) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = 1.0,
         sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a 3D Gaussian window, averaged over ``mask``.

    Local means, variances and covariance use a Gaussian of ``sigma`` voxels (the usual 1.5),
    constants ``C1 = (0.01 R)^2`` and ``C2 = (0.03 R)^2``.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(ref, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")

    def blur(a):
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    values, _ = _masked(smap, smap, mask)
    return float(values.mean())
