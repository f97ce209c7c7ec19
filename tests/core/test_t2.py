"""The subject's T2w on the cerebellum crop (bids_app.core.t2): rigid registration to the T1w, one resampling
through the T1w -> template transform, masking and normalisation; on a small synthetic head (64^3, 1 mm)."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_app.core import images, registration, t2
from tests.core.test_registration import _head, _rotation

# 1 mm voxels: ANTs' "Rigid" stops at half resolution, and on a 2 mm head that leaves the rotation loose by degrees
N, VS = 64, 1.0
SHIFT = np.array([4.0, -6.0, 3.0])  # mm (RAS): where the T2w's anatomy sits relative to the T1w's
#: T2-like contrast of the head's compartments (scalp dark, CSF-ish brain bright, "white matter" dark...)
T2_CONTRAST = {40: 30.0, 70: 120.0, 110: 60.0, 20: 150.0, 150: 40.0, 90: 100.0}
LPS = np.diag([-1.0, -1.0, 1.0])


def _t2_values(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for t1, value in T2_CONTRAST.items():
        out[v == t1] = value
    return out


def _texture(world: np.ndarray) -> np.ndarray:
    """A smooth pattern fixed to the anatomy (a function of position, so it moves with the head): without it the
    piecewise-constant head is nearly symmetric and mutual information pins its rotation only to a few degrees."""
    rng = np.random.default_rng(7)
    waves = rng.normal(size=(6, 3))
    waves *= (2 * np.pi / rng.uniform(14.0, 24.0, size=6))[:, None] / np.linalg.norm(waves, axis=1, keepdims=True)
    phases = rng.uniform(0, 2 * np.pi, size=6)
    return 1.0 + 0.05 * np.sin(world @ waves.T + phases).sum(axis=1)


def make_head() -> dict:
    """T1w; the T2w of the same head shifted by SHIFT; the true T2w (unshifted); a crop of the T1w's brain; a
    T1w -> "template" affine (a rotation and a shift) and the crop cut through it."""
    affine = np.diag([VS, VS, VS, 1.0])
    affine[:3, 3] = -VS * (N - 1) / 2
    world = np.indices((N, N, N)).reshape(3, -1).T * VS + affine[:3, 3]
    labels = _head(world).reshape(N, N, N)
    texture = _texture(world).reshape(N, N, N)
    t1 = ndi.gaussian_filter(labels * texture, 0.7).astype(np.float32)
    moved = (_t2_values(_head(world - SHIFT)) * _texture(world - SHIFT)).reshape(N, N, N)
    t2w = ndi.gaussian_filter(moved, 0.7).astype(np.float32)
    truth = ndi.gaussian_filter(_t2_values(labels) * texture, 0.7).astype(np.float32)
    crop_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # a coarser crop grid, 12 mm inside the head image's corner
    crop_affine[:3, 3] = affine[:3, 3] + 12.0
    crop_ref = images.new_image(np.zeros((20, 20, 20), np.float32), crop_affine)
    import ants

    forward = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                         matrix=LPS @ _rotation(0.0, 0.0, 12.0) @ LPS, translation=[3.0, 0.0, -2.0])
    brain = images.new_image((t1 * (labels >= 70)).astype(np.float32), affine)
    crop = registration.apply_transform(forward, brain, crop_ref, interpolation="linear")
    crop = images.new_image(np.where(np.asarray(crop.dataobj) > 5.0, np.asarray(crop.dataobj), 0.0), crop_affine)
    expected = registration.apply_transform(forward, images.new_image(truth, affine), crop_ref)
    return {"t1w": images.new_image(t1, affine), "t2w": images.new_image(t2w, affine), "crop": crop,
            "forward": forward, "expected": np.asarray(expected.dataobj)}


@pytest.fixture(scope="module")
def head():
    return make_head()


def _corr(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def test_register_rigid_recovers_the_shift(head):
    rigid = registration.register_rigid(head["t2w"], head["t1w"], random_seed=1)
    summary = t2.rigid_summary(rigid, np.zeros(3))
    np.testing.assert_allclose(summary["TranslationMM"], SHIFT, atol=0.8)
    assert summary["RotationDegrees"] < 1.5


def test_t2w_lands_on_the_crop_masked_and_normalised(head):
    image, rigid, summary = t2.t2w_on_crop(head["t2w"], head["t1w"], head["crop"], head["forward"], random_seed=1)
    crop = head["crop"]
    assert image.shape == crop.shape and np.allclose(image.affine, crop.affine)
    data = np.asarray(image.dataobj)
    brain = np.asarray(crop.dataobj) > 0
    assert data.dtype == np.float32 and (data[~brain] == 0).all() and data.min() >= 0
    assert np.percentile(data[brain], 99) == pytest.approx(1.0, abs=0.02)
    np.testing.assert_allclose(summary["TranslationMM"], SHIFT, atol=0.8)
    # the registered T2w matches the T2w the head would have on the crop; without the registration it does not
    assert _corr(data, head["expected"], brain) > 0.97
    unregistered = registration.apply_transform(head["forward"], head["t2w"], crop)
    assert _corr(np.asarray(unregistered.dataobj), head["expected"], brain) < 0.8
    # the order of the composition matters: rigid after forward would land elsewhere
    import ants

    wrong = registration.apply_transform(ants.compose_ants_transforms([rigid, head["forward"]]), head["t2w"], crop)
    assert _corr(np.asarray(wrong.dataobj), head["expected"], brain) < _corr(data, head["expected"], brain)


def test_file_adapter_writes_image_transform_and_summary(head, tmp_path):
    paths = {}
    for key in ("t1w", "t2w", "crop"):
        paths[key] = tmp_path / f"sub-01_{key}.nii.gz"
        nb.save(head[key], str(paths[key]))
    fwd = registration.write_transform(head["forward"], tmp_path / "fwd.mat")
    out, xfm, summary = t2.t2w_crop_file(paths["t2w"], paths["t1w"], paths["crop"], fwd,
                                         out_file=tmp_path / "out" / "t2.nii.gz", transform_file=tmp_path / "t2.mat",
                                         json_file=tmp_path / "t2.json", random_seed=1)
    img = nb.load(out)
    assert img.shape == head["crop"].shape
    info = json.loads(open(summary).read())
    assert info["source"] == "real" and info["file"] == "sub-01_t2w.nii.gz"
    np.testing.assert_allclose(info["TranslationMM"], SHIFT, atol=0.8)
    rigid = registration.read_transform(xfm)
    np.testing.assert_allclose(t2.rigid_summary(rigid, np.zeros(3))["TranslationMM"], SHIFT, atol=0.8)
    empty = tmp_path / "empty.nii.gz"
    nb.save(images.new_image(np.zeros(head["crop"].shape, np.float32), head["crop"].affine), str(empty))
    with pytest.raises(ValueError, match="crop is empty"):
        t2.t2w_crop_file(paths["t2w"], paths["t1w"], empty, fwd, out_file=tmp_path / "x.nii.gz",
                         transform_file=tmp_path / "x.mat", json_file=tmp_path / "x.json")
