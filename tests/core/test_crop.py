"""Tests of world-box cropping (bids_app.core.crop)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from bids_app.core.crop import CEREBELLUM_BOX_MM, box_slices, crop_box

MNI_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
MNI_SHAPE = (182, 218, 182)


def _world_range(img) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world coordinates of the voxel centres of an axis-aligned image."""
    last = np.array(img.shape[:3]) - 1
    corners = np.array([[i, j, k] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])
    world = corners @ img.affine[:3, :3].T + img.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _ras_twin(shape, affine):
    """The RAS+ affine of a grid covering the same world voxels as the axis-aligned ``affine``."""
    flip = np.diag(np.sign(np.diag(affine[:3, :3])))
    ras = np.eye(4)
    ras[:3, :3] = affine[:3, :3] @ flip
    last = np.array(shape) - 1
    lo = np.array([[i, j, k] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])
    ras[:3, 3] = (lo @ affine[:3, :3].T + affine[:3, 3]).min(axis=0)
    return ras


def _image(shape, affine):
    """World x+y+z coordinates as data, so that the data themselves tell where a voxel lies."""
    weights = np.array([1.0, 1000.0, 1e6]) @ affine[:3, :3]  # per voxel axis
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    data = weights[0] * i + weights[1] * j + weights[2] * k + np.array([1.0, 1000.0, 1e6]) @ affine[:3, 3]
    return nb.Nifti1Image(data.astype(np.float64), affine)


def test_cerebellum_box_on_mni_grid():
    img = nb.Nifti1Image(np.zeros(MNI_SHAPE, np.uint8), MNI_AFFINE)
    out = crop_box(img)
    assert out.shape == (128, 88, 88)
    lo, hi = _world_range(out)
    np.testing.assert_allclose(lo, [b[0] for b in CEREBELLUM_BOX_MM])  # start included
    np.testing.assert_allclose(hi, [b[1] - 1 for b in CEREBELLUM_BOX_MM])  # stop excluded
    assert nb.aff2axcodes(out.affine) == ("L", "A", "S")  # the grid orientation is kept


@pytest.mark.parametrize(
    "box",
    [CEREBELLUM_BOX_MM, ((-20.0, 30.0), (-50.0, -10.0), (-30.0, 0.0)), ((-20.5, 30.2), (-50.0, -9.7), (-30.0, 0.4))],
)
def test_las_and_ras_grids_select_the_same_world_box(box):
    shape = (140, 160, 120)
    las = np.array([[-1.0, 0, 0, 70], [0, 1, 0, -110], [0, 0, 1, -70], [0, 0, 0, 1]])
    ras = _ras_twin(shape, las)
    assert nb.aff2axcodes(ras) == ("R", "A", "S")
    img_las, img_ras = _image(shape, las), _image(shape, ras)
    out_las, out_ras = crop_box(img_las, box), crop_box(img_ras, box)
    assert out_las.shape == out_ras.shape
    for a, b in zip(_world_range(out_las), _world_range(out_ras)):
        np.testing.assert_allclose(a, b)
    # the same voxels: the LAS crop flipped along x is the RAS crop
    np.testing.assert_array_equal(np.asarray(out_las.dataobj)[::-1], np.asarray(out_ras.dataobj))
    # every selected voxel centre lies in the box
    lo, hi = _world_range(out_ras)
    for axis in range(3):
        assert box[axis][0] - 1e-6 <= lo[axis] and hi[axis] < box[axis][1] + 1e-6


def test_permuted_grid_selects_the_same_world_box():
    shape = (120, 140, 160)  # axes: S, R (flipped: L), A
    pir = np.array([[0, -1.0, 0, 70], [0, 0, 1, -110], [1, 0, 0, -70], [0, 0, 0, 1]])
    ras = np.array([[1.0, 0, 0, 70 - 139], [0, 1, 0, -110], [0, 0, 1, -70], [0, 0, 0, 1]])
    box = ((-20.0, 30.0), (-50.0, -10.0), (-30.0, 0.0))
    out_pir = crop_box(_image(shape, pir), box)
    out_ras = crop_box(_image((140, 160, 120), ras), box)
    for a, b in zip(_world_range(out_pir), _world_range(out_ras)):
        np.testing.assert_allclose(a, b)
    assert sorted(out_pir.shape) == sorted(out_ras.shape)


def test_box_slices_clips_to_grid():
    shape = (50, 50, 50)
    affine = np.eye(4)
    sl = box_slices(affine, shape, ((-10.0, 20.0), (40.0, 80.0), (0.0, 50.0)))
    assert sl == (slice(0, 20), slice(40, 50), slice(0, 50))


def test_box_outside_grid_raises():
    with pytest.raises(ValueError, match="does not intersect"):
        box_slices(np.eye(4), (50, 50, 50), ((100.0, 120.0), (0.0, 10.0), (0.0, 10.0)))
    with pytest.raises(ValueError, match="does not intersect"):
        box_slices(MNI_AFFINE, MNI_SHAPE, ((-64.0, 64.0), (-106.0, -18.0), (120.0, 150.0)))


def test_oblique_grid_raises():
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    with pytest.raises(ValueError, match="oblique"):
        box_slices(oblique, (50, 50, 50), ((0.0, 10.0), (0.0, 10.0), (0.0, 10.0)))
    with pytest.raises(ValueError, match="oblique"):
        crop_box(nb.Nifti1Image(np.zeros((50, 50, 50), np.float32), oblique))
