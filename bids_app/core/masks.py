"""Intracranial and brain masks from a template prior and a tissue classification."""

from __future__ import annotations

import numpy as np


def kmeans_1d(values: np.ndarray, k: int = 3, *, iterations: int = 50) -> np.ndarray:
    """Sorted cluster centres of 1D ``values`` (Lloyd's algorithm on a 256-bin histogram)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to cluster")
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return np.full(k, lo)
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=256, range=(lo, hi))
    mids = 0.5 * (edges[1:] + edges[:-1])
    centres = np.percentile(values, np.linspace(100 / (2 * k), 100 - 100 / (2 * k), k))
    for _ in range(iterations):
        assign = np.argmin(np.abs(mids[:, None] - centres[None, :]), axis=1)
        new = np.array([
            np.average(mids[assign == j], weights=hist[assign == j]) if hist[assign == j].sum() > 0 else centres[j]
            for j in range(k)
        ])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.asarray(radius_vox, dtype=int), 1)
    grid = np.ogrid[tuple(slice(-int(x), int(x) + 1) for x in r)]
    return sum((g / max(int(x), 1)) ** 2 for g, x in zip(grid, r)) <= 1.0


def brain_masks(data: np.ndarray, prior: np.ndarray, *, zooms=(1.0, 1.0, 1.0), prior_threshold: float = 0.5):
    """``(icv, brain)`` boolean masks of a bias-corrected T1w ``data``.

    ``prior`` is the template brain mask resampled to ``data``'s grid (values 0-1, from the affine
    registration). Intracranial mask: the prior above ``prior_threshold``, restricted to voxels
    that are not air (this matters for skull-stripped inputs), largest component, holes filled.
    Brain (parenchyma) mask: inside the ICV, voxels brighter than the midpoint between the CSF and
    grey-matter intensity clusters (1D k-means, 3 classes), opened by 1 mm, largest component,
    holes filled (ventricles included), closed by 2 mm.
    """
    from scipy import ndimage as ndi

    from .conform import head_mask

    data = np.asarray(data, dtype=np.float32)
    zooms = np.asarray(zooms, dtype=float)
    head = head_mask(data, fraction=0.05, zooms=zooms)
    icv = (np.asarray(prior) >= prior_threshold) & head
    icv = ndi.binary_fill_holes(_largest_component(icv))
    if not icv.any():
        raise ValueError("the intracranial mask is empty: the registration to the template probably failed")
    csf, gm, _wm = kmeans_1d(data[icv], 3)
    brain = icv & (data > 0.5 * (csf + gm))
    brain = ndi.binary_opening(brain, structure=_ball(np.round(1.0 / zooms)))
    brain = _largest_component(brain)
    brain = ndi.binary_closing(brain, structure=_ball(np.round(2.0 / zooms))) & icv
    brain = ndi.binary_fill_holes(brain)
    return icv, brain


def mask_volume_ml(mask: np.ndarray, zooms) -> float:
    return float(np.count_nonzero(mask) * np.prod(np.asarray(zooms, dtype=float)) / 1000.0)
