"""Resampling between two voxel grids of the same world space (no registration involved).

ArborSeg's conformed "T1w space" is an axis-aligned resampling of the raw T1w, so results computed
on it go back to the raw (native) grid through the two affines alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def voxel_to_voxel(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix taking ``dst`` voxel indices to ``src`` voxel indices (through world mm)."""
    return np.linalg.inv(np.asarray(src_affine, dtype=float)) @ np.asarray(dst_affine, dtype=float)


def resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                     *, order: int, cval: float = 0.0, dtype=None) -> np.ndarray:
    """``data`` (on ``src_affine``) sampled at the voxel centres of the ``dst`` grid.

    ``order=0``: nearest neighbour (label images keep their values); ``order=1``: linear.
    Points outside the source grid get ``cval``. Identical grids return a copy.
    """
    from scipy import ndimage

    data = np.asarray(data)
    dst_shape = tuple(int(s) for s in dst_shape[:3])
    matrix = voxel_to_voxel(src_affine, dst_affine)
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    if dst_shape == data.shape and np.allclose(matrix, np.eye(4), atol=1e-6):
        return data.astype(out_dtype, copy=True)
    if order == 0:
        # nearest neighbour on the integer data itself (no float round trip)
        out = ndimage.affine_transform(data, matrix[:3, :3], offset=matrix[:3, 3], output_shape=dst_shape,
                                       order=0, mode="constant", cval=cval, prefilter=False)
        return out.astype(out_dtype, copy=False)
    out = ndimage.affine_transform(np.asarray(data, dtype=np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                                   output_shape=dst_shape, order=order, mode="constant", cval=cval,
                                   prefilter=False)
    return out.astype(out_dtype, copy=False)
