"""The cerebellum library's ``full`` label maps (format version 2) and the in-place upgrade of a version-1 library.

Version 1 embedded the lobules at 1000 + lobule, on top of the DKT cortical parcels 1002-1035, and blanked
every label >= 1000 (the cortex) of the mirrored copies. Tiny made-up libraries on a grid symmetric about x = 0.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_app.core.lobules import mirror_lr, swap_sides
from bids_app.training import library as lib
from bids_app.training.prepare import prepare_library

SHAPE = (9, 6, 5)
AFFINE = np.array([[1.0, 0, 0, -4.0], [0, 1.0, 0, -60.0], [0, 0, 1.0, -40.0], [0, 0, 0, 1.0]])


def _maps(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1w, lobules (left 1-13 on x < 0, right 101-113 on x > 0) and an aparc+aseg map with cortex 1013/2013."""
    rng = np.random.default_rng(seed)
    full = np.full(SHAPE, 2, np.int32)  # cerebral white matter
    full[:, :2] = 1013  # left lingual cortex...
    full[5:, :2] = 2013  # ...and the right one
    full[:, 5] = 0
    lob = np.zeros(SHAPE, np.int16)
    lob[:4, 3:5, 1:4] = rng.integers(1, 14, size=(4, 2, 3))
    lob[5:, 3:5, 1:4] = rng.integers(101, 114, size=(4, 2, 3))
    full[lob > 0] = 8  # FreeSurfer cerebellar cortex under the lobules
    t1 = rng.uniform(0.2, 1.0, SHAPE).astype(np.float32)
    return t1, lob, full


def _v1_pair(full: np.ndarray, lob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What version 1 wrote: the case's full map, the mirror's lobules and the mirror's full map."""
    def embed(m, lobules):
        out = m.copy()
        out[lobules > 0] = 1000 + lobules[lobules > 0]
        return out

    m_lob = swap_sides(mirror_lr(lob, AFFINE))
    mirrored = mirror_lr(full, AFFINE)
    return embed(full, lob), m_lob, embed(np.where(mirrored >= 1000, 0, mirrored), m_lob)


def _write_v1_library(folder) -> dict:
    folder.mkdir()
    t1, lob, full = _maps()
    v1_full, m_lob, v1_mfull = _v1_pair(full, lob)
    cases = []
    for name, mirrored, arrays in (("oasis-sub-01", False, (t1, lob, v1_full)),
                                   ("oasis-sub-01-mirror", True, (mirror_lr(t1, AFFINE), m_lob, v1_mfull))):
        files = {"t1w": f"{name}_T1w.nii.gz", "dseg": f"{name}_dseg.nii.gz", "full": f"{name}_desc-full_dseg.nii.gz"}
        for key, data in zip(("t1w", "dseg", "full"), arrays):
            dtype = np.float32 if key == "t1w" else np.int16
            nib.save(nib.Nifti1Image(data.astype(dtype), AFFINE), str(folder / files[key]))
        cases.append({"case": name, "subject": "OASIS-TRT-20-1", "mirrored": mirrored, "kind": "real", **files})
    (folder / "library.json").write_text(json.dumps({
        "format": lib.FORMAT, "format_version": 1, "space": "MNI152NLin6Asym", "shape": list(SHAPE),
        "affine": AFFINE.tolist(), "protocol": "lobules", "cases": cases}))
    return {"full": full, "lob": lob, "m_lob": m_lob}


def _full(folder, name) -> np.ndarray:
    return np.asarray(nib.load(str(folder / f"{name}_desc-full_dseg.nii.gz")).dataobj)


def test_embedded_lobules_stay_apart_from_cortical_parcels():
    _, lob, full = _maps()
    out = lib.embed_lobules(full, lob)
    assert lib.FULL_LOBULE_OFFSET > full.max()
    assert set(np.unique(out[lob > 0])) == {lib.FULL_LOBULE_OFFSET + v for v in np.unique(lob[lob > 0])}
    # lingual cortex (1013) and left lobule white matter (13) are different labels now
    assert (out[lob == 0] == full[lob == 0]).all() and 1013 in out and lib.FULL_LOBULE_OFFSET + 13 in out
    assert out.max() <= np.iinfo(np.int16).max


def test_upgrade_rewrites_version_1_as_version_2_builds_it(tmp_path):
    folder = tmp_path / "library"
    truth = _write_v1_library(folder)
    before = _full(folder, "oasis-sub-01-mirror")
    assert not np.isin(before, (1013, 2013)).any()  # the version-1 bug: the mirror lost its cortex
    with pytest.raises(ValueError, match="--upgrade"):
        lib.read_index(folder, need_full_maps=True)

    assert lib.main([str(folder), "--upgrade"]) == 0
    index = json.loads((folder / "library.json").read_text())
    assert index["format_version"] == lib.FORMAT_VERSION and index["upgraded_from"] == 1
    # exactly what building with version 2 gives (build_library: embed_lobules of the map and of its mirror)
    np.testing.assert_array_equal(_full(folder, "oasis-sub-01"), lib.embed_lobules(truth["full"], truth["lob"]))
    mirror = _full(folder, "oasis-sub-01-mirror")
    np.testing.assert_array_equal(mirror, lib.embed_lobules(mirror_lr(truth["full"], AFFINE), truth["m_lob"]))
    assert np.isin(mirror, (1013, 2013)).any()
    # a second run changes nothing; the library now packs for training
    assert lib.main([str(folder), "--upgrade"]) == 0
    np.testing.assert_array_equal(_full(folder, "oasis-sub-01-mirror"), mirror)
    packed = prepare_library(tmp_path / "packed", folder)
    assert [c["kind"] for c in packed["cases"]] == ["real", "labelmap", "real", "labelmap"]


def test_upgrade_refuses_what_it_cannot_upgrade(tmp_path, caplog):
    folder = tmp_path / "library"
    _write_v1_library(folder)
    index = json.loads((folder / "library.json").read_text())
    index["cases"] = index["cases"][1:]  # a mirror without the case it mirrors
    (folder / "library.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no unmirrored case oasis-sub-01"):
        lib.upgrade_library(folder)
    index["format_version"] = 7
    (folder / "library.json").write_text(json.dumps(index))
    assert lib.main([str(folder), "--upgrade"]) == 2
    assert "format_version 7 cannot be upgraded" in caplog.text
    assert lib.main([str(tmp_path / "nowhere"), "--upgrade"]) == 2
    assert "library.json: not found" in caplog.text
