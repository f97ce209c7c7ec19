"""Tests of the procedural head phantom (bids_app.core.phantom)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import __version__
from bids_app.core.phantom import (
    CONTRAST_INTENSITIES,
    LABELS,
    make_head_phantom,
    make_label_phantom,
    render_contrast,
    write_demo_dataset,
)

VS = 3.0  # coarse voxels keep the tests fast
BRAIN = [LABELS[k] for k in ("gm", "wm", "ventricles", "cerebellum_gm", "cerebellum_wm", "brainstem", "deep_gm")]


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_label_phantom(voxel_size=VS, seed=0)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_labels_dtype_grid_and_all_tissues(phantom):
    labels, affine = phantom
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(LABELS.values())
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.allclose(nib.affines.voxel_sizes(affine), VS)
    # the grid covers the MNI head with a margin: x, y and top faces are background
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, -1]):
        assert not face.any()
    lo = affine[:3, 3]
    hi = lo + VS * (np.array(labels.shape) - 1)
    assert np.all(lo[:2] <= [-88 - 5, -120 - 5])
    assert np.all(hi >= [88 + 5, 90 + 5, 100 + 5])
    assert -85 <= lo[2] <= -72  # the field of view cuts the neck below the MNI head


def test_head_and_brain_extents_match_mni(phantom):
    labels, affine = phantom

    def extent(mask):
        ijk = np.argwhere(mask)
        xyz = ijk * VS + affine[:3, 3]
        return xyz.min(axis=0), xyz.max(axis=0)

    lo, hi = extent(labels > 0)
    assert np.allclose(lo[:2], [-88, -120], atol=8) and np.allclose(hi, [88, 90, 100], atol=8)
    lo, hi = extent(np.isin(labels, [LABELS["csf"], *BRAIN]))  # intracranial
    assert np.allclose(lo[:2], [-72, -111], atol=6) and np.allclose(hi, [73, 78, 82], atol=6)


def test_brain_volume_plausible_and_scales(phantom):
    labels, _ = phantom
    volume_ml = np.isin(labels, BRAIN).sum() * VS**3 / 1000
    assert 1000 < volume_ml < 1700
    small, _ = make_label_phantom(voxel_size=VS, seed=0, scale=0.9)
    ratio = np.isin(small, BRAIN).sum() * VS**3 / 1000 / volume_ml
    assert ratio == pytest.approx(0.9**3, rel=0.06)


def test_cerebellum_in_mni_cerebellum_box(phantom):
    labels, affine = phantom
    cerebellum = np.isin(labels, [LABELS["cerebellum_gm"], LABELS["cerebellum_wm"]])
    x, y, z = world_centroid(cerebellum, affine)
    assert y < -40 and z < 0 and abs(x) < 5
    xyz = np.argwhere(cerebellum) * VS + affine[:3, 3]
    assert np.all(xyz.min(axis=0) >= [-55 - 6, -93 - 6, -66 - 6])
    assert np.all(xyz.max(axis=0) <= [56 + 6, -30 + 6, -1 + 6])


def test_anatomy_is_layered_and_folded():
    labels, affine = make_label_phantom(voxel_size=1.5, seed=0)
    # going down the vertical line x=30 mm, y=0 from above the head:
    # background, scalp, skull, csf, then cortex before white matter
    i, j = np.round(np.linalg.solve(affine[:2, :2], np.array([30.0, 0.0]) - affine[:2, 3])).astype(int)
    profile = labels[i, j, ::-1]
    seen = [int(v) for k, v in enumerate(profile) if k == 0 or v != profile[k - 1]]
    order = [seen.index(LABELS[t]) for t in ("scalp", "skull", "csf", "gm", "wm")]
    assert order == sorted(order) and seen[0] == LABELS["background"]
    # the cortex is folded: the grey matter ribbon holds far more voxels than a
    # smooth 3 mm shell around the cerebrum would (~250 mL)
    gm_ml = np.sum(labels == LABELS["gm"]) * 1.5**3 / 1000
    assert gm_ml > 350
    # and there is cerebrospinal fluid inside the cerebral hull (sulci, fissure)
    assert np.sum(labels == LABELS["csf"]) * 1.5**3 / 1000 > 300
    # the tentorium: no cerebral tissue directly touches the cerebellum from above
    cerebellum = np.isin(labels, [LABELS["cerebellum_gm"], LABELS["cerebellum_wm"]])
    cerebral = np.isin(labels, [LABELS["gm"], LABELS["wm"]])
    assert not (cerebellum[:, :, :-1] & cerebral[:, :, 1:]).any()


@pytest.mark.parametrize("noisy", [False, True])
def test_contrast_orderings(phantom, noisy):
    labels, _ = phantom
    kwargs = {} if noisy else {"noise_sigma": 0.0, "bias_amplitude": 0.0}
    t1 = render_contrast(labels, contrast="T1w", voxel_size=VS, **kwargs)
    t2 = render_contrast(labels, contrast="T2w", voxel_size=VS, **kwargs)
    assert t1.dtype == np.float32 and t1.shape == labels.shape
    mean1 = {k: float(t1[labels == LABELS[k]].mean()) for k in ("wm", "gm", "csf")}
    mean2 = {k: float(t2[labels == LABELS[k]].mean()) for k in ("wm", "gm", "csf")}
    margin = 0.05
    assert mean1["wm"] > mean1["gm"] + margin and mean1["gm"] > mean1["csf"] + margin
    assert mean2["csf"] > mean2["gm"] + margin and mean2["gm"] > mean2["wm"] + margin
    # T1w: skull darker than scalp, deep grey matter between cortex and WM
    assert t1[labels == LABELS["skull"]].mean() < 0.5 * t1[labels == LABELS["scalp"]].mean()
    assert mean1["gm"] < t1[labels == LABELS["deep_gm"]].mean() < mean1["wm"]


def test_noise_free_render_reproduces_tissue_intensities():
    labels, _ = make_label_phantom(voxel_size=VS, seed=1)
    img = render_contrast(labels, contrast="T2w", voxel_size=VS, noise_sigma=0.0, bias_amplitude=0.0, pv_fwhm_mm=0.0)
    for name, value in CONTRAST_INTENSITIES["T2w"].items():
        values = img[labels == LABELS[name]]
        if name in ("background",):
            assert np.all(values == 0)
        elif name not in ("scalp", "skull"):  # these have a strong texture on purpose
            assert np.median(values) == pytest.approx(value, rel=0.03)
            assert np.all(np.abs(values / value - 1) < 0.2)


def test_rician_noise_and_bias(phantom):
    labels, _ = phantom
    img = render_contrast(labels, contrast="T1w", voxel_size=VS, noise_sigma=0.03, bias_amplitude=0.0, seed=4)
    assert img.min() >= 0
    sigma = 0.03 * CONTRAST_INTENSITIES["T1w"]["wm"]
    background = img[:, :, -3:]  # above the head: pure Rayleigh noise
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    clean = render_contrast(labels, contrast="T1w", voxel_size=VS, noise_sigma=0.0, bias_amplitude=0.25)
    flat = render_contrast(labels, contrast="T1w", voxel_size=VS, noise_sigma=0.0, bias_amplitude=0.0)
    head = labels > 0
    ratio = clean[head] / flat[head]
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 1.25 + 1e-4
    assert ratio.max() - ratio.min() > 0.2  # a real spatially varying field


def test_same_seed_identical_different_seed_differs():
    a, aff_a = make_label_phantom(voxel_size=4.0, seed=5)
    b, aff_b = make_label_phantom(voxel_size=4.0, seed=5)
    c, _ = make_label_phantom(voxel_size=4.0, seed=6)
    assert np.array_equal(a, b) and np.array_equal(aff_a, aff_b)
    assert not np.array_equal(a, c)
    ra = render_contrast(a, contrast="T1w", voxel_size=4.0, seed=5)
    rb = render_contrast(b, contrast="T1w", voxel_size=4.0, seed=5)
    rc = render_contrast(a, contrast="T1w", voxel_size=4.0, seed=6)
    assert np.array_equal(ra, rb) and not np.array_equal(ra, rc)


def test_anisotropic_voxels():
    labels, affine = make_label_phantom(voxel_size=(3.0, 3.5, 5.0), seed=0)
    assert np.allclose(nib.affines.voxel_sizes(affine), (3.0, 3.5, 5.0))
    iso, iso_affine = make_label_phantom(voxel_size=3.0, seed=0)
    # same field of view (to within a voxel), same anatomy
    extent = np.array(labels.shape) * (3.0, 3.5, 5.0)
    assert np.allclose(extent, np.array(iso.shape) * 3.0, atol=5.0)
    vol = np.isin(labels, BRAIN).sum() * 3.0 * 3.5 * 5.0
    assert vol == pytest.approx(np.isin(iso, BRAIN).sum() * 27.0, rel=0.05)
    img = make_head_phantom(contrast="T2w", voxel_size=(3.0, 3.5, 5.0))
    assert img.header.get_zooms() == pytest.approx((3.0, 3.5, 5.0))
    assert img.shape == labels.shape


def test_pose_parameters_move_the_anatomy(phantom):
    labels, affine = phantom
    cb = [LABELS["cerebellum_gm"], LABELS["cerebellum_wm"]]
    base = world_centroid(np.isin(labels, cb), affine)
    moved, moved_affine = make_label_phantom(voxel_size=VS, seed=0, shift_mm=(12.0, -6.0, 9.0))
    assert world_centroid(np.isin(moved, cb), moved_affine) - base == pytest.approx([12.0, -6.0, 9.0], abs=1.5)
    turned, turned_affine = make_label_phantom(voxel_size=VS, seed=0, rotation_deg=(0.0, 0.0, 90.0))
    expected = np.array([-base[1], base[0], base[2]])  # 90 deg about z: (x, y) -> (-y, x)
    assert world_centroid(np.isin(turned, cb), turned_affine) == pytest.approx(expected, abs=1.5)


def test_invalid_arguments(phantom):
    labels, _ = phantom
    with pytest.raises(ValueError, match="contrast"):
        render_contrast(labels, contrast="FLAIR", voxel_size=VS)
    with pytest.raises(ValueError):
        make_label_phantom(voxel_size=0.0)
    with pytest.raises(ValueError):
        make_label_phantom(voxel_size=(1.0, 2.0))
    with pytest.raises(ValueError):
        make_label_phantom(voxel_size=VS, scale=-1.0)


def test_make_head_phantom_image():
    img = make_head_phantom(contrast="T1w", voxel_size=4.0, seed=2, scale=1.03, rotation_deg=(2.0, -1.0, 3.0))
    data = np.asanyarray(img.dataobj)
    assert isinstance(img, nib.Nifti1Image)
    assert data.dtype == np.float32 and img.get_data_dtype() == np.float32
    assert data.min() >= 0 and data.max() == pytest.approx(1000.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.header.get_zooms() == pytest.approx((4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("demo") / "bids"
    return write_demo_dataset(dest, n_subjects=3, voxel_size=4.0, seed=0)


def test_demo_dataset_is_valid_bids(demo):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(demo, validate=True)
    assert layout.get_subjects() == ["phantom01", "phantom02", "phantom03"]
    for sub in layout.get_subjects():
        for suffix in ("T1w", "T2w"):
            files = layout.get(subject=sub, suffix=suffix, extension=".nii.gz", datatype="anat")
            assert len(files) == 1
            assert files[0].get_metadata()["Manufacturer"] == "ArborSeg phantom"
    description = json.loads((demo / "dataset_description.json").read_text())
    assert description["Name"] == "ArborSeg phantom demo"
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    assert description["GeneratedBy"] == [{"Name": "arborseg-phantom", "Version": __version__}]
    rows = (demo / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["participant_id", "age", "sex"]
    assert [r.split("\t")[0] for r in rows[1:]] == ["sub-phantom01", "sub-phantom02", "sub-phantom03"]
    assert (demo / "README").read_text().strip()


def test_demo_dataset_storage_variants(demo):
    def load(sub: str, suffix: str) -> nib.Nifti1Image:
        return nib.load(demo / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz")

    t1, t2 = load("phantom01", "T1w"), load("phantom01", "T2w")
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S") and t1.get_data_dtype() == np.float32
    assert t1.shape == t2.shape and np.allclose(t1.affine, t2.affine)  # shared anatomy and grid

    las = load("phantom02", "T1w")
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    assert las.get_data_dtype() == np.int16
    data = np.asanyarray(las.dataobj)
    assert data.dtype == np.int16 and 0 <= data.min() and data.max() == 1000
    # reoriented back to RAS it is a head in the MNI position: brighter middle, dark corners
    ras = nib.as_closest_canonical(las)
    centre = np.linalg.solve(ras.affine, [0.0, -20.0, 20.0, 1.0])[:3].round().astype(int)
    assert np.asanyarray(ras.dataobj)[tuple(centre)] > 200
    assert nib.aff2axcodes(load("phantom02", "T2w").affine) == ("L", "A", "S")

    aniso = load("phantom03", "T1w")
    assert aniso.header.get_zooms() == pytest.approx((4.0, 4.0, 10.0))
    assert aniso.get_data_dtype() == np.uint16
    assert load("phantom03", "T2w").header.get_zooms() == pytest.approx((4.0, 4.0, 4.0))
    sidecar = json.loads((demo / "sub-phantom03" / "anat" / "sub-phantom03_T1w.json").read_text())
    assert sidecar["MagneticFieldStrength"] == 3 and sidecar["SliceThickness"] == pytest.approx(10.0)


def test_demo_subjects_differ(demo):
    a = np.asanyarray(nib.load(demo / "sub-phantom01" / "anat" / "sub-phantom01_T2w.nii.gz").dataobj)
    params = [
        json.loads((demo / f"sub-phantom0{i}" / "anat" / f"sub-phantom0{i}_T1w.json").read_text())["PhantomParameters"]
        for i in (1, 2, 3)
    ]
    assert len({p["seed"] for p in params}) == 3
    for p in params:
        assert 0.94 <= p["scale"] <= 1.06
        assert max(abs(r) for r in p["rotation_deg"]) <= 5 and max(abs(s) for s in p["shift_mm"]) <= 5
    assert a.shape != np.asanyarray(
        nib.load(demo / "sub-phantom03" / "anat" / "sub-phantom03_T1w.nii.gz").dataobj
    ).shape


def test_demo_dataset_refuses_non_empty_dest(tmp_path, caplog):
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "something.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(dest)):
        write_demo_dataset(dest, n_subjects=1, voxel_size=6.0)
    with caplog.at_level(logging.INFO, logger="bids_app.core.phantom"):
        out = write_demo_dataset(dest, n_subjects=1, voxel_size=6.0, overwrite=True)
    assert out == dest and (dest / "something.txt").read_text() == "keep me"
    assert (dest / "sub-phantom01" / "anat" / "sub-phantom01_T1w.nii.gz").exists()
    assert any("sub-phantom01" in r.getMessage() for r in caplog.records)
    # an empty existing directory is fine without overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_demo_dataset(empty, n_subjects=1, voxel_size=6.0) == empty
