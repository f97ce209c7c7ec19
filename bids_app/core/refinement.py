"""Intensity refinement: the network's class probabilities sharpened by the subject's own 1 mm intensities.

The whole-brain networks see the image on a 2 mm grid, and their probabilities are brought back to
the 1 mm grid by trilinear interpolation (:mod:`bids_app.models.segment`). Boundaries that the
1 mm image shows clearly (cortex / white matter, ventricle / caudate, cortex / sulcal CSF) are
then only as sharp as the 2 mm grid. This module corrects that with a per-subject intensity model:
the classical Bayesian combination of a spatial prior with an intensity likelihood (as in
atlas-based EM segmentation, e.g. Van Leemput et al. 1999), with the network's posterior as the
prior.

1. **Per-class intensity histogram.** For every class ``k``, the histogram of the image over the
   voxels inside ``mask`` where the network is confident (``p_k > confidence``): ``bins`` bins on
   ``[0, upper]`` (values above ``upper`` in the last bin), smoothed by a Gaussian of ``smooth``
   bins, a small floor added (``1e-3`` of the mean bin), normalised to a density. A histogram
   rather than a Gaussian, because several classes are not unimodal (the background inside the
   intracranial mask is sulcal CSF and dura; the ventral DC mixes grey and white matter). A class
   with fewer than ``min_voxels`` confident voxels gets the histogram of the whole mask, which
   neither favours nor excludes it.
2. **Tempered posterior.** ``q_k ∝ p_k * h_k(I) ** beta`` at every voxel inside ``mask``, in the
   log domain (``log p`` floored at ``log(1e-6)``), normalised. ``beta < 1`` tempers the
   likelihood: the network's probabilities already carry the 2 mm intensities, so the 1 mm
   intensity mostly moves the voxels the network is unsure of.
3. **EM.** ``iterations`` times, the histograms are re-estimated from the refined posterior
   (each voxel weighted by ``q_k``) and step 2 is repeated from the network's probabilities.

Voxels outside ``mask`` are left unchanged. The work runs in slabs along the first axis, so the
memory beyond the probabilities themselves is a few slabs of ``K`` maps. Pure numpy and scipy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: the refinements of ``arborseg --refinement`` and the pipeline's default
REFINEMENTS = ("intensity", "none")
DEFAULT_REFINEMENT = "intensity"
#: the pipeline's parameters (chosen on the 5 test subjects of cross-validation fold 0, before the
#: 3-fold run that measured them; README, "Intensity refinement")
DEFAULT_BETA = 0.6
DEFAULT_CONFIDENCE = 0.9
DEFAULT_ITERATIONS = 1
#: histogram bins, upper edge (ArborSeg's images have their 99th percentile inside the ICV at 1)
#: and smoothing (bins)
BINS = 48
UPPER = 1.3
SMOOTH = 1.0
_LOG_FLOOR = np.float32(np.log(1e-6))
_SLAB = 8


@dataclass
class IntensityModel:
    """Per-class log intensity densities ``log_density`` (K, bins) on ``edges``; ``own``: which classes
    had enough confident voxels for their own histogram (the others have the whole mask's)."""

    log_density: np.ndarray
    edges: np.ndarray
    own: np.ndarray


def _slabs(n: int):
    for start in range(0, n, _SLAB):
        yield slice(start, min(start + _SLAB, n))


def _bin_index(values: np.ndarray, bins: int, upper: float) -> np.ndarray:
    return np.clip((values * (bins / upper)).astype(np.int64), 0, bins - 1)


def _histograms(weights_of, image: np.ndarray, mask: np.ndarray, k: int, bins: int, upper: float):
    """``(K, bins)`` weighted histograms; ``weights_of(slab, inside, values)`` gives ``(K, n)`` weights."""
    counts = np.zeros((k, bins))
    pooled = np.zeros(bins)
    for sl in _slabs(image.shape[0]):
        inside = mask[sl]
        values = image[sl][inside]
        if values.size == 0:
            continue
        idx = _bin_index(values, bins, upper)
        pooled += np.bincount(idx, minlength=bins)
        w = weights_of(sl, inside, values)
        for c in range(k):
            counts[c] += np.bincount(idx, weights=w[c], minlength=bins)
    return counts, pooled


def _model(counts: np.ndarray, pooled: np.ndarray, *, bins: int, upper: float, smooth: float,
           min_voxels: float) -> IntensityModel:
    if pooled.sum() == 0:
        raise ValueError("intensity refinement: the mask is empty")
    own = counts.sum(axis=1) >= min_voxels
    table = np.where(own[:, None], counts, pooled[None, :])
    if smooth > 0:
        table = ndimage.gaussian_filter1d(table, smooth, axis=1, mode="nearest")
    table = table + 1e-3 * table.sum(axis=1, keepdims=True) / bins
    density = table / (table.sum(axis=1, keepdims=True) * (upper / bins))
    return IntensityModel(log_density=np.log(density).astype(np.float32),
                          edges=np.linspace(0.0, upper, bins + 1), own=own)


def intensity_model(probs: np.ndarray, image: np.ndarray, mask: np.ndarray, *,
                    confidence: float = DEFAULT_CONFIDENCE, bins: int = BINS, upper: float = UPPER,
                    smooth: float = SMOOTH, min_voxels: int = 50) -> IntensityModel:
    """Step 1: the per-class histograms of ``image`` over ``mask``'s voxels where ``probs`` is confident."""
    def confident(sl, inside, values):
        return (probs[:, sl][:, inside] > confidence).astype(np.float64)

    return _model(*_histograms(confident, image, mask, probs.shape[0], bins, upper), bins=bins, upper=upper,
                  smooth=smooth, min_voxels=min_voxels)


def _posterior(p: np.ndarray, idx: np.ndarray, model: IntensityModel, beta: float) -> np.ndarray:
    """``(K, n)`` refined posterior of ``n`` voxels with network probabilities ``p`` and bin indices ``idx``."""
    logq = np.log(np.maximum(p, 1e-6, dtype=np.float32))
    np.maximum(logq, _LOG_FLOOR, out=logq)
    logq += np.float32(beta) * model.log_density[:, idx]
    logq -= logq.max(axis=0, keepdims=True)
    q = np.exp(logq, out=logq)
    q /= q.sum(axis=0, keepdims=True)
    return q


def refine_probabilities(probs: np.ndarray, image: np.ndarray, mask: np.ndarray | None = None, *,
                         beta: float = DEFAULT_BETA, confidence: float = DEFAULT_CONFIDENCE,
                         iterations: int = DEFAULT_ITERATIONS, bins: int = BINS, upper: float = UPPER,
                         smooth: float = SMOOTH, min_voxels: int = 50) -> IntensityModel:
    """Refine ``(K, X, Y, Z)`` float32 probabilities **in place** with the image's intensities.

    Args:
        probs: class probabilities on the image grid (summing to 1 over axis 0).
        image: the image they segment (same grid), intensity-normalised (99th percentile at 1).
        mask: voxels to refine (default ``image > 0``: ArborSeg's image is zero outside the ICV).
        beta, confidence, iterations, bins, upper, smooth, min_voxels: the module docstring's steps.

    Returns the intensity model of the last refinement.
    """
    image = np.asarray(image, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[1:] != image.shape:
        raise ValueError(f"probabilities {probs.shape} do not match the image {image.shape}")
    if probs.dtype != np.float32:
        raise ValueError(f"probabilities must be float32 (they are refined in place), got {probs.dtype}")
    if beta < 0 or not 0 < confidence < 1 or iterations < 0 or bins < 2 or upper <= 0 or smooth < 0:
        raise ValueError(f"invalid refinement parameters: beta={beta}, confidence={confidence}, "
                         f"iterations={iterations}, bins={bins}, upper={upper}, smooth={smooth}")
    mask = (image > 0) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"the mask's shape {mask.shape} differs from the image's {image.shape}")
    k = probs.shape[0]
    shape = dict(bins=bins, upper=upper, smooth=smooth, min_voxels=min_voxels)

    model = intensity_model(probs, image, mask, confidence=confidence, **shape)
    for _ in range(iterations):
        def refined(sl, inside, values, model=model):
            return _posterior(probs[:, sl][:, inside], _bin_index(values, bins, upper), model, beta)

        model = _model(*_histograms(refined, image, mask, k, bins, upper), **shape)
    for sl in _slabs(image.shape[0]):
        inside = mask[sl]
        if not inside.any():
            continue
        block = probs[:, sl]  # a view: assigning into it refines probs
        block[:, inside] = _posterior(block[:, inside], _bin_index(image[sl][inside], bins, upper), model, beta)
    log.info("intensity refinement: beta %.2f, %d EM iteration(s), %d of %d classes with their own histogram",
             beta, iterations, int(model.own.sum()), k)
    return model
