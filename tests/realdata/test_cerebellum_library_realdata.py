"""``arborseg-build-library`` on real data: one OASIS-TRT-20 subject, the five Park 2014 maps.

The fused lobule labels must agree with the subject's manual vermis lobule groups (which the builder
does not use) far better than chance and at least as well as a single propagated atlas, cover the
manual cerebellum exactly, and the mirrored copy must swap the sides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.atlas_library import read_library
from bids_app.core.labels import load_protocol
from bids_app.training.library import main as build_main

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = os.getenv("ARBORSEG_SHARED_DATA")
    if not root or not Path(root, "labeled", "oasis-trt-20").is_dir():
        pytest.fail("set ARBORSEG_SHARED_DATA to ../shared/data to run the real-data layer")
    out = tmp_path_factory.mktemp("library")
    code = build_main([str(out), "--oasis", str(Path(root, "labeled", "oasis-trt-20")),
                       "--park", str(Path(root, "atlases", "cerebellum-park2014")),
                       "--templateflow-home", str(Path(root, "templateflow")), "--subjects", "sub-01"])
    assert code == 0
    return out


def test_library_is_valid_and_agrees_with_the_manual_vermis(library):
    index = json.loads((library / "library.json").read_text())
    assert [c["case"] for c in index["cases"]] == ["oasis-sub-01", "oasis-sub-01-mirror"]
    row = index["vermis_agreement"][0]
    groups = [row["Vermis-I-V"], row["Vermis-VI-VII"], row["Vermis-VIII-X"]]
    assert min(groups) > 0.8, row
    assert np.mean(groups) >= row["single_atlas_mean"], row
    assert row["tissue_dice_mean"] > 0.9, row
    lib = read_library(library)
    assert len(lib.cases) == 2


def test_labels_cover_the_manual_cerebellum_and_mirror_swaps_sides(library):
    protocol = load_protocol("lobules")
    a = np.asarray(nib.load(str(library / "oasis-sub-01_dseg.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(library / "oasis-sub-01-mirror_dseg.nii.gz")).dataobj)
    assert set(np.unique(a)) <= set(protocol.indices)
    assert len(np.unique(a)) == 27  # every lobule of both sides is present
    left = (a > 0) & (a < 100)
    right = a > 100
    # a cerebellum of ~100-170 ml in MNI space, split roughly evenly
    assert 100_000 < (a > 0).sum() < 260_000
    assert 0.8 < left.sum() / right.sum() < 1.25
    # the mirror swaps the sides (one voxel column of the asymmetric crop may fall off the grid)
    assert abs(int(((b > 0) & (b < 100)).sum()) - int(right.sum())) < 0.02 * right.sum()
    t1 = nib.load(str(library / "oasis-sub-01_T1w.nii.gz"))
    assert t1.shape == (128, 88, 88) and np.allclose(np.abs(np.diag(t1.affine))[:3], 1.0)


def test_full_maps_keep_cortex_and_lobules_apart_in_both_copies(library):
    """The ``full`` label maps (synthetic training images): lobules at 10000 + lobule, the cortical parcels
    (1000-2999) of the crop still there in the case and in its mirror."""
    from bids_app.training.library import FULL_LOBULE_OFFSET

    for case in ("oasis-sub-01", "oasis-sub-01-mirror"):
        full = np.asarray(nib.load(str(library / f"{case}_desc-full_dseg.nii.gz")).dataobj)
        lob = np.asarray(nib.load(str(library / f"{case}_dseg.nii.gz")).dataobj)
        np.testing.assert_array_equal(full[lob > 0], FULL_LOBULE_OFFSET + lob[lob > 0])
        outside = full[lob == 0]
        assert (outside < FULL_LOBULE_OFFSET).all()
        cortex = (outside >= 1000) & (outside < 3000)
        assert cortex.sum() > 10_000, (case, int(cortex.sum()))  # occipital and temporal cortex in the crop
