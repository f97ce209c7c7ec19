"""The subject's own T2w on the cerebellum crop grid (the real-T2 alternative to the synthetic T2w).

The T2w is registered rigidly to the raw T1w of the same session (ANTs, Mattes mutual information:
:func:`bids_app.core.registration.register_rigid`), then resampled *once* onto the cerebellum crop
through the composition of the T1w -> template affine of the preprocessing (the transform that made
the crop) and that rigid transform. It is then treated like the T1w crop: zero outside the crop's
brain (``crop > 0``) and normalised so that its 99th percentile inside the brain is 1
(:func:`bids_app.core.intensity.normalise_intensity`).

ANTs transforms map points of the fixed space to the moving space, so a crop voxel's T2w value is
read at ``rigid(forward(p))``: the composite ``[forward, rigid]`` (the first is applied first).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import images, intensity, registration

LOGGER = logging.getLogger(__name__)

#: interpolation of the T2w onto the crop (as the template-space T1w the crop is cut from)
INTERPOLATION = "bSpline"


def rigid_summary(transform, centre_mm) -> dict[str, Any]:
    """Translation (mm, RAS) and rotation angle (degrees) of a rigid ANTs transform, around ``centre_mm`` (RAS)."""
    lps = np.array([-1.0, -1.0, 1.0])
    centre = np.asarray(centre_mm, dtype=float)
    moved = np.asarray(transform.apply_to_point(tuple(centre * lps))) * lps
    axes = []
    for axis in np.eye(3):
        p = np.asarray(transform.apply_to_point(tuple((centre + 10.0 * axis) * lps))) * lps
        axes.append((p - moved) / 10.0)
    rot = np.stack(axes, axis=1)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))))
    return {"TranslationMM": [round(float(v), 3) for v in moved - centre], "RotationDegrees": round(angle, 3)}


def _centre_mm(img) -> np.ndarray:
    centre = (np.asarray(img.shape[:3], dtype=float) - 1.0) / 2.0
    return np.asarray(img.affine, dtype=float)[:3, :3] @ centre + np.asarray(img.affine, dtype=float)[:3, 3]


def t2w_on_crop(t2w, t1w, crop, forward_transform, *, random_seed: int = 42, percentile: float = 99.0):
    """The T2w ``t2w`` on the grid of the T1w crop ``crop``; returns ``(image, rigid transform, summary)``.

    ``t1w``: the raw T1w of the session (the registration target; the same world space as the
    conformed T1w the ``forward_transform`` was estimated from). ``forward_transform``: the ANTs
    T1w -> template transform of the preprocessing. The image is float32, zero outside ``crop > 0``,
    with its ``percentile`` inside the brain at 1.0 (values clipped to [0, 2]).
    """
    import ants

    rigid = registration.register_rigid(t2w, t1w, random_seed=random_seed)
    composite = ants.compose_ants_transforms([forward_transform, rigid])
    moved = registration.apply_transform(composite, t2w, crop, interpolation=INTERPOLATION)
    brain = np.asarray(crop.dataobj, dtype=np.float32) > 0
    if not brain.any():
        raise ValueError("the cerebellum crop is empty (no voxel > 0): nothing to normalise the T2w in")
    data = np.asarray(moved.dataobj, dtype=np.float32)
    if not (data[brain] > 0).any():
        raise ValueError("the registered T2w is zero everywhere inside the cerebellum crop: it does not cover the "
                         "cerebellum")
    data = intensity.normalise_intensity(data, brain, percentile=percentile) * brain
    summary = {"Registration": "rigid, ANTs (Mattes mutual information), T2w -> raw T1w",
               "Interpolation": INTERPOLATION, "NormalisationPercentile": float(percentile),
               "BrainCoverage": round(float((np.asarray(moved.dataobj)[brain] > 0).mean()), 4),
               **rigid_summary(rigid, _centre_mm(t1w))}
    return images.like(crop, data.astype(np.float32), dtype=np.float32), rigid, summary


def t2w_crop_file(t2w_file, t1w_file, crop_file, forward_transform_file, *, out_file, transform_file, json_file,
                  random_seed: int = 42) -> tuple[str, str, str]:
    """File adapter of :func:`t2w_on_crop`: writes the T2w crop, the T2w -> T1w rigid transform (ITK
    ``.mat``) and a JSON summary (with the T2w's file name), atomically; returns their paths."""
    from ..atomic import atomic_output
    from ..bids import atomic_write_json
    from .files import save_atomic

    t2w, warnings = images.load_anatomical(t2w_file)
    for warning in warnings:
        LOGGER.warning("%s", warning)
    t1w, _ = images.load_anatomical(t1w_file)
    crop = images.load_image(crop_file)
    if len(crop.shape) != 3:
        raise ValueError(f"{crop_file}: the cerebellum crop must be a 3D image, its shape is {crop.shape}")
    image, rigid, summary = t2w_on_crop(t2w, t1w, crop, registration.read_transform(forward_transform_file),
                                        random_seed=random_seed)
    save_atomic(image, out_file)
    with atomic_output(transform_file) as tmp:
        registration.write_transform(rigid, tmp)
    summary = {"source": "real", "file": Path(str(t2w_file)).name, **summary}
    atomic_write_json(Path(json_file), summary)
    LOGGER.info("T2w %s on the cerebellum crop: translation %s mm, rotation %.2f deg", Path(str(t2w_file)).name,
                summary["TranslationMM"], summary["RotationDegrees"])
    return str(out_file), str(transform_file), str(json_file)
