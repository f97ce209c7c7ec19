"""Segmentation evaluation metrics: overlap, surface distances and agreement of volumes.

Pure numpy/scipy. Conventions:

* A structure that is empty in both the prediction and the reference has NaN for every overlap
  metric, so that it is left out of means (``np.nanmean``); when only one of them is empty the
  overlap metrics are 0 (Dice, F2, volumetric similarity) and the surface distances are NaN.
* Surfaces are the voxels of a mask that its binary erosion with the 6-connected (face)
  structuring element removes; voxels on the image border count as surface (``border_value=0``),
  as in medpy. Distances are Euclidean in millimetres, from the centre of every surface voxel of
  one mask to the nearest surface voxel of the other.
* HD95 follows medpy (``medpy.metric.binary.hd95``): the 95th percentile of the pooled distances
  of both directions. ``mode="max"`` gives the other common definition (MONAI, many challenges):
  the larger of the two directed 95th percentiles. ASSD is the mean of the pooled distances.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

NAN = float("nan")

#: The keys of the rows :func:`structure_metrics` returns, in TSV column order.
METRIC_KEYS = ("dice", "hd95_mm", "assd_mm", "volumetric_similarity", "f2", "balanced_accuracy",
               "volume_pred_mm3", "volume_ref_mm3")


# --------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------

def confusion(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` voxel counts of two binary masks of the same shape."""
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def dice(tp: float, fp: float, fn: float) -> float:
    """Dice coefficient ``2TP / (2TP + FP + FN)``; NaN when both masks are empty."""
    den = 2.0 * tp + fp + fn
    return NAN if den == 0 else float(2.0 * tp / den)


def f_beta(tp: float, fp: float, fn: float, beta: float = 2.0) -> float:
    """F-beta score ``(1+b²)TP / ((1+b²)TP + b²FN + FP)`` (F2 = 5TP / (5TP + 4FN + FP)).

    Recall weighs ``beta`` times as much as precision. NaN when both masks are empty.
    """
    b2 = float(beta) ** 2
    den = (1.0 + b2) * tp + b2 * fn + fp
    return NAN if den == 0 else float((1.0 + b2) * tp / den)


def volumetric_similarity(tp: float, fp: float, fn: float) -> float:
    """``1 - |FN - FP| / (2TP + FP + FN)``; NaN when both masks are empty."""
    den = 2.0 * tp + fp + fn
    return NAN if den == 0 else float(1.0 - abs(fn - fp) / den)


def balanced_accuracy(tp: float, fp: float, fn: float, tn: float) -> float:
    """``(TPR + TNR) / 2``; NaN when the structure is empty in both masks.

    When one of the rates is undefined (an empty reference has no TPR, a reference filling the
    whole image no TNR) the score is the other rate, as ``sklearn.metrics.balanced_accuracy_score``
    does.
    """
    if tp + fp + fn == 0:
        return NAN
    rates = []
    if tp + fn > 0:
        rates.append(tp / (tp + fn))
    if tn + fp > 0:
        rates.append(tn / (tn + fp))
    return float(np.mean(rates)) if rates else NAN


# --------------------------------------------------------------------------------------------
# surface distances
# --------------------------------------------------------------------------------------------

def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion with the face-connected structuring element (border voxels count)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _padded_box(slices: Sequence[slice], shape: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
    """``slices`` grown by ``margin`` voxels on every side, clipped to the image."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(slices, shape))


def _union_slices(a: Sequence[slice], b: Sequence[slice]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels of ``mask`` (None when empty)."""
    boxes = ndimage.find_objects(np.asarray(mask, dtype=np.uint8))
    return boxes[0] if boxes else None


def _box_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both directed surface distance sets of two non-empty masks cut out of the same box.

    The box must contain both masks with one voxel to spare on every side that is not the image
    border, so that the erosion sees the same neighbourhood as in the whole image. All surface
    voxels of both masks are then inside the box, so the distance transform of the box gives the
    exact distance to the nearest of them at every voxel of the box.
    """
    surf_pred = _surface(pred)
    surf_ref = _surface(ref)
    to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return to_ref[surf_pred], to_pred[surf_ref]


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(pred surface -> ref surface, ref surface -> pred surface)`` distances in mm.

    One value per surface voxel of the first mask of each direction. Computed inside the
    bounding box of the union of both masks padded by one voxel, which gives the same result as
    the whole image (see :func:`_box_distances`). Two empty arrays when either mask is empty.
    """
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    spacing = _spacing(spacing, pred.ndim)
    box_pred, box_ref = _bbox(pred), _bbox(ref)
    if box_pred is None or box_ref is None:
        return np.empty(0), np.empty(0)
    box = _padded_box(_union_slices(box_pred, box_ref), pred.shape)
    return _box_distances(pred[box], ref[box], spacing)


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    if any(not s > 0 for s in spacing):
        raise ValueError(f"voxel spacing must be positive, got {spacing}")
    return spacing


def hd95_from_distances(d_pred_to_ref: np.ndarray, d_ref_to_pred: np.ndarray, mode: str = "pooled") -> float:
    """HD95 of two directed distance sets; NaN when either is empty.

    ``mode="pooled"`` (default, medpy's ``hd95``): 95th percentile of both sets together.
    ``mode="max"``: ``max(percentile(d_pred_to_ref, 95), percentile(d_ref_to_pred, 95))``.
    Percentiles interpolate linearly (numpy's default), as medpy does.
    """
    a, b = np.asarray(d_pred_to_ref, dtype=float), np.asarray(d_ref_to_pred, dtype=float)
    if a.size == 0 or b.size == 0:
        return NAN
    if mode == "pooled":
        return float(np.percentile(np.concatenate([a, b]), 95))
    if mode == "max":
        return float(max(np.percentile(a, 95), np.percentile(b, 95)))
    raise ValueError(f"unknown HD95 mode {mode!r} (pooled or max)")


def assd_from_distances(d_pred_to_ref: np.ndarray, d_ref_to_pred: np.ndarray) -> float:
    """Average symmetric surface distance: mean of both sets together; NaN when either is empty."""
    a, b = np.asarray(d_pred_to_ref, dtype=float), np.asarray(d_ref_to_pred, dtype=float)
    if a.size == 0 or b.size == 0:
        return NAN
    return float(np.concatenate([a, b]).mean())


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | None = None,
         mode: str = "pooled") -> float:
    """95th-percentile Hausdorff distance (mm) of two masks; NaN when either is empty.

    See :func:`hd95_from_distances` for ``mode``; the default is medpy's definition.
    """
    return hd95_from_distances(*surface_distances(pred_mask, ref_mask, spacing), mode=mode)


def assd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance (mm) of two masks; NaN when either is empty."""
    return assd_from_distances(*surface_distances(pred_mask, ref_mask, spacing))


# --------------------------------------------------------------------------------------------
# all structures of a label image
# --------------------------------------------------------------------------------------------

def structure_metrics(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int],
                      spacing: Sequence[float] | None = None,
                      names: Sequence[str] | Mapping[int, str] | None = None,
                      hd95_mode: str = "pooled") -> list[dict]:
    """Metrics of every label value in ``labels`` between two label images of the same shape.

    Returns one dict per label, in the order given, with ``label``, ``name`` and the
    :data:`METRIC_KEYS`. The voxel counts of all labels come from one ``np.bincount`` of the
    joint (prediction, reference) index; the surface distances of each label are computed in
    the padded union of its bounding boxes (``scipy.ndimage.find_objects``, one pass per image).
    Values of the images that are not in ``labels`` count as "other" (background for every label).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label image shapes differ: {pred.shape} vs {ref.shape}")
    labels = [int(v) for v in labels]
    if len(set(labels)) != len(labels):
        raise ValueError("labels are not unique")
    spacing = _spacing(spacing, pred.ndim)
    if names is None:
        names = [str(v) for v in labels]
    elif isinstance(names, Mapping):
        names = [str(names.get(v, v)) for v in labels]
    elif len(names) != len(labels):
        raise ValueError(f"{len(names)} names for {len(labels)} labels")
    n_labels = len(labels)
    if n_labels == 0:
        return []

    ids_pred = _label_ids(pred, labels)
    ids_ref = _label_ids(ref, labels)
    joint = ids_pred.astype(np.int64) * (n_labels + 1) + ids_ref
    counts = np.bincount(joint.ravel(), minlength=(n_labels + 1) ** 2).reshape(n_labels + 1, n_labels + 1)
    del joint
    tp_all = np.diag(counts)[1:]
    n_pred_all = counts.sum(axis=1)[1:]
    n_ref_all = counts.sum(axis=0)[1:]
    boxes_pred = ndimage.find_objects(ids_pred, max_label=n_labels)
    boxes_ref = ndimage.find_objects(ids_ref, max_label=n_labels)
    voxel_mm3 = float(np.prod(spacing))
    total = int(pred.size)

    rows = []
    for k, (value, name) in enumerate(zip(labels, names)):
        tp, n_pred, n_ref = int(tp_all[k]), int(n_pred_all[k]), int(n_ref_all[k])
        fp, fn = n_pred - tp, n_ref - tp
        tn = total - tp - fp - fn
        hd, asd = NAN, NAN
        if n_pred and n_ref:
            box = _padded_box(_union_slices(boxes_pred[k], boxes_ref[k]), pred.shape)
            d_pr, d_rp = _box_distances(ids_pred[box] == k + 1, ids_ref[box] == k + 1, spacing)
            hd = hd95_from_distances(d_pr, d_rp, mode=hd95_mode)
            asd = assd_from_distances(d_pr, d_rp)
        rows.append({
            "label": value,
            "name": name,
            "dice": dice(tp, fp, fn),
            "hd95_mm": hd,
            "assd_mm": asd,
            "volumetric_similarity": volumetric_similarity(tp, fp, fn),
            "f2": f_beta(tp, fp, fn, 2.0),
            "balanced_accuracy": balanced_accuracy(tp, fp, fn, tn),
            "volume_pred_mm3": n_pred * voxel_mm3,
            "volume_ref_mm3": n_ref * voxel_mm3,
        })
    log.debug("metrics of %d structures on a %s image", n_labels, pred.shape)
    return rows


def _label_ids(image: np.ndarray, labels: list[int]) -> np.ndarray:
    """Label values -> 1..len(labels) in the order of ``labels``; every other value -> 0."""
    if image.dtype == bool:
        image = image.astype(np.uint8)
    elif image.size and not np.issubdtype(image.dtype, np.integer):
        rounded = np.rint(image)
        if not np.array_equal(rounded, image):
            raise ValueError("label image has non-integer values")
        image = rounded.astype(np.int64)
    lo = min(int(image.min()) if image.size else 0, min(labels))
    hi = max(int(image.max()) if image.size else 0, max(labels))
    dtype = np.uint16 if len(labels) < 65535 else np.int32
    lut = np.zeros(hi - lo + 1, dtype=dtype)
    lut[np.asarray(labels) - lo] = np.arange(1, len(labels) + 1)
    return lut[image.astype(np.int64) - lo] if lo else lut[image]


# --------------------------------------------------------------------------------------------
# agreement across subjects and summaries
# --------------------------------------------------------------------------------------------

def _finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} values against {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def concordance_correlation(x, y) -> float:
    """Lin's concordance correlation coefficient with population (ddof=0) moments.

    ``2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))²)``; pairs with a NaN are dropped.
    NaN with fewer than two pairs or when the denominator is 0.
    """
    x, y = _finite_pairs(x, y)
    if x.size < 2:
        return NAN
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    den = x.var() + y.var() + (mx - my) ** 2
    return NAN if den == 0 else float(2.0 * cov / den)


def pearson(x, y) -> float:
    """Pearson correlation; pairs with a NaN are dropped; NaN with < 2 pairs or a constant series."""
    x, y = _finite_pairs(x, y)
    if x.size < 2:
        return NAN
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return NAN if den == 0 else float(np.sum(dx * dy) / den)


def summarise(rows: Iterable[Mapping] | Iterable[float], key: str | None = "dice") -> dict:
    """``{"mean", "sd", "n"}`` of ``row[key]`` over ``rows`` ignoring NaN (sample SD, ddof=1).

    ``rows`` may also be plain numbers with ``key=None``. Mean is NaN when no value is finite,
    SD when fewer than two are.
    """
    values = np.array([float(r if key is None else r[key]) for r in rows], dtype=float)
    values = values[np.isfinite(values)]
    n = int(values.size)
    mean = float(values.mean()) if n else NAN
    sd = float(values.std(ddof=1)) if n >= 2 else NAN
    return {"mean": mean, "sd": sd, "n": n}
