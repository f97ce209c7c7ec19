"""Structure volumes and their TSV (bids_app.core.morphometry), checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core.labels import ProtocolError, load_protocol
from bids_app.core.morphometry import (
    MORPH_COLUMNS,
    morphometry_rows,
    morphometry_tsv,
    read_morphometry_tsv,
    write_morphometry_tsv,
)


def _labels() -> np.ndarray:
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels.flat[:10] = 17     # Left-Hippocampus: 10 voxels
    labels.flat[10:16] = 53   # Right-Hippocampus: 6 voxels
    labels.flat[16:20] = 16   # Brain-Stem: 4 voxels
    return labels


def test_volumes_fractions_and_asymmetry():
    aseg = load_protocol("aseg")
    cv = np.full(len(aseg), np.nan)
    cv[aseg.position(17)], cv[aseg.position(53)], cv[aseg.position(16)] = 0.5, 2.0, 0.1
    flags = ["pass" if c <= 1.0 else "warn" for c in cv]
    rows = morphometry_rows(_labels(), (1.0, 1.0, 2.0), 1.0, aseg, cv_percent=cv, qc_flags=flags)
    assert len(rows) == len(aseg) - 1  # background left out
    assert [r["index"] for r in rows] == list(aseg.indices[1:])
    by = {r["name"]: r for r in rows}
    lh, rh, bs = by["Left-Hippocampus"], by["Right-Hippocampus"], by["Brain-Stem"]
    assert (lh["volume_mm3"], rh["volume_mm3"], bs["volume_mm3"]) == (20.0, 12.0, 8.0)
    assert lh["volume_icv_fraction"] == pytest.approx(0.02) and bs["volume_icv_fraction"] == pytest.approx(0.008)
    assert lh["asymmetry_index"] == rh["asymmetry_index"] == pytest.approx((20 - 12) / 16)
    assert bs["asymmetry_index"] is None                     # midline
    assert by["Left-Putamen"]["asymmetry_index"] is None     # both sides empty
    assert by["Left-Putamen"]["volume_mm3"] == 0.0
    assert (lh["mc_cv_percent"], lh["qc_flag"]) == (0.5, "pass")
    assert (rh["mc_cv_percent"], rh["qc_flag"]) == (2.0, "warn")
    assert by["Left-Putamen"]["mc_cv_percent"] is None and by["Left-Putamen"]["qc_flag"] == "warn"


def test_without_icv_cv_and_flags():
    rows = morphometry_rows(_labels(), 1.0, None, load_protocol("aseg"))
    assert all(r["volume_icv_fraction"] is None and r["mc_cv_percent"] is None and r["qc_flag"] is None
               for r in rows)
    assert sum(r["volume_mm3"] for r in rows) == 20.0


def test_unknown_labels_and_bad_lengths():
    aseg = load_protocol("aseg")
    labels = _labels()
    labels[0, 0, 0] = 1000
    with pytest.raises(ProtocolError, match="1000"):
        morphometry_rows(labels, 1.0, 1.0, aseg)
    with pytest.raises(ValueError, match="CV values"):
        morphometry_rows(_labels(), 1.0, 1.0, aseg, cv_percent=[1.0, 2.0])


def test_tsv_roundtrip(tmp_path):
    aseg = load_protocol("aseg")
    rows = morphometry_rows(_labels(), 0.5, 1.5, aseg, cv_percent=np.linspace(0, 3, len(aseg)),
                            qc_flags=["pass"] * len(aseg))
    text = morphometry_tsv(rows)
    lines = text.splitlines()
    assert lines[0].split("\t") == list(MORPH_COLUMNS)
    assert len(lines) == len(rows) + 1
    assert "n/a" in text and "nan" not in text.lower()
    path = write_morphometry_tsv(rows, tmp_path / "sub-01_seg-wholebrain_morph.tsv")
    back = read_morphometry_tsv(path)
    assert [r["name"] for r in back] == [r["name"] for r in rows]
    for a, b in zip(back, rows):
        assert a["index"] == b["index"] and a["qc_flag"] == b["qc_flag"]
        assert a["volume_mm3"] == pytest.approx(b["volume_mm3"])
        for key in ("volume_icv_fraction", "asymmetry_index", "mc_cv_percent"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
