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


def input_resolution(zooms, model_voxel_mm: float) -> dict:
    """The input-geometry part of the segmentation QC: does the raw image hold the detail the models see?

    ``zooms`` are the raw image's voxel sizes (mm), ``model_voxel_mm`` the coarsest voxel of the models.
    ``Flag`` is ``"warn"`` when the thickest voxel edge exceeds ``model_voxel_mm`` (thick slices, coarse
    clinical scans): conforming then interpolates detail the scan never had, which MC-dropout CV does
    not always reveal (its cross-validation misses simulated 5 mm slices), so the geometry is reported
    on its own. Returns BIDS-style keys for the QC JSON.
    """
    sizes = [float(z) for z in np.asarray(zooms, dtype=float).ravel()[:3]]
    if len(sizes) != 3 or not all(np.isfinite(sizes)) or min(sizes) <= 0:
        raise ValueError(f"voxel sizes must be three positive numbers, got {list(zooms)}")
    if not model_voxel_mm > 0:
        raise ValueError(f"model voxel size must be positive, got {model_voxel_mm}")
    thickest, finest = max(sizes), min(sizes)
    coarse = thickest > float(model_voxel_mm) + 1e-3
    reason = None
    if coarse:
        axis = ("first", "second", "third")[sizes.index(thickest)]
        reason = (f"voxels are {thickest:.2f} mm along the {axis} voxel axis, coarser than the models' {float(model_voxel_mm):.2f} mm "
                  "grid: structures thinner than that are interpolated, so their volumes are less reliable")
    return {"VoxelSizeMM": [round(s, 4) for s in sizes], "ThickestMM": round(thickest, 4),
            "Anisotropy": round(thickest / finest, 3), "ModelVoxelMM": float(model_voxel_mm),
            "Flag": "warn" if coarse else "pass", "Reason": reason}
