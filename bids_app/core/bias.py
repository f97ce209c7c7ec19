"""N4 bias-field correction (Tustison et al. 2010) through ANTsPy."""

from __future__ import annotations

import numpy as np

from .images import from_ants, like, to_ants


def n4_correct(img, *, mask: np.ndarray | None = None, shrink_factor: int = 4,
               iterations: tuple[int, ...] = (50, 50, 30), spline_distance_mm: float = 100.0,
               convergence: float = 1e-6):
    """Estimate the bias field (inside ``mask`` when given) and divide it out everywhere.

    Returns ``(corrected, bias_field)`` as float32 images on ``img``'s grid. Intensities are
    shifted to be positive for the log-domain fit only; the input itself is divided by the field.
    """
    import ants

    data = np.asarray(img.dataobj, dtype=np.float32)
    offset = 0.0
    if data.min() <= 0:
        offset = float(-data.min()) + 1e-3 * float(np.ptp(data) or 1.0)
    shifted = like(img, data + offset, dtype=np.float32)
    amask = None
    if mask is not None:
        if not np.any(mask):
            raise ValueError("N4 mask is empty")
        amask = to_ants(like(img, mask.astype(np.float32)))
    field = ants.n4_bias_field_correction(
        to_ants(shifted), mask=amask, shrink_factor=int(shrink_factor),
        convergence={"iters": [int(i) for i in iterations], "tol": float(convergence)},
        spline_param=float(spline_distance_mm), return_bias_field=True,
    )
    bias = np.asarray(from_ants(field).dataobj, dtype=np.float32)
    bias = np.where(bias > 1e-6, bias, 1.0).astype(np.float32)
    corrected = data / bias  # the offset only serves the log-domain fit; zero background stays zero
    return like(img, corrected, dtype=np.float32), like(img, bias, dtype=np.float32)
