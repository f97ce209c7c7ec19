"""Regions of interest in template space: the cerebellum crop of the cerebellum branch."""

from __future__ import annotations

import numpy as np

#: The cerebellum box in MNI152 world coordinates (RAS mm, [start, stop)). It holds the
#: Diedrichsen 2009 lobules (x -55..56, y -93..-30, z -66..-1 in MNI152NLin6Asym) plus a margin;
#: 128 x 88 x 88 mm is a multiple of 8 voxels at 1 mm and of 16 at 0.5 mm for the networks.
CEREBELLUM_BOX_MM: tuple[tuple[float, float], ...] = ((-64.0, 64.0), (-106.0, -18.0), (-72.0, 16.0))


def box_slices(affine: np.ndarray, shape, box_mm) -> tuple[slice, slice, slice]:
    """Voxel slices of an axis-aligned grid covering the world box ``box_mm`` (clipped to the grid)."""
    affine = np.asarray(affine, dtype=float)
    rot = affine[:3, :3]
    if np.count_nonzero(np.abs(rot) > 1e-6 * np.abs(rot).max()) != 3:
        raise ValueError("box cropping needs an axis-aligned (non-oblique) grid")
    inv = np.linalg.inv(affine)
    corners = np.array([[x, y, z, 1.0] for x in box_mm[0] for y in box_mm[1] for z in box_mm[2]])
    vox = (corners @ inv.T)[:, :3]
    # Work along each voxel axis in the direction of increasing world coordinate, so that the
    # box's [start, stop) selects the same world voxels whatever the axis sign (LAS == RAS).
    sign = np.sign(rot[np.argmax(np.abs(rot), axis=0), np.arange(3)])
    svox = vox * sign
    lo = np.ceil(svox.min(axis=0) - 0.5 + 1e-6).astype(int)  # voxel centres inside the box
    hi = np.floor(svox.max(axis=0) - 0.5 + 1e-6).astype(int) + 1
    # back to voxel indices: on a flipped axis the half-open range [lo, hi) of -i is (-hi, -lo]
    lo, hi = np.where(sign > 0, lo, 1 - hi), np.where(sign > 0, hi, 1 - lo)
    lo = np.clip(lo, 0, shape[:3])
    hi = np.clip(hi, 0, shape[:3])
    if np.any(hi <= lo):
        raise ValueError(f"the box {box_mm} does not intersect the image grid")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_box(img, box_mm=CEREBELLUM_BOX_MM):
    """Crop ``img`` (axis-aligned grid, any axis order/sign) to the world box ``box_mm``."""
    return img.slicer[box_slices(img.affine, img.shape, box_mm)]
