"""Non-local means denoising (ANTs DenoiseImage, Manjon et al. 2010) with a Rician noise model."""

from __future__ import annotations

import numpy as np

from .images import from_ants, like, to_ants


def denoise_nlm(img, *, mask: np.ndarray | None = None, patch_radius: int = 1, search_radius: int = 2,
                noise_model: str = "Rician"):
    """Adaptive non-local means on ``img``; only voxels inside ``mask`` (default: all) are denoised.

    ``patch_radius``/``search_radius`` are in voxels (ANTs ``-p``/``-r``). Negative input
    intensities are not allowed by the Rician model and are clipped to zero first.
    """
    import ants

    if noise_model not in ("Rician", "Gaussian"):
        raise ValueError(f"noise_model must be 'Rician' or 'Gaussian', not {noise_model!r}")
    data = np.asarray(img.dataobj, dtype=np.float32)
    if noise_model == "Rician" and data.min() < 0:
        img = like(img, np.clip(data, 0, None), dtype=np.float32)
    aimg = to_ants(img)
    amask = to_ants(like(img, mask.astype(np.float32))) if mask is not None else None
    out = ants.denoise_image(aimg, amask, shrink_factor=1, p=int(patch_radius), r=int(search_radius),
                             noise_model=noise_model)
    result = from_ants(out)
    if mask is not None:  # keep the original voxels outside the mask bit for bit
        arr = np.where(mask, np.asarray(result.dataobj), np.asarray(img.dataobj, dtype=np.float32))
        result = like(img, arr, dtype=np.float32)
    return result
