"""Conforming: any orientation, voxel size and datatype to one axis-aligned RAS+ isotropic grid."""

from __future__ import annotations

import logging

import numpy as np

from .images import new_image

LOGGER = logging.getLogger(__name__)


def head_mask(data: np.ndarray, *, fraction: float = 0.1, zooms=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The head (everything brighter than air), as the largest connected component with holes filled.

    The threshold is ``fraction`` of the robust maximum (99.5th percentile of non-zero voxels).
    """
    from scipy import ndimage as ndi

    data = np.asarray(data, dtype=np.float32)
    nonzero = data[data > 0]
    if nonzero.size == 0:
        return np.zeros(data.shape, dtype=bool)
    mask = data > fraction * float(np.percentile(nonzero, 99.5))
    radius = np.maximum(np.round(2.0 / np.asarray(zooms, dtype=float)), 1).astype(int)
    structure = np.ones(tuple(2 * r + 1 for r in radius), dtype=bool)
    mask = ndi.binary_closing(mask, structure=structure, iterations=1)
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndi.binary_fill_holes(mask)


def conformed_grid(img, voxel_size: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the axis-aligned RAS+ grid with ``voxel_size`` covering ``img``'s field of view."""
    affine = np.asarray(img.affine, dtype=float)
    shape = np.asarray(img.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    out_shape = tuple(int(n) for n in np.floor((hi - lo) / voxel_size + 1e-6).astype(int) + 1)
    out_affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    out_affine[:3, 3] = lo
    return out_shape, out_affine


def conform(img, *, voxel_size: float = 1.0, crop_margin_mm: float | None = 10.0, order: int = 3):
    """Resample ``img`` onto an axis-aligned RAS+ grid of isotropic ``voxel_size`` (mm).

    Cubic B-spline interpolation (``order=3``) with overshoot clipped to the input's range. When
    ``crop_margin_mm`` is set, the grid is cropped to the head's bounding box plus that margin
    (same physical space, fewer voxels of air). Returns a float32 ``Nifti1Image``.
    """
    from scipy import ndimage as ndi

    data = np.asarray(img.dataobj, dtype=np.float32)
    out_shape, out_affine = conformed_grid(img, voxel_size)
    # voxel (output) -> world -> voxel (input)
    mapping = np.linalg.inv(np.asarray(img.affine, dtype=float)) @ out_affine
    same_grid = out_shape == tuple(data.shape) and np.allclose(mapping, np.eye(4), atol=1e-5)
    if same_grid:
        resampled = data.copy()
    else:
        resampled = ndi.affine_transform(
            data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=out_shape, order=order,
            mode="constant", cval=0.0, prefilter=order > 1,
        )
        np.clip(resampled, float(data.min()), float(data.max()), out=resampled)
    out = new_image(resampled, out_affine, dtype=np.float32)
    if crop_margin_mm is not None:
        out = crop_to_mask(out, head_mask(resampled, zooms=(voxel_size,) * 3), margin_mm=crop_margin_mm)
    LOGGER.debug("conformed %s -> %s at %.2f mm", tuple(data.shape), out.shape, voxel_size)
    return out


def crop_to_mask(img, mask: np.ndarray, *, margin_mm: float):
    """Crop ``img`` to the bounding box of ``mask`` plus ``margin_mm`` (clipped to the grid)."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return img
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    margin = np.ceil(margin_mm / zooms).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, np.asarray(img.shape[:3]))
    return img.slicer[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
