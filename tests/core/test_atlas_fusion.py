"""Tests of the atlas prior (bids_app.core.atlas_fusion) and the library reader (bids_app.atlas_library)."""

from __future__ import annotations

import json
import tempfile

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_app import atlas_library as al
from bids_app.core import atlas_fusion as af
from bids_app.core.images import new_image
from bids_app.core.labels import load_protocol
from bids_app.errors import InputFileError

SHAPE = (24, 24, 24)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
LOBULES = load_protocol("lobules").indices


def _dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    values = [v for v in np.unique(b) if v != 0]
    return float(np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in values]))


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory):
    return al.write_synthetic_library(tmp_path_factory.mktemp("library"), subjects=3, shape=SHAPE, affine=AFFINE)


@pytest.fixture(scope="module")
def library(library_dir):
    return al.read_library(library_dir)


@pytest.fixture(scope="module")
def target():
    return al.synthetic_case(SHAPE, seed=77)


# --------------------------------------------------------------------------- fusion
def test_fuse_weighted_matches_hand_computation():
    # two voxels, three atlases; intensities on the pipeline's scale (p99 = 1), d = 0.5, scale = 100
    target = np.array([0.5, 0.8], np.float32).reshape(1, 1, 2)
    images = [np.array(v, np.float32).reshape(1, 1, 2) for v in ([0.5, 0.5], [0.6, 0.8], [0.4, 1.0])]
    labels = [np.array(v, np.int16).reshape(1, 1, 2) for v in ([0, 1], [1, 0], [1, 2])]
    probs = af.fuse_weighted(target, images, labels, [0, 1, 2])
    assert probs.shape == (3, 1, 1, 2) and probs.dtype == np.float32
    # voxel 0: |diff| * 100 = 0, 10, 10 -> w = 1, 1/6, 1/6; labels 0, 1, 1
    w = np.array([1, 1 / 6, 1 / 6])
    np.testing.assert_allclose(probs[:, 0, 0, 0], [w[0] / w.sum(), (w[1] + w[2]) / w.sum(), 0], rtol=1e-6)
    # voxel 1: |diff| * 100 = 30, 0, 20 -> w = 1/16, 1, 1/11; labels 1, 0, 2
    w = np.array([1 / 16, 1, 1 / 11])
    np.testing.assert_allclose(probs[:, 0, 0, 1], [w[1] / w.sum(), w[0] / w.sum(), w[2] / w.sum()], rtol=1e-6)
    # d = 0: a plain majority vote
    vote = af.fuse_weighted(target, images, labels, [0, 1, 2], d=0.0)
    np.testing.assert_allclose(vote[:, 0, 0, 0], [1 / 3, 2 / 3, 0], rtol=1e-6)


def test_fuse_weighted_equals_naive_and_sums_to_one():
    rng = np.random.default_rng(0)
    shape = (7, 6, 5)
    target = rng.uniform(0, 1.2, shape).astype(np.float32)
    images = rng.uniform(0, 1.2, (4,) + shape).astype(np.float32)
    values = [0, 3, 101, 113]
    labels = rng.choice(values, (4,) + shape).astype(np.int16)
    probs = af.fuse_weighted(target, images, labels, values, d=0.5, scale=100.0)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)
    assert probs.min() >= 0
    naive = af.fuse_weighted_naive(target, images, labels, values, d=0.5, scale=100.0)
    np.testing.assert_allclose(probs.reshape(len(values), -1), naive, rtol=1e-5, atol=1e-6)
    # a label outside the fused values is an error, not a silent drop
    labels[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        af.fuse_weighted(target, images, labels, values)


def test_fuse_weighted_intensity_scale_matters():
    """Without the scale (s = 1) d = 0.5 barely weights intensities on the p99 = 1 scale."""
    target = np.full((1, 1, 1), 0.6, np.float32)
    images = [np.full((1, 1, 1), v, np.float32) for v in (0.6, 1.0)]
    labels = [np.zeros((1, 1, 1), np.int16), np.ones((1, 1, 1), np.int16)]
    scaled = af.fuse_weighted(target, images, labels, [0, 1])[:, 0, 0, 0]
    unscaled = af.fuse_weighted(target, images, labels, [0, 1], scale=1.0)[:, 0, 0, 0]
    np.testing.assert_allclose(scaled, [1 / (1 + 1 / 21), (1 / 21) / (1 + 1 / 21)], rtol=1e-6)
    assert unscaled[0] < 0.55 < scaled[0]


# --------------------------------------------------------------------------- selection
def test_select_similar_picks_the_nearest_and_breaks_ties_by_order():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 1, (6, 6, 6)).astype(np.float32)
    offsets = [0.3, 0.05, 0.2, 0.05, 0.1]
    images = np.stack([target + o for o in offsets])
    idx, dist = af.select_similar(target, images, 3)
    assert idx.tolist() == [1, 3, 4]  # 1 and 3 tie: library order
    np.testing.assert_allclose(dist, [0.05, 0.05, 0.1], rtol=1e-5)
    # a sequence (or loaders) works the same; n larger than the library selects all
    idx2, _ = af.select_similar(target, [lambda i=i: images[i] for i in range(5)], 10)
    assert idx2.tolist() == [1, 3, 4, 2, 0]
    # inside a mask only: image 0 differs from the target only outside it
    masked = images.copy()
    mask = np.zeros(target.shape, bool)
    mask[:3] = True
    masked[0] = np.where(mask, target, target + 5)
    idx3, dist3 = af.select_similar(target, masked, 1, mask=mask)
    assert idx3.tolist() == [0] and dist3[0] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        af.select_similar(target, images, 0)


# --------------------------------------------------------------------------- registration
def _warped_pair(image, labels):
    """The moving case: ``image`` shifted by (2, -1, 1) voxels and bent by a smooth field."""
    grid = np.indices(image.shape, dtype=np.float32)
    bend = 1.5 * np.sin(grid[1] / image.shape[1] * np.pi)
    coords = [grid[0] - 2 + bend, grid[1] + 1, grid[2] - 1]
    return (ndi.map_coordinates(image, coords, order=1, mode="nearest"),
            ndi.map_coordinates(labels, coords, order=0, mode="nearest"))


# the phantoms' lobules are 2-3 voxels thick at 24^3: the 1 mm preset is needed there (the default
# registers at 4 mm, made for the real 128x88x88 crop)
@pytest.mark.parametrize("preset, min_gain, min_dice", [
    ("fine", 0.3, 0.75),
    (af.SynPreset((40, 20), grid_mm=1.5), 0.15, 0.5),  # the coarse-grid path of "coarse"/"medium"
])
def test_register_nonlinear_recovers_a_warp_and_cleans_up(target, tmp_path, monkeypatch, preset, min_gain,
                                                          min_dice):
    image, labels = target
    moving, moving_labels = _warped_pair(image, labels)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reg = af.register_nonlinear(new_image(image, AFFINE), new_image(moving, AFFINE),
                                moving_labels=new_image(moving_labels.astype(np.float32), AFFINE), random_seed=3,
                                preset=preset)
    assert list(tmp_path.iterdir()) == []  # ANTs' transforms were read into memory and removed
    assert reg.warped.shape == SHAPE and reg.warped_labels.shape == SHAPE
    np.testing.assert_allclose(reg.warped.affine, AFFINE)
    warped = np.rint(np.asarray(reg.warped_labels.dataobj)).astype(np.int16)
    assert set(np.unique(warped).tolist()) <= set(np.unique(moving_labels).tolist())
    before, after = _dice_mean(moving_labels, labels), _dice_mean(warped, labels)
    assert after > before + min_gain and after > min_dice, (before, after)
    diff_before = np.abs(moving - image).mean()
    diff_after = np.abs(np.asarray(reg.warped.dataobj) - image).mean()
    assert diff_after < 0.75 * diff_before
    # the in-memory transform reproduces the warped image
    again = np.asarray(reg.apply(new_image(moving, AFFINE), interpolation="linear").dataobj)
    np.testing.assert_allclose(again, np.asarray(reg.warped.dataobj), atol=1e-4)


def test_default_preset_registers_at_4mm(target):
    """The default preset on a 2 mm phantom (registered at 4 mm, like the real crop's features)."""
    assert af.SYN_PRESETS[af.DEFAULT_PRESET].grid_mm == 2.0
    image, labels = al.synthetic_case((48, 48, 48), seed=77)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    moving, moving_labels = _warped_pair(image, labels)
    reg = af.register_nonlinear(new_image(image, affine), new_image(moving, affine),
                                moving_labels=new_image(moving_labels.astype(np.float32), affine))
    warped = np.rint(np.asarray(reg.warped_labels.dataobj)).astype(np.int16)
    before, after = _dice_mean(moving_labels, labels), _dice_mean(warped, labels)
    assert after > before + 0.15, (before, after)
    with pytest.raises(ValueError, match="unknown SyN preset"):
        af.register_nonlinear(new_image(image, affine), new_image(moving, affine), preset="nope")


# --------------------------------------------------------------------------- the whole stage
def test_atlas_prior_on_a_library(library, target):
    image, labels = target
    result = af.atlas_prior(new_image(image, AFFINE), library, n=3, preset="fine")
    assert result.probabilities.shape == (len(LOBULES),) + SHAPE
    assert result.label_values == tuple(LOBULES) and result.label_values[0] == 0
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert len(result.selected) == 3 and result.distances == sorted(result.distances)
    assert result.candidates == 6 and result.excluded == []
    assert set(result.timings) >= {"selection", "registration", "warp_labels", "fusion", "total"}
    assert len(result.registration_seconds) == 3
    # the fused prior is a better segmentation than any single unregistered library case
    fused = _dice_mean(result.labels(), labels)
    raw = max(_dice_mean(c.labels, labels) for c in library.cases)
    assert fused > raw + 0.1, (fused, raw)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["selected_cases"] == result.selected and summary["d"] == 0.5


def test_atlas_prior_with_a_t2w(library, target):
    """A target T2w adds a contrast to the vote; the atlases' T2w come from the given synthesis function."""
    image, _ = target
    calls = []

    def synthesise(t1):
        calls.append(t1.shape)
        return np.where(t1 > 0, 1.2 - t1, 0).astype(np.float32)

    t2 = synthesise(image)
    calls.clear()
    with_t2 = af.atlas_prior(new_image(image, AFFINE), library, n=2, target_t2=t2, synthesise_t2=synthesise)
    assert calls == [SHAPE, SHAPE] and with_t2.params["t2"] is True and "atlas_t2" in with_t2.timings
    np.testing.assert_allclose(with_t2.probabilities.sum(0), 1.0, atol=1e-5)
    plain = af.atlas_prior(new_image(image, AFFINE), library, n=2)
    assert plain.params["t2"] is False and plain.selected == with_t2.selected
    with pytest.raises(ValueError, match="synthesise_t2"):
        af.atlas_prior(new_image(image, AFFINE), library, n=1, target_t2=t2)
    with pytest.raises(ValueError, match="shape"):
        af.atlas_prior(new_image(image, AFFINE), library, n=1, target_t2=t2[:4], synthesise_t2=synthesise)


def test_exclude_subjects_drops_mirrored_twins(library):
    case = library.cases[0]
    assert library.cases[1].subject == case.subject and library.cases[1].mirrored
    # the target is a library case itself: without exclusion it picks itself first (distance 0)
    img = new_image(case.image, AFFINE)
    idx, dist = af.select_similar(case.image, [c.image for c in library.cases], 1)
    assert idx.tolist() == [0] and dist[0] == 0
    result = af.atlas_prior(img, library, n=2, exclude_subjects=[case.subject])
    assert case.subject not in result.selected_subjects
    assert result.candidates == 4 and sorted(result.excluded) == sorted([case.case, library.cases[1].case])
    lso = al.leave_subject_out_prior(library, library.cases[1].case, n=1)
    assert case.subject not in lso.selected_subjects
    with pytest.raises(ValueError, match="no library case is left"):
        af.atlas_prior(img, library, n=2, exclude_subjects=[c.subject for c in library.cases])


def test_atlas_prior_refuses_another_grid(library, target):
    with pytest.raises(ValueError, match="grid"):
        af.atlas_prior(new_image(target[0][:20], AFFINE), library, n=1)


# --------------------------------------------------------------------------- library files
def _copy_library(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst, json.loads((dst / "library.json").read_text())


def _write(dst, data):
    (dst / "library.json").write_text(json.dumps(data))


def test_read_library_lazily(library_dir):
    lib = al.read_library(library_dir)
    assert len(lib) == 6 and lib.shape == SHAPE and lib.protocol == "lobules"
    np.testing.assert_allclose(lib.affine, AFFINE)
    assert lib.cases[0]._image is None  # nothing read yet
    assert lib.cases[0].image.dtype == np.float32 and lib.cases[0].labels.dtype == np.int16
    assert lib.cases[1].mirrored and lib.cases[1].subject == lib.cases[0].subject
    eager = al.read_library(library_dir / "library.json", eager=True)
    assert all(c._image is not None and c._labels is not None for c in eager.cases)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other"), "format is 'other'"),
    (lambda d: d.update(format_version=9), "format_version 9"),
    (lambda d: d.update(space="MNI152NLin2009cAsym"), "space"),
    (lambda d: d.update(shape=[24, 24]), "shape must be three"),
    (lambda d: d.update(protocol="aseg"), "protocol is 'aseg'"),
    (lambda d: d.update(cases=[]), "non-empty list"),
    (lambda d: d["cases"][1].update(case=d["cases"][0]["case"]), "listed twice"),
    (lambda d: d["cases"][0].pop("subject"), "'subject'"),
])
def test_read_library_refuses_bad_descriptions(library_dir, tmp_path, edit, match):
    dst, data = _copy_library(library_dir, tmp_path / "lib")
    edit(data)
    _write(dst, data)
    with pytest.raises(al.LibraryError, match=match) as info:
        al.read_library(dst)
    assert str(dst / "library.json") in str(info.value)


def test_read_library_errors_name_the_file(library_dir, tmp_path):
    dst, data = _copy_library(library_dir, tmp_path / "lib")
    # a listed file that is missing
    (dst / data["cases"][2]["dseg"]).unlink()
    with pytest.raises(al.LibraryError, match="does not exist") as info:
        al.read_library(dst)
    assert info.value.path == str(dst / data["cases"][2]["dseg"])
    # an image on another grid
    (dst / data["cases"][2]["dseg"]).write_bytes((library_dir / data["cases"][2]["dseg"]).read_bytes())
    bad = dst / data["cases"][3]["t1w"]
    nb.save(nb.Nifti1Image(np.zeros((24, 24, 20), np.float32), AFFINE), str(bad))
    with pytest.raises(al.LibraryError, match=r"shape \(24, 24, 20\)") as info:
        al.read_library(dst)
    assert info.value.path == str(bad)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5
    nb.save(nb.Nifti1Image(np.zeros(SHAPE, np.float32), shifted), str(bad))
    with pytest.raises(al.LibraryError, match="not on the library grid"):
        al.read_library(dst)
    # label values outside the protocol: found when the labels are loaded
    nb.save(nb.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), str(bad))
    nb.save(nb.Nifti1Image(np.full(SHAPE, 55, np.int16), AFFINE), str(dst / data["cases"][3]["dseg"]))
    lib = al.read_library(dst)
    with pytest.raises(al.LibraryError, match=r"label values \[55\]") as info:
        lib.cases[3].labels
    assert data["cases"][3]["dseg"] in info.value.path
    # no library at all
    with pytest.raises(al.LibraryError, match="no library description"):
        al.read_library(tmp_path)
    (tmp_path / "library.json").write_text("{nope")
    with pytest.raises(al.LibraryError, match="not valid JSON"):
        al.read_library(tmp_path)


def test_atlas_prior_file_writes_nifti_and_json(library_dir, target, tmp_path):
    crop = tmp_path / "crop.nii.gz"
    nb.save(nb.Nifti1Image(target[0], AFFINE), str(crop))
    out, sidecar = al.atlas_prior_file(crop, library_dir, out_file=tmp_path / "out" / "prior.nii.gz", n=2,
                                        preset="fine")
    assert out == str(tmp_path / "out" / "prior.nii.gz") and sidecar == str(tmp_path / "out" / "prior.json")
    img = nb.load(out)
    assert img.shape == SHAPE + (len(LOBULES),) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, AFFINE)
    probs = np.asarray(img.dataobj, dtype=np.float32)  # scaled back to probabilities
    assert probs.max() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=len(LOBULES) / 255)
    meta = json.loads(open(sidecar).read())
    assert meta["n_atlases"] == 2 and len(meta["selected_cases"]) == 2 and len(meta["distances_l1"]) == 2
    assert meta["LibraryCases"] == 6 and meta["Library"] == str(library_dir.resolve())
    assert meta["d"] == 0.5 and meta["LabelProtocol"] == "lobules" and meta["label_values"][0] == 0
    assert {"load", "selection", "registration", "fusion", "write", "total"} <= set(meta["timings_s"])
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # atomic: no leftovers
    # float32 storage keeps the exact probabilities
    out32, _ = al.atlas_prior_file(crop, library_dir, out_file=tmp_path / "p32.nii.gz", n=2, storage="float32",
                                     preset="fine")
    p32 = np.asarray(nb.load(out32).dataobj)
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p32, probs, atol=0.5 / 255 + 1e-6)


def test_atlas_prior_file_refuses_a_crop_on_another_grid(library_dir, target, tmp_path):
    crop = tmp_path / "crop.nii.gz"
    nb.save(nb.Nifti1Image(target[0][:, :, :20], AFFINE), str(crop))
    with pytest.raises(InputFileError, match="differs from the library") as info:
        al.atlas_prior_file(crop, library_dir, out_file=tmp_path / "prior.nii.gz", n=1)
    assert str(crop) in str(info.value) and str(library_dir / "library.json") in str(info.value)
    assert not (tmp_path / "prior.nii.gz").exists()


def test_mirror_labels_swaps_sides():
    labels = np.zeros((4, 1, 1), np.int16)
    labels[0], labels[3] = 5, 113
    np.testing.assert_array_equal(al.mirror_labels(labels)[:, 0, 0], [13, 0, 0, 105])


def test_fuse_weighted_several_contrasts():
    """With two contrasts the weights use the mean absolute difference: a contrast that tells the
    atlases apart decides the vote when the other does not."""
    shape = (4, 4, 4)
    t1 = np.full(shape, 0.5, np.float32)
    target = np.stack([t1, np.full(shape, 0.2, np.float32)])
    atlas_a = np.stack([t1, np.full(shape, 0.2, np.float32)])  # matches in both contrasts
    atlas_b = np.stack([t1, np.full(shape, 0.9, np.float32)])  # differs in the second
    labels = [np.full(shape, 1, np.int16), np.full(shape, 2, np.int16)]
    probs = af.fuse_weighted(target, [atlas_a, atlas_b], labels, [0, 1, 2], channels=True)
    assert probs.shape == (3,) + shape
    assert np.allclose(probs.sum(0), 1.0)
    assert (probs[1] > 0.9).all()
    # T1 alone cannot tell them apart: an even vote
    even = af.fuse_weighted(t1, [t1, t1], labels, [0, 1, 2])
    assert np.allclose(even[1], 0.5)
    with pytest.raises(ValueError, match="differ"):
        af.fuse_weighted(target, [t1, t1], labels, [0, 1, 2], channels=True)
