"""Tests of conforming to an axis-aligned RAS+ isotropic grid (bids_app.core.conform)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from bids_app.core import conform

CENTRE = np.array([2.0, -3.0, 5.0])  # head centre (world mm)
BLOB = np.array([12.0, -14.0, 17.0])  # bright blob (world mm), inside the head
RADIUS = 32.0


def _world(shape, affine) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def _phantom(shape, affine) -> np.ndarray:
    """A smooth sphere (100) with a bright Gaussian blob (peak +300) sampled on any grid."""
    w = _world(shape, affine)
    r = np.linalg.norm(w - CENTRE, axis=-1)
    head = 100.0 / (1.0 + np.exp((r - RADIUS) / 1.5))
    blob = 300.0 * np.exp(-np.sum((w - BLOB) ** 2, axis=-1) / (2 * 4.0**2))
    return (head + blob).astype(np.float32)


def _grid(zooms, signs, fov=96.0):
    zooms = np.asarray(zooms, float)
    shape = tuple(int(round(fov / z)) for z in zooms)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(signs) * zooms)
    # centre the field of view on CENTRE whatever the axis signs
    affine[:3, 3] = CENTRE - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, affine


def _blob_world(img) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=float)
    sel = data > 0.5 * (data.max() + 100.0)  # the top of the blob only
    ijk = np.argwhere(sel)
    weights = data[sel] - 100.0
    centre = (ijk * weights[:, None]).sum(axis=0) / weights.sum()
    return img.affine[:3, :3] @ centre + img.affine[:3, 3]


@pytest.mark.parametrize(
    "zooms, signs, voxel_size",
    [((2.0, 2.0, 2.0), (-1, 1, 1), 2.0), ((1.0, 1.0, 3.0), (1, 1, 1), 1.0), ((1.0, 1.0, 3.0), (-1, -1, 1), 1.5)],
    ids=["LAS-2mm", "anisotropic-1x1x3", "LPS-anisotropic"],
)
def test_conform_gives_ras_isotropic_and_keeps_world_position(zooms, signs, voxel_size):
    shape, affine = _grid(zooms, signs)
    img = nb.Nifti1Image(_phantom(shape, affine), affine)
    assert nb.aff2axcodes(affine) != ("R", "A", "S") or zooms[2] != zooms[0]
    # sanity: the blob is where it should be in the input
    assert np.linalg.norm(_blob_world(img) - BLOB) < max(zooms)

    out = conform.conform(img, voxel_size=voxel_size, crop_margin_mm=10.0)
    assert nb.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.affine[:3, :3], np.diag([voxel_size] * 3), atol=1e-6)
    np.testing.assert_allclose(out.header.get_zooms()[:3], [voxel_size] * 3, atol=1e-6)
    assert np.asarray(out.dataobj).dtype == np.float32
    # the blob is at the same world coordinate (within one voxel)
    assert np.all(np.abs(_blob_world(out) - BLOB) <= voxel_size)
    # and so is the centre of the head
    data = np.asarray(out.dataobj)
    head_centre = np.argwhere(data > 50).mean(axis=0)
    assert np.all(np.abs(out.affine[:3, :3] @ head_centre + out.affine[:3, 3] - CENTRE) <= voxel_size)


def test_values_stay_within_input_range():
    # sharp edges make cubic B-splines overshoot; the result is clipped to the input range
    rng = np.random.default_rng(0)
    data = np.zeros((40, 40, 14), np.float32)
    data[8:32, 8:32, 3:11] = 50
    data[15:25, 15:25, 5:9] = 200
    data += rng.random(data.shape).astype(np.float32) * 5
    affine = np.diag([-1.5, 1.5, 4.0, 1.0])
    out = conform.conform(nb.Nifti1Image(data, affine), voxel_size=1.0, crop_margin_mm=None)
    res = np.asarray(out.dataobj)
    assert res.min() >= data.min()
    assert res.max() <= data.max()
    assert res.max() > 190  # the bright block survived


def test_same_grid_is_copied_exactly():
    shape, affine = _grid((2.0, 2.0, 2.0), (1, 1, 1))
    data = _phantom(shape, affine)
    out = conform.conform(nb.Nifti1Image(data, affine), voxel_size=2.0, crop_margin_mm=None)
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)


def test_conformed_grid_covers_field_of_view():
    shape, affine = _grid((1.0, 1.0, 3.0), (-1, 1, 1))
    out_shape, out_affine = conform.conformed_grid(nb.Nifti1Image(np.zeros(shape, np.float32), affine), 1.0)
    lo = out_affine[:3, 3]
    hi = lo + np.array(out_shape) - 1
    corners = _world(shape, affine).reshape(-1, 3)
    assert np.all(lo <= corners.min(axis=0) + 1e-6)
    assert np.all(hi >= corners.max(axis=0) - 1.0)


def test_crop_margin_crops_air_keeps_head():
    shape, affine = _grid((2.0, 2.0, 2.0), (-1, 1, 1), fov=140.0)  # lots of air around the head
    img = nb.Nifti1Image(_phantom(shape, affine), affine)
    full = conform.conform(img, voxel_size=2.0, crop_margin_mm=None)
    margin = 6.0
    cropped = conform.conform(img, voxel_size=2.0, crop_margin_mm=margin)
    assert all(c < f for c, f in zip(cropped.shape, full.shape))
    # the cropped grid is a sub-block of the full grid with the same voxels
    offset = np.linalg.inv(full.affine) @ cropped.affine[:, 3]
    assert np.allclose(offset[:3], np.round(offset[:3]))
    o = np.round(offset[:3]).astype(int)
    block = np.asarray(full.dataobj)[o[0]:o[0] + cropped.shape[0], o[1]:o[1] + cropped.shape[1],
                                     o[2]:o[2] + cropped.shape[2]]
    np.testing.assert_array_equal(np.asarray(cropped.dataobj), block)
    # all of the head is inside, with the margin: what was cropped away is (almost) air
    full_data = np.asarray(full.dataobj, dtype=float)
    assert block.sum() > 0.999 * full_data.sum()
    head = conform.head_mask(np.asarray(cropped.dataobj), zooms=(2.0,) * 3)
    idx = np.argwhere(head)
    assert np.all(idx.min(axis=0) >= margin / 2.0)
    assert np.all(np.array(cropped.shape) - 1 - idx.max(axis=0) >= margin / 2.0)


def test_head_mask_of_sphere_fills_holes_and_drops_specks():
    n = 48
    c = np.indices((n, n, n)) - (n - 1) / 2
    r = np.sqrt((c**2).sum(axis=0))
    truth = r <= 18
    data = np.where(truth, 100.0, 0.0).astype(np.float32)
    data[r <= 6] = 0.0  # dark hole inside (like a ventricle)
    data[2:4, 2:4, 2:4] = 100.0  # a bright speck in the air
    rng = np.random.default_rng(1)
    data += rng.random(data.shape).astype(np.float32)  # faint air noise, below the threshold
    mask = conform.head_mask(data)
    assert mask.dtype == bool
    assert mask[r <= 6].all()  # hole filled
    assert not mask[2:4, 2:4, 2:4].any()  # speck dropped
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.99


def test_head_mask_of_empty_image():
    assert not conform.head_mask(np.zeros((10, 10, 10))).any()


def test_input_resolution_passes_fine_grids_and_warns_on_thick_slices():
    fine = conform.input_resolution((0.88, 0.88, 0.88), 2.0)
    assert fine["Flag"] == "pass" and fine["Reason"] is None and fine["Anisotropy"] == 1.0
    assert conform.input_resolution((1.0, 1.0, 2.0), 2.0)["Flag"] == "pass"  # as coarse as the models, no coarser
    thick = conform.input_resolution(np.array([0.43, 0.43, 5.5]), 2.0)
    assert thick["Flag"] == "warn" and thick["ThickestMM"] == 5.5 and thick["Anisotropy"] == pytest.approx(12.791)
    assert "5.50 mm along the third voxel axis" in thick["Reason"] and "2.00 mm" in thick["Reason"]
    assert conform.input_resolution((3.0, 1.0, 1.0), 2.0)["Reason"].startswith("voxels are 3.00 mm along the first voxel axis")
    # a 1 mm model grid is stricter
    assert conform.input_resolution((1.0, 1.0, 2.0), 1.0)["Flag"] == "warn"


@pytest.mark.parametrize("zooms", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_input_resolution_rejects_bad_voxel_sizes(zooms):
    with pytest.raises(ValueError, match="voxel sizes"):
        conform.input_resolution(zooms, 2.0)
