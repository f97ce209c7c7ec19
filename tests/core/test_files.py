"""Tests of the file adapters and atomic saving (bids_app.core.files)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from bids_app.core import files, registration

N = 28
VS = 3.0


def _head_data(seed=0, shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A tiny T1w-like head (84 mm field of view): scalp, dark skull, CSF, GM, WM."""
    c = (np.indices((N, N, N)) - (N - 1) / 2) * VS - np.asarray(shift_mm)[:, None, None, None]
    r = np.sqrt(((c / np.array([1.0, 1.1, 0.95])[:, None, None, None]) ** 2).sum(axis=0))
    data = np.zeros((N, N, N), np.float32)
    data[r < 40] = 60
    data[r < 35] = 12
    data[r < 31] = 25
    data[r < 27] = 70
    data[r < 19] = 110
    data[(np.abs(c[0] - 8) < 6) & (np.abs(c[1] + 5) < 9) & (np.abs(c[2] - 4) < 5)] = 140  # asymmetric blob
    rng = np.random.default_rng(seed)
    return np.clip(data + rng.normal(0, 2, data.shape).astype(np.float32), 0, None)


def _affine():
    affine = np.diag([VS, VS, VS, 1.0])
    affine[:3, 3] = -VS * (N - 1) / 2
    return affine


def _write(path, data, affine=None):
    nb.save(nb.Nifti1Image(np.asarray(data), _affine() if affine is None else affine), str(path))
    return path


def _leftovers(folder):
    """Hidden or partial files that an atomic write must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".part" in p.name)


# --------------------------------------------------------------------------- save_atomic
@pytest.mark.parametrize("name, gzipped", [("out.nii.gz", True), ("out.nii", False)])
def test_save_atomic_writes_whole_file(tmp_path, name, gzipped):
    data = _head_data()
    out = tmp_path / "sub" / "dir" / name  # the folder is created
    result = files.save_atomic(nb.Nifti1Image(data, _affine()), out)
    assert result == str(out)
    assert (out.read_bytes()[:2] == b"\x1f\x8b") is gzipped
    np.testing.assert_array_equal(np.asarray(nb.load(str(out)).dataobj), data)
    assert _leftovers(out.parent) == []
    assert [p.name for p in out.parent.iterdir()] == [name]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_save_atomic_never_leaves_partial_file(tmp_path, monkeypatch, exc_type):
    out = tmp_path / "out.nii.gz"
    previous = _head_data(seed=1)
    files.save_atomic(nb.Nifti1Image(previous, _affine()), out)
    before = out.read_bytes()
    seen = []

    def broken_save(img, filename, *args, **kwargs):
        with open(filename, "wb") as fh:  # a partial file appears, then the save dies
            fh.write(b"\x1f\x8b partial")
        seen.append(filename)
        raise exc_type("disk full")

    monkeypatch.setattr(nb, "save", broken_save)
    with pytest.raises(exc_type):
        files.save_atomic(nb.Nifti1Image(_head_data(seed=2), _affine()), out)
    with pytest.raises(exc_type):
        files.save_atomic(nb.Nifti1Image(_head_data(seed=2), _affine()), tmp_path / "new.nii.gz")
    assert len(seen) == 2 and all(str(tmp_path) in str(s) for s in seen)  # the temp file was in the destination
    assert out.read_bytes() == before  # the old file is untouched
    assert not (tmp_path / "new.nii.gz").exists()  # no partial new file
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


# --------------------------------------------------------------------------- adapters
def test_conform_file(tmp_path):
    data = _head_data()
    las = _affine()
    las[0, 0] = -VS
    las[0, 3] = VS * (N - 1) / 2
    in_file = _write(tmp_path / "las.nii.gz", data.astype(np.int16), las)
    out_file = tmp_path / "out" / "conformed.nii.gz"
    out, warnings = files.conform_file(in_file, out_file=out_file, voxel_size=2.0, crop_margin_mm=4.0)
    assert out == str(out_file) and warnings == []
    img = nb.load(out)
    assert nb.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms()[:3], (2.0, 2.0, 2.0))
    assert img.get_data_dtype() == np.float32
    assert _leftovers(out_file.parent) == []


def test_conform_file_reports_warnings_and_errors(tmp_path):
    from bids_app.errors import InputFileError

    four_d = np.stack([_head_data(), _head_data(seed=3)], axis=-1)
    in_file = _write(tmp_path / "multi.nii.gz", four_d)
    out, warnings = files.conform_file(in_file, out_file=tmp_path / "c.nii.gz", voxel_size=3.0, crop_margin_mm=None)
    assert any("first volume" in w for w in warnings)
    bad = _write(tmp_path / "zeros.nii.gz", np.zeros((N, N, N), np.float32))
    with pytest.raises(InputFileError, match="zeros.nii.gz"):
        files.conform_file(bad, out_file=tmp_path / "never.nii.gz")
    assert not (tmp_path / "never.nii.gz").exists()


def test_denoise_file(tmp_path):
    rng = np.random.default_rng(4)
    data = _head_data() + np.abs(rng.normal(0, 8, (N, N, N))).astype(np.float32) * (_head_data() > 30)
    in_file = _write(tmp_path / "noisy.nii.gz", data)
    out = files.denoise_file(in_file, out_file=tmp_path / "den.nii.gz", patch_radius=1, search_radius=1)
    assert out == str(tmp_path / "den.nii.gz")
    res = np.asarray(nb.load(out).dataobj)
    assert res.shape == data.shape
    from bids_app.core.conform import head_mask

    head = head_mask(data, zooms=(VS,) * 3)
    np.testing.assert_array_equal(res[~head], data[~head])  # air untouched
    assert not np.array_equal(res[head], data[head])
    assert _leftovers(tmp_path) == []


def test_n4_file_with_and_without_mask(tmp_path):
    data = _head_data()
    x = np.linspace(0.7, 1.3, N, dtype=np.float32)[:, None, None]
    in_file = _write(tmp_path / "biased.nii.gz", data * x)
    mask = np.zeros((N, N, N), np.uint8)
    mask[6:22, 6:22, 6:22] = 1
    mask_file = _write(tmp_path / "mask.nii.gz", mask)
    for mask_arg, tag in ((None, "head"), (str(mask_file), "mask")):
        out, bias_file = files.n4_file(in_file, out_file=tmp_path / f"n4_{tag}.nii.gz",
                                       bias_file=tmp_path / f"bias_{tag}.nii.gz", mask_file=mask_arg,
                                       shrink_factor=2, iterations=(20, 10))
        assert out == str(tmp_path / f"n4_{tag}.nii.gz") and bias_file == str(tmp_path / f"bias_{tag}.nii.gz")
        field = np.asarray(nb.load(bias_file).dataobj)
        corrected = np.asarray(nb.load(out).dataobj)
        assert field.shape == corrected.shape == data.shape
        # the estimated field follows the applied gradient along x
        profile = field[:, 10:18, 10:18].mean(axis=(1, 2))
        assert profile[20] > profile[8]
    assert _leftovers(tmp_path) == []


def test_register_apply_and_quality_files(tmp_path):
    fixed = _write(tmp_path / "fixed.nii.gz", _head_data())
    moving = _write(tmp_path / "moving.nii.gz", _head_data(seed=5, shift_mm=(6.0, -3.0, 3.0)))
    fwd, inv = files.register_file(moving, fixed, forward_file=tmp_path / "fwd.mat",
                                   inverse_file=tmp_path / "inv.mat", random_seed=3)
    assert (fwd, inv) == (str(tmp_path / "fwd.mat"), str(tmp_path / "inv.mat"))
    tf, ti = registration.read_transform(fwd), registration.read_transform(inv)
    # the inverse file holds the inverse: a point mapped forward then back returns
    for point in ((0.0, 0.0, 0.0), (10.0, -20.0, 5.0)):
        back = ti.apply_to_point(tf.apply_to_point(point))
        np.testing.assert_allclose(back, point, atol=1e-3)
    # the forward transform undoes the shift (LPS: x and y negated)
    np.testing.assert_allclose(tf.apply_to_point((0.0, 0.0, 0.0)), (-6.0, 3.0, 3.0), atol=1.5)

    warped = files.apply_transform_file(moving, fixed, fwd, out_file=tmp_path / "warped.nii.gz")
    mask = np.asarray(nb.load(str(fixed)).dataobj) > 30
    mask_file = _write(tmp_path / "fixed_mask.nii.gz", mask.astype(np.uint8))
    ncc_after = files.registration_quality(warped, fixed, mask_file)
    ncc_before = files.registration_quality(moving, fixed, mask_file)
    assert ncc_after > 0.85 and ncc_after > ncc_before + 0.15  # about 0.91 vs 0.67 (noisy 3 mm images)
    assert nb.load(warped).shape == (N, N, N)

    back = files.apply_transform_file(fixed, moving, fwd, out_file=tmp_path / "back.nii.gz",
                                      interpolation="nearestNeighbor", invert=True)
    assert np.isin(np.asarray(nb.load(back).dataobj), np.asarray(nb.load(str(fixed)).dataobj)).all()
    assert _leftovers(tmp_path) == []


def test_brain_masks_file(tmp_path):
    data = _head_data()
    c = (np.indices((N, N, N)) - (N - 1) / 2) * VS
    r = np.sqrt(((c / np.array([1.0, 1.1, 0.95])[:, None, None, None]) ** 2).sum(axis=0))
    in_file = _write(tmp_path / "t1w.nii.gz", data)
    prior_file = _write(tmp_path / "prior.nii.gz", (r < 31).astype(np.float32))
    icv_file, brain_file, icv_ml, brain_ml = files.brain_masks_file(
        in_file, prior_file, icv_file=tmp_path / "icv.nii.gz", brain_file=tmp_path / "brain.nii.gz")
    icv_img, brain_img = nb.load(icv_file), nb.load(brain_file)
    assert icv_img.get_data_dtype() == np.uint8 and brain_img.get_data_dtype() == np.uint8
    icv, brain = np.asarray(icv_img.dataobj), np.asarray(brain_img.dataobj)
    assert set(np.unique(icv).tolist()) == {0, 1} and set(np.unique(brain).tolist()) == {0, 1}
    assert icv_ml == pytest.approx(icv.sum() * VS**3 / 1000)
    assert brain_ml == pytest.approx(brain.sum() * VS**3 / 1000)
    assert 0 < brain_ml < icv_ml
    np.testing.assert_allclose(icv_img.affine, _affine())
    assert _leftovers(tmp_path) == []


def test_normalise_and_crop_files(tmp_path):
    data = _head_data()
    in_file = _write(tmp_path / "t1w.nii.gz", data)
    mask_file = _write(tmp_path / "mask.nii.gz", (data > 50).astype(np.uint8))
    out = files.normalise_file(in_file, mask_file, out_file=tmp_path / "norm.nii.gz", percentile=90.0)
    norm = np.asarray(nb.load(out).dataobj)
    assert norm.dtype == np.float32
    assert np.percentile(norm[data > 50], 90.0) == pytest.approx(1.0, rel=1e-4)

    box = ((-12.0, 12.0), (-30.0, 0.0), (0.0, 21.0))
    cropped = files.crop_file(in_file, out_file=tmp_path / "crop.nii.gz", box_mm=box)
    img = nb.load(cropped)
    assert img.shape == (8, 10, 7)
    lo = img.affine[:3, 3]
    assert np.all(lo >= [b[0] for b in box])
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nb.load(str(in_file)).dataobj)[10:18, 4:14, 14:21])
    assert _leftovers(tmp_path) == []

