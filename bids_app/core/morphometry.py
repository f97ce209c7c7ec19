"""Structure volumes from a label image: the ``_morph.tsv`` tables of the segmentation branch.

One row per structure of a protocol (background left out), in the protocol's order:

==========================  ==============================================================
column                      meaning
==========================  ==============================================================
``index``                   label value in the ``dseg`` image
``name``                    structure name (the protocol's ``dseg.tsv``)
``volume_mm3``              voxel count x voxel volume
``volume_icv_fraction``     ``volume_mm3 / (ICV in mL x 1000)``
``asymmetry_index``         ``(L - R) / ((L + R) / 2)`` of the structure's left/right pair, the
                            same value on both rows of the pair; ``n/a`` for midline structures
                            and for pairs that are both empty
``mc_cv_percent``           coefficient of variation (%) of the volume over the MC-dropout
                            samples; ``n/a`` when unknown or absent from every sample
``qc_flag``                 ``pass``/``warn`` of the structure (``n/a`` when unknown)
==========================  ==============================================================
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .labels import Protocol, asymmetry_index, lateral_pairs

#: column order of a ``_morph.tsv``
MORPH_COLUMNS = ("index", "name", "volume_mm3", "volume_icv_fraction", "asymmetry_index", "mc_cv_percent",
                 "qc_flag")
#: descriptions of the columns (the JSON sidecar of a ``_morph.tsv``)
MORPH_COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "index": {"Description": "Label value of the structure in the dseg image"},
    "name": {"Description": "Structure name (see the dseg.tsv of the protocol)"},
    "volume_mm3": {"Description": "Volume of the structure", "Units": "mm^3"},
    "volume_icv_fraction": {"Description": "Volume divided by the intracranial volume", "Units": "fraction"},
    "asymmetry_index": {"Description": "(left - right) / ((left + right) / 2) of the left/right pair; n/a for "
                                       "midline structures"},
    "mc_cv_percent": {"Description": "Coefficient of variation of the volume over the Monte-Carlo dropout "
                                     "samples", "Units": "%"},
    "qc_flag": {"Description": "pass: mc_cv_percent within the QC threshold; warn: above it or the structure is "
                               "absent from every sample"},
}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def morphometry_rows(
    labels: np.ndarray,
    voxel_size_mm: float | Sequence[float],
    icv_ml: float | None,
    protocol: Protocol,
    cv_percent: Sequence[float] | None = None,
    qc_flags: Sequence[str] | None = None,
) -> list[dict]:
    """One dict per non-background class of ``protocol`` with the :data:`MORPH_COLUMNS`.

    ``labels`` holds label values of ``protocol`` (values outside it raise
    :class:`~bids_app.core.labels.ProtocolError`); ``voxel_size_mm`` is one or three sizes;
    ``cv_percent`` and ``qc_flags`` are per class position (``None``: unknown, written ``n/a``).
    Missing values are ``None``.
    """
    vox = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    voxel_volume = float(np.prod(vox))
    classes = protocol.to_classes(labels)
    counts = np.bincount(classes.ravel().astype(np.int64), minlength=len(protocol))[: len(protocol)]
    volumes = counts.astype(np.float64) * voxel_volume
    icv_mm3 = None if icv_ml is None or not float(icv_ml) > 0 else float(icv_ml) * 1000.0
    ai: dict[int, float | None] = {}
    for left, right, _ in lateral_pairs(protocol):
        value = _finite(asymmetry_index(volumes[left], volumes[right]))
        ai[left] = ai[right] = value
    if cv_percent is not None and len(cv_percent) != len(protocol):
        raise ValueError(f"{len(cv_percent)} CV values for {len(protocol)} classes of {protocol.name}")
    if qc_flags is not None and len(qc_flags) != len(protocol):
        raise ValueError(f"{len(qc_flags)} QC flags for {len(protocol)} classes of {protocol.name}")
    rows = []
    for k, (index, name) in enumerate(zip(protocol.indices, protocol.names)):
        if k == 0 and index == 0:
            continue  # background
        rows.append({
            "index": int(index),
            "name": name,
            "volume_mm3": float(volumes[k]),
            "volume_icv_fraction": None if icv_mm3 is None else float(volumes[k] / icv_mm3),
            "asymmetry_index": ai.get(k),
            "mc_cv_percent": None if cv_percent is None else _finite(cv_percent[k]),
            "qc_flag": None if qc_flags is None else str(qc_flags[k]),
        })
    return rows


def _format(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if column == "volume_mm3":
        return f"{float(value):.3f}".rstrip("0").rstrip(".")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def morphometry_tsv(rows: Sequence[dict]) -> str:
    """The text of a ``_morph.tsv`` (tab-separated, ``n/a`` for missing values)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(MORPH_COLUMNS)
    for row in rows:
        writer.writerow([_format(c, row.get(c)) for c in MORPH_COLUMNS])
    return buf.getvalue()


def write_morphometry_tsv(rows: Sequence[dict], path: str | Path) -> str:
    """Write :func:`morphometry_tsv` atomically; returns the path."""
    from ..bids import atomic_write_text

    atomic_write_text(Path(path), morphometry_tsv(rows))
    return str(path)


def read_morphometry_tsv(path: str | Path) -> list[dict]:
    """Rows of a ``_morph.tsv`` with numbers as floats/ints and ``n/a`` as ``None``."""
    with open(path, newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle, delimiter="\t"))
    rows = []
    for r in raw:
        row: dict[str, Any] = {}
        for key, value in r.items():
            if value in (None, "", "n/a"):
                row[key] = None
            elif key == "index":
                row[key] = int(value)
            elif key in ("name", "qc_flag"):
                row[key] = value
            else:
                row[key] = _finite(value)
        rows.append(row)
    return rows
