"""Tests of loading, validating and converting anatomical images (bids_app.core.images)."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nb
import numpy as np
import pytest

from bids_app.core import images
from bids_app.errors import InputFileError

AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def _head(shape=(30, 30, 30), seed=0, dtype=np.float32) -> np.ndarray:
    """A positive, non-constant volume (30 voxels at 2 mm = 60 mm field of view)."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100 + 1).astype(dtype)


def _save(tmp_path, name, data, affine=AFFINE_2MM):
    path = tmp_path / name
    nb.save(nb.Nifti1Image(data, affine), str(path))
    return path


def _rotation(ax, ay, az) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _assert_error(excinfo, path, *words):
    err = excinfo.value
    message = str(err)
    assert str(path) in message
    assert err.path == str(path)
    low = message.lower()
    for word in words:
        assert word.lower() in low, f"{word!r} not in {message!r}"


# --------------------------------------------------------------------------- broken files
def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "does not exist")


def test_directory(tmp_path):
    path = tmp_path / "dir.nii.gz"
    path.mkdir()
    with pytest.raises(InputFileError) as exc:
        images.load_image(path)
    _assert_error(exc, path, "directory")


def test_truncated_gzip(tmp_path):
    # random data do not compress, so half the bytes still hold the whole header
    good = _save(tmp_path, "good.nii.gz", _head())
    raw = good.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputFileError) as exc:
        images.load_image(path)
    _assert_error(exc, path, "truncated")
    # the intact file loads
    assert images.load_image(good).shape == (30, 30, 30)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "not a readable")


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_voxels(tmp_path, value, word):
    data = _head()
    data[3, 4, 5] = value
    data[10, 10, 10] = value
    path = _save(tmp_path, "bad.nii.gz", data)
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, word, "2 voxels")


def test_all_zero(tmp_path):
    path = _save(tmp_path, "zero.nii.gz", np.zeros((30, 30, 30), np.float32))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "zero", "empty")


def test_constant(tmp_path):
    path = _save(tmp_path, "const.nii.gz", np.full((30, 30, 30), 7.5, np.float32))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "same value", "7.5")


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 1)])
def test_2d(tmp_path, shape):
    path = _save(tmp_path, "flat.nii.gz", _head(shape))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "2D", str(shape))


def test_5d_multi_volume(tmp_path):
    path = _save(tmp_path, "five.nii.gz", _head((30, 30, 30, 1, 2)))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "5D", "one 3D volume")


@pytest.mark.parametrize("voxel", [0.01, 20.0])
def test_absurd_voxel_size(tmp_path, voxel):
    path = _save(tmp_path, "vox.nii.gz", _head(), np.diag([voxel, voxel, voxel, 1.0]))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "voxel size", "outside")


def test_too_small_field_of_view(tmp_path):
    # 1 mm voxels, 30 voxels: 30 mm is not a head
    path = _save(tmp_path, "small.nii.gz", _head(), np.eye(4))
    with pytest.raises(InputFileError) as exc:
        images.load_anatomical(path)
    _assert_error(exc, path, "field of view", "too small")


def test_singular_affine(tmp_path):
    # nibabel refuses to write such a header, so validate an in-memory image-like object
    path = tmp_path / "singular.nii.gz"
    img = SimpleNamespace(dataobj=_head(), affine=np.diag([2.0, 2.0, 0.0, 1.0]))
    with pytest.raises(InputFileError) as exc:
        images.validate_anatomical(img, path)
    _assert_error(exc, path, "orientation matrix")


# --------------------------------------------------------------------------- accepted images
def test_valid_image_roundtrip(tmp_path):
    data = _head()
    path = _save(tmp_path, "ok.nii.gz", data)
    img, warnings = images.load_anatomical(path)
    assert warnings == []
    assert img.shape == (30, 30, 30)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, AFFINE_2MM)


def test_4d_uses_first_volume_with_warning(tmp_path):
    data = _head((30, 30, 30, 3))
    data[..., 1] += 1000  # volumes differ, so using the wrong one is visible
    data[..., 2] += 2000
    path = _save(tmp_path, "multi.nii.gz", data)
    img, warnings = images.load_anatomical(path)
    assert img.shape == (30, 30, 30)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., 0])
    assert len(warnings) == 1
    assert "first volume" in warnings[0]
    assert "multi.nii.gz" in warnings[0] and "3 volumes" in warnings[0]


def test_singleton_fourth_axis_is_silent(tmp_path):
    data = _head((30, 30, 30, 1))
    path = _save(tmp_path, "single.nii.gz", data)
    img, warnings = images.load_anatomical(path)
    assert warnings == []
    assert img.shape == (30, 30, 30)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., 0])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint16])
def test_integer_types_become_float32(tmp_path, dtype):
    data = (np.random.default_rng(5).integers(0, 200, (30, 30, 30))).astype(dtype)
    path = _save(tmp_path, f"int_{np.dtype(dtype).name}.nii.gz", data)
    img, warnings = images.load_anatomical(path)
    out = np.asarray(img.dataobj)
    assert out.dtype == np.float32
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out, data.astype(np.float32))


def test_soft_voxel_range_warns(tmp_path):
    path = _save(tmp_path, "coarse.nii.gz", _head(), np.diag([7.0, 7.0, 7.0, 1.0]))
    img, warnings = images.load_anatomical(path)
    assert img.shape == (30, 30, 30)
    assert any("tested range" in w for w in warnings)


def test_negative_intensities_are_kept_with_warning(tmp_path):
    data = _head() - 50
    path = _save(tmp_path, "neg.nii.gz", data)
    img, warnings = images.load_anatomical(path)
    assert float(np.asarray(img.dataobj).min()) == pytest.approx(float(data.min()))
    assert any("negative" in w for w in warnings)


# --------------------------------------------------------------------------- ANTs bridge
def _oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.2, -0.35, 0.5) @ np.diag([0.9, 1.2, 3.0])
    affine[:3, 3] = [-12.3, 45.6, -7.8]
    return affine


@pytest.mark.parametrize(
    "affine",
    [
        np.array([[1.0, 0, 0, -20], [0, 1, 0, -30], [0, 0, 1, -10], [0, 0, 0, 1]]),  # RAS
        np.array([[-1.0, 0, 0, 20], [0, 1, 0, -30], [0, 0, 1, -10], [0, 0, 0, 1]]),  # LAS
        np.array([[0, 0, -1.5, 30], [-0.8, 0, 0, 12], [0, 2.5, 0, -40], [0, 0, 0, 1]]),  # permuted (PIR-like)
        np.diag([0.7, 1.1, 3.0, 1.0]),  # anisotropic
        _oblique_affine(),  # oblique, anisotropic
    ],
    ids=["RAS", "LAS", "permuted", "anisotropic", "oblique"],
)
def test_ants_roundtrip_keeps_affine_and_data(affine):
    data = _head((12, 14, 9), seed=7)
    img = nb.Nifti1Image(data, affine)
    aimg = images.to_ants(img)
    assert aimg.shape == data.shape
    np.testing.assert_allclose(aimg.spacing, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), atol=1e-6)
    back = images.from_ants(aimg)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


def test_to_ants_uses_lps_world():
    """A voxel's physical point in ANTs (LPS) is its nibabel (RAS) world point with x, y negated."""
    affine = _oblique_affine()
    aimg = images.to_ants(nb.Nifti1Image(_head((12, 14, 9)), affine))
    ijk = np.array([3, 5, 7])
    ras = affine[:3, :3] @ ijk + affine[:3, 3]
    lps = np.asarray(aimg.origin) + np.asarray(aimg.direction).reshape(3, 3) @ (ijk * np.asarray(aimg.spacing))
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-5)


def test_from_ants_dtype():
    aimg = images.to_ants(nb.Nifti1Image(_head((10, 10, 10)), AFFINE_2MM))
    out = images.from_ants(aimg, dtype=np.float64)
    assert np.asarray(out.dataobj).dtype == np.float64
    assert out.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize(
    "affine, code",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]), "RAS"),
        (np.diag([-1.0, 1.0, 1.0, 1.0]), "LAS"),
        (np.diag([-1.0, -1.0, 1.0, 1.0]), "LPS"),
        (np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]), "PSL"),
    ],
)
def test_describe_image(tmp_path, affine, code):
    affine = affine.copy()
    affine[:3, :3] *= 1.5
    path = tmp_path / "img.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine), str(path))
    desc = images.describe_image(path)
    assert desc["orientation"] == code
    assert desc["shape"] == [4, 5, 6]
    assert desc["voxel_size"] == [1.5, 1.5, 1.5]
    assert desc["datatype"] == "int16"


def test_like_and_zooms():
    img = nb.Nifti1Image(_head((8, 8, 8)), np.diag([-0.5, 2.0, 3.0, 1.0]))
    new = images.like(img, np.ones((8, 8, 8)), dtype=np.uint8)
    np.testing.assert_array_equal(new.affine, img.affine)
    assert np.asarray(new.dataobj).dtype == np.uint8
    np.testing.assert_allclose(images.zooms_of(img), [0.5, 2.0, 3.0])
