"""Intensity normalisation of a bias-corrected image."""

from __future__ import annotations

import numpy as np


def normalise_intensity(data: np.ndarray, mask: np.ndarray, *, percentile: float = 99.0,
                        clip_max: float = 2.0) -> np.ndarray:
    """Scale so that the ``percentile`` of intensities inside ``mask`` becomes 1.0.

    Zero stays zero (no shift), negative values are clipped to 0 and values above ``clip_max``
    (vessels, fat) to ``clip_max``. Returns float32.
    """
    data = np.asarray(data, dtype=np.float32)
    inside = data[np.asarray(mask, dtype=bool)]
    if inside.size == 0:
        raise ValueError("normalisation mask is empty")
    ref = float(np.percentile(inside, percentile))
    if ref <= 0:
        raise ValueError(f"the {percentile}th percentile inside the mask is {ref:g}; cannot normalise")
    return np.clip(data / ref, 0.0, clip_max).astype(np.float32)
