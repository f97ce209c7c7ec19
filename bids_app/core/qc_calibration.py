"""Calibration of the MC-dropout QC thresholds of one model ensemble (pure functions).

The volume CV a network gives depends on the network (its dropout rate, its depth, how far it is
trained) and on the ensemble it runs in, so a fixed threshold such as Zopes et al.'s "below 1 % on
a good MPRAGE" says little about another model. Here the thresholds come from the ensemble's own
cross-validation on held-out *clean* scans:

* per structure ``k``: ``max(mean_k + n_sd * sd_k, max_k)`` over the clean scans (sample standard
  deviation, ``ddof=1``), so no clean validation scan is flagged and a scan must be clearly less
  certain than the validation scans to be. NaN where fewer than ``min_scans`` scans have the
  structure (the caller falls back to the mean threshold there);
* the mean CV (over structures) the same way, from the clean scans' mean CVs.

:func:`threshold_study` then says what such a threshold does on the whole study (clean and
deliberately degraded scans): how many of each are flagged and the mean Dice of the flagged and
the passed scans, which is what a user needs to trust the flag.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

#: standard deviations above the clean scans' mean CV at which a scan is flagged
DEFAULT_N_SD = 2.0
#: fewest clean scans a threshold is estimated from
MIN_SCANS = 3


def upper_limit(values: Sequence[float] | np.ndarray, n_sd: float = DEFAULT_N_SD, min_scans: int = MIN_SCANS,
                axis: int = 0) -> np.ndarray:
    """``max(mean + n_sd * sd, max)`` of the finite values along ``axis``; NaN with fewer than ``min_scans``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("expected at least one axis of values")
    finite = np.isfinite(x)
    count = finite.sum(axis=axis)
    safe = np.where(finite, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = safe.sum(axis=axis) / count
        var = (np.where(finite, x - np.expand_dims(mean, axis), 0.0) ** 2).sum(axis=axis) / (count - 1)
        top = np.where(finite, x, -np.inf).max(axis=axis)
    limit = np.maximum(mean + float(n_sd) * np.sqrt(var), top)
    return np.where(count >= int(min_scans), limit, np.nan)


def calibrate_protocol(clean_cv: np.ndarray, clean_mean_cv: Sequence[float], names: Sequence[str],
                       n_sd: float = DEFAULT_N_SD, min_scans: int = MIN_SCANS) -> dict:
    """Thresholds of one protocol from ``clean_cv`` ``(scans, K)`` (background excluded by the caller).

    Returns ``{"mean_cv_threshold_percent": t, "structure_thresholds_percent": {name: t_k}}``;
    structures without a threshold are left out.
    """
    clean_cv = np.asarray(clean_cv, dtype=np.float64)
    if clean_cv.ndim != 2 or clean_cv.shape[1] != len(names):
        raise ValueError(f"expected clean CVs of shape (scans, {len(names)}), got {clean_cv.shape}")
    mean_limit = float(upper_limit(np.asarray(clean_mean_cv, dtype=np.float64), n_sd, min_scans))
    if not math.isfinite(mean_limit):
        raise ValueError(f"at least {min_scans} clean scans with a defined mean CV are needed, "
                         f"got {int(np.isfinite(np.asarray(clean_mean_cv, dtype=float)).sum())}")
    limits = upper_limit(clean_cv, n_sd, min_scans)
    return {"mean_cv_threshold_percent": round(mean_limit, 4),
            "structure_thresholds_percent": {str(n): round(float(t), 4) for n, t in zip(names, limits)
                                             if math.isfinite(t)}}


def threshold_study(mean_cv: Sequence[float], dice: Sequence[float], conditions: Sequence[str],
                    threshold: float) -> dict:
    """What ``threshold`` does on a QC study: flagged counts (clean / degraded) and Dice of flagged vs passed."""
    cv = np.asarray(mean_cv, dtype=np.float64)
    d = np.asarray(dice, dtype=np.float64)
    clean = np.asarray([c == "clean" for c in conditions])
    if not (cv.shape == d.shape == clean.shape):
        raise ValueError("mean_cv, dice and conditions must have the same length")
    warn = ~(np.isfinite(cv) & (cv <= float(threshold)))

    def mean_or_none(sel: np.ndarray) -> float | None:
        return round(float(np.mean(d[sel])), 4) if sel.any() else None

    return {"threshold_percent": round(float(threshold), 4),
            "clean_scans": int(clean.sum()), "clean_flagged": int((warn & clean).sum()),
            "degraded_scans": int((~clean).sum()), "degraded_flagged": int((warn & ~clean).sum()),
            "mean_dice_passed": mean_or_none(~warn), "mean_dice_flagged": mean_or_none(warn)}


def calibrations_of(manifest: Mapping) -> list[dict]:
    """The calibrations a manifest holds: its ``qc_calibration`` is one object or a list (a model can be a member
    of several calibrated ensembles, e.g. the hemisphere network of both cerebellum paths)."""
    cal = manifest.get("qc_calibration")
    items = cal if isinstance(cal, list) else [cal]
    return [dict(c) for c in items if isinstance(c, Mapping)]


def _matches(cal: Mapping, wanted: list[str], modality: str, tta: str | None = None) -> bool:
    """Same ensemble and modality (and, unless ``tta`` is None, the same test-time augmentation)."""
    return (sorted(map(str, cal.get("ensemble") or [])) == wanted and cal.get("modality", "T1w") == modality
            and (tta is None or cal.get("tta", "none") == tta))


def find_calibration(manifests: Sequence[Mapping], names: Sequence[str], modality: str,
                     tta: str = "none") -> dict | None:
    """The calibration of a member manifest made for exactly this ensemble and modality, else None.

    One made with the same test-time augmentation (``tta``; calibrations without one were made
    without) comes first; else one with another (:func:`samples_warning` then says so).
    """
    wanted = sorted(str(n) for n in names)
    for exact in (True, False):
        for manifest in manifests:
            for cal in calibrations_of(manifest):
                if _matches(cal, wanted, modality, tta if exact else None):
                    return cal
    return None


def with_calibration(manifest: Mapping, calibration: Mapping) -> dict:
    """A copy of ``manifest`` holding ``calibration``, replacing one for the same ensemble, modality and TTA."""
    wanted = sorted(map(str, calibration.get("ensemble") or []))
    kept = [c for c in calibrations_of(manifest)
            if not _matches(c, wanted, calibration.get("modality", "T1w"), calibration.get("tta", "none"))]
    out = dict(manifest)
    out["qc_calibration"] = kept + [dict(calibration)] if kept else dict(calibration)
    return out


def protocol_thresholds(calibration: Mapping | None, protocol: str, names: Sequence[str],
                        fallback: float) -> tuple[float, np.ndarray]:
    """``(mean threshold, per-class thresholds)`` of ``protocol``; ``fallback`` where uncalibrated.

    The per-class array follows ``names`` (the protocol's class names, background included).
    """
    table = ((calibration or {}).get("protocols") or {}).get(protocol)
    if not table:
        return float(fallback), np.full(len(names), float(fallback))
    mean_limit = float(table["mean_cv_threshold_percent"])
    per = table.get("structure_thresholds_percent") or {}
    return mean_limit, np.array([float(per.get(n, mean_limit)) for n in names], dtype=np.float64)


def origin_text(calibrated: bool) -> str:
    """Where a QC threshold came from, in words (for the reports)."""
    if calibrated:
        return "calibrated for these models on clean held-out scans; each structure has its own threshold"
    return "the default for the modality: these models have no calibration"


def class_thresholds(structure_thresholds: Sequence[float] | None, threshold: float, n_classes: int) -> np.ndarray:
    """Per class thresholds: the calibrated ones, else ``threshold`` for all ``n_classes``."""
    if structure_thresholds is not None:
        return np.asarray(structure_thresholds, dtype=np.float64)
    return np.full(int(n_classes), float(threshold))


def samples_warning(calibration: Mapping | None, mc_samples: int, tta: str | None = None) -> str | None:
    """A warning when ``calibration`` was made with another number of MC samples or another test-time
    augmentation than this run (``tta``; None: not checked): the CVs are then less comparable."""
    if calibration is None:
        return None
    problems = []
    if int(calibration.get("mc_samples", mc_samples)) != int(mc_samples):
        problems.append(f"{calibration.get('mc_samples')} MC samples (this run draws {int(mc_samples)})")
    if tta is not None and calibration.get("tta", "none") != tta:
        problems.append(f"test-time augmentation {calibration.get('tta', 'none')} (this run: {tta})")
    if not problems:
        return None
    return f"the QC thresholds were calibrated with {' and '.join(problems)}: the CVs are less comparable"
