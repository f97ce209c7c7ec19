"""Affine and rigid registration with ANTs (Avants et al. 2008) and applying the transforms."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .images import from_ants, to_ants

LOGGER = logging.getLogger(__name__)


def _register(moving, fixed, *, type_of_transform: str, fixed_mask=None, random_seed: int = 42,
              metric: str = "mattes"):
    """One ANTsPy registration of ``moving`` to ``fixed`` (nibabel images); returns the forward transform.

    Initialised by aligning the centres of mass; ``metric`` is the (linear stages') similarity metric.
    """
    import ants

    amask = None
    if fixed_mask is not None:
        amask = to_ants(fixed_mask)
    # ANTsPy >= 0.6 ignores a ``random_seed`` argument (it disappears in **kwargs) and passes
    # --random-seed only from ``ants.config._random_seed``; set it for this call only.
    config = getattr(ants, "config", None)
    previous = getattr(config, "_random_seed", None)
    if config is not None:
        config._random_seed = int(random_seed)
    try:
        result = ants.registration(
            fixed=to_ants(fixed), moving=to_ants(moving), type_of_transform=type_of_transform, aff_metric=metric,
            mask=amask, random_seed=int(random_seed), verbose=False,
        )
    finally:
        if config is not None:
            config._random_seed = previous
    paths = result["fwdtransforms"]
    transform = ants.read_transform(paths[0])
    for path in paths:  # ANTsPy leaves its transforms in the temp folder
        Path(path).unlink(missing_ok=True)
    return transform


def register_affine(moving, fixed, *, fixed_mask=None, random_seed: int = 42, metric: str = "mattes"):
    """Affine (12 dof) registration of ``moving`` to ``fixed``; both nibabel images.

    Staged for robustness (ANTs "TRSAA": translation, rigid, similarity, then two affine stages,
    each multi-resolution), initialised by aligning the centres of mass. The staging matters for
    thick-slice clinical scans, where a direct affine search can stop in a poor optimum. Returns the
    forward transform (moving -> fixed point mapping as ANTs applies it) as an ``ANTsTransform``.
    """
    return _register(moving, fixed, type_of_transform="TRSAA", fixed_mask=fixed_mask, random_seed=random_seed,
                     metric=metric)


def register_rigid(moving, fixed, *, fixed_mask=None, random_seed: int = 42, metric: str = "mattes"):
    """Rigid (6 dof) registration of ``moving`` to ``fixed`` (e.g. a T2w to the T1w of the same session).

    ANTs "Rigid" (multi-resolution, centres of mass aligned first) with Mattes mutual information by
    default, which suits two contrasts. Returns the forward transform as an ``ANTsTransform``: it
    maps a point of ``fixed`` to the same anatomy in ``moving`` (what resampling ``moving`` needs).
    """
    return _register(moving, fixed, type_of_transform="Rigid", fixed_mask=fixed_mask, random_seed=random_seed,
                     metric=metric)


def apply_transform(transform, moving, reference, *, interpolation: str = "linear", invert: bool = False):
    """Resample ``moving`` onto ``reference``'s grid through ``transform`` (or its inverse)."""
    tx = transform.invert() if invert else transform
    out = tx.apply_to_image(to_ants(moving), reference=to_ants(reference), interpolation=interpolation)
    return from_ants(out)


def write_transform(transform, path: str | Path) -> Path:
    """Write an ITK/ANTs transform (``.mat``, readable by antsApplyTransforms)."""
    import ants

    ants.write_transform(transform, str(path))
    return Path(path)


def read_transform(path: str | Path):
    import ants

    return ants.read_transform(str(path))


def normalised_cross_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images over ``mask``: a registration-quality figure for reports."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0
