"""File adapters: each reads its inputs, calls one pure function of ``core`` and writes its outputs.

Every adapter takes input paths and keyword-only output paths and returns what it wrote (plus
any figures the workflow needs). Writes are atomic: a crash never leaves a half-written file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from . import bias, conform, crop, denoise, images, intensity, masks, registration

LOGGER = logging.getLogger(__name__)


def save_atomic(img, out_file: str | Path) -> str:
    """``nibabel.save`` through a temporary file in the destination folder and one rename."""
    import nibabel as nb

    with atomic_output(out_file) as tmp:
        nb.save(img, str(tmp))
    return str(out_file)


def _load(path):
    import nibabel as nb

    return nb.load(str(path))


def _mask(path) -> np.ndarray:
    return np.asarray(_load(path).dataobj) > 0.5


def conform_file(in_file, *, out_file, voxel_size: float = 1.0, crop_margin_mm: float | None = 10.0):
    """Validate an anatomical image and conform it; returns ``(out_file, warnings)``."""
    img, warnings = images.load_anatomical(in_file)
    out = conform.conform(img, voxel_size=voxel_size, crop_margin_mm=crop_margin_mm)
    return save_atomic(out, out_file), warnings


def denoise_file(in_file, *, out_file, patch_radius: int = 1, search_radius: int = 2, noise_model: str = "Rician"):
    """Non-local means inside the head (air is left as it is, which halves the work)."""
    img = _load(in_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    head = conform.head_mask(data, zooms=images.zooms_of(img))
    out = denoise.denoise_nlm(img, mask=head, patch_radius=patch_radius, search_radius=search_radius,
                              noise_model=noise_model)
    return save_atomic(out, out_file)


def n4_file(in_file, *, out_file, bias_file, mask_file=None, shrink_factor: int = 4,
            iterations=(50, 50, 30), spline_distance_mm: float = 100.0, convergence: float = 1e-6):
    """N4 with the bias field estimated inside ``mask_file`` (default: the head)."""
    img = _load(in_file)
    if mask_file:
        mask = _mask(mask_file)
    else:
        mask = conform.head_mask(np.asarray(img.dataobj), zooms=images.zooms_of(img))
    corrected, field = bias.n4_correct(img, mask=mask, shrink_factor=shrink_factor, iterations=tuple(iterations),
                                       spline_distance_mm=spline_distance_mm, convergence=convergence)
    return save_atomic(corrected, out_file), save_atomic(field, bias_file)


def register_file(moving_file, fixed_file, *, forward_file, inverse_file, random_seed: int = 42):
    """Affine registration; writes the forward and the inverse ITK transforms (``.mat``)."""
    tx = registration.register_affine(_load(moving_file), _load(fixed_file), random_seed=random_seed)
    for transform, path in ((tx, forward_file), (tx.invert(), inverse_file)):
        with atomic_output(path) as tmp:
            registration.write_transform(transform, tmp)
    return str(forward_file), str(inverse_file)


def apply_transform_file(in_file, reference_file, transform_file, *, out_file, interpolation: str = "linear",
                         invert: bool = False):
    out = registration.apply_transform(registration.read_transform(transform_file), _load(in_file),
                                       _load(reference_file), interpolation=interpolation, invert=invert)
    return save_atomic(out, out_file)


def brain_masks_file(in_file, prior_file, *, icv_file, brain_file):
    """ICV and brain masks (uint8); returns ``(icv_file, brain_file, icv_ml, brain_ml)``."""
    img = _load(in_file)
    zooms = images.zooms_of(img)
    icv, brain = masks.brain_masks(np.asarray(img.dataobj), np.asarray(_load(prior_file).dataobj), zooms=zooms)
    save_atomic(images.like(img, icv, dtype=np.uint8), icv_file)
    save_atomic(images.like(img, brain, dtype=np.uint8), brain_file)
    return str(icv_file), str(brain_file), masks.mask_volume_ml(icv, zooms), masks.mask_volume_ml(brain, zooms)


def normalise_file(in_file, mask_file, *, out_file, percentile: float = 99.0):
    img = _load(in_file)
    out = intensity.normalise_intensity(np.asarray(img.dataobj), _mask(mask_file), percentile=percentile)
    return save_atomic(images.like(img, out, dtype=np.float32), out_file)


def crop_file(in_file, *, out_file, box_mm=crop.CEREBELLUM_BOX_MM, mask_file=None):
    """Crop to ``box_mm``; with ``mask_file`` (same grid) everything outside the mask becomes 0."""
    img = crop.crop_box(_load(in_file), box_mm)
    if mask_file:
        mask_img = crop.crop_box(_load(mask_file), box_mm)
        if mask_img.shape[:3] != img.shape[:3] or not np.allclose(mask_img.affine, img.affine, atol=1e-4):
            raise ValueError(f"{mask_file}: the mask is not on the grid of {in_file}")
        data = np.asarray(img.dataobj, dtype=np.float32) * (np.asarray(mask_img.dataobj) > 0.5)
        img = images.like(img, data, dtype=np.float32)
    return save_atomic(img, out_file)


def registration_quality(in_file, template_file, template_mask_file) -> float:
    """Correlation between the subject in template space and the template, inside the template mask."""
    a = np.asarray(_load(in_file).dataobj, dtype=np.float32)
    b = np.asarray(_load(template_file).dataobj, dtype=np.float32)
    return registration.normalised_cross_correlation(a, b, _mask(template_mask_file))
