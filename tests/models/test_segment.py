"""Whole-brain segmentation (bids_app.models.segment): grids, ensembles, coarser protocols, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bids_app.models.checkpoint import ModelError
from bids_app.models.segment import (
    DEFAULT_TTA,
    TTA_VIEWS,
    block_mean,
    coarse_cv,
    coarse_labels,
    coarse_probability,
    coarser,
    default_parcellation_models,
    default_wholebrain_models,
    merge_index,
    segment_volume,
    upsample,
    validate_parcellation_checkpoints,
    validate_wholebrain_checkpoints,
    view_samples,
    view_seed,
)
from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint


def _image(shape=(21, 22, 19), seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.4 * s)) ** 2 for g, c, s in zip(grid, centre, shape))
    img = np.where(r < 1, 0.6 + 0.3 * rng.random(shape), 0.0)
    return img.astype(np.float32)


class FixedPattern(nn.Module):
    """Two classes whose probabilities are a known ramp along x of the model grid; keeps its input."""

    n_classes = 2

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        n = x.shape[2]
        ramp = torch.linspace(0.1, 0.9, n, dtype=torch.float32).view(1, 1, n, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.log(torch.cat([1 - ramp, ramp], dim=1))


def _toy_manifest(voxel=2.0, name="fixed"):
    return {"name": name, "voxel_size_mm": voxel, "input_channels": [{"name": "T1w", "normalisation": "p99"}],
            "label_protocol": {"name": "toy2", "labels": [{"index": 0, "name": "background"},
                                                          {"index": 1, "name": "thing"}]}}


def _trilinear_1d(values, k, n_out):
    """Reference: align_corners=False linear interpolation of ``values`` upsampled by ``k``, first ``n_out``."""
    n = len(values)
    out = []
    for o in range(n_out):
        src = min(max((o + 0.5) / k - 0.5, 0.0), n - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        w = src - lo
        out.append((1 - w) * values[lo] + w * values[hi])
    return np.array(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_wholebrain_checkpoint(tmp_path_factory.mktemp("models") / "tiny-aseg")


@pytest.fixture(scope="module")
def result(checkpoint):
    return segment_volume(_image(), [checkpoint], mc_samples=3, seed=1, device="cpu", num_threads=1)


def test_segment_volume_shapes_and_probabilities(result):
    shape = (21, 22, 19)
    assert result.protocol.name == "aseg"
    assert result.probabilities.shape == (33,) + shape and result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert result.labels.shape == shape and result.labels.dtype == np.int16
    assert set(np.unique(result.labels)) <= set(result.protocol.indices)
    np.testing.assert_array_equal(result.labels, result.protocol.to_labels(result.probabilities.argmax(axis=0)))
    assert result.entropy.shape == shape and (result.entropy >= 0).all()
    assert result.entropy.max() <= np.log(33) + 1e-4
    assert result.cv_percent.shape == (33,)
    assert result.qc_flag in ("pass", "warn") and result.qc_threshold == 1.0
    assert result.models == ["tiny-aseg"] and result.mc_volumes_mm3.shape == (3, 33)
    # model-grid volumes: every sample covers the 11 x 11 x 10 grid of 8 mm3 voxels
    np.testing.assert_allclose(result.mc_volumes_mm3.sum(axis=1), 11 * 11 * 10 * 8.0)
    assert {"load_s", "mc_s", "upsample_s", "total_s"} <= set(result.timings)


def test_segment_volume_is_reproducible(checkpoint, result):
    again = segment_volume(_image(), [checkpoint], mc_samples=3, seed=1, device="cpu", num_threads=1)
    np.testing.assert_array_equal(again.probabilities, result.probabilities)
    other = segment_volume(_image(), [checkpoint], mc_samples=3, seed=2, device="cpu", num_threads=1)
    assert not np.array_equal(other.probabilities, result.probabilities)  # other dropout masks


def test_block_mean_and_upsample_geometry():
    x = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    b = block_mean(x, (2, 2, 2))
    assert b.shape == (3, 2, 2)
    assert b[0, 0, 0] == pytest.approx(x[0:2, 0:2, 0:2].mean())
    # the last block along x and z is half padding (zeros)
    assert b[2, 1, 1] == pytest.approx(np.pad(x, ((0, 1), (0, 0), (0, 1)))[4:6, 2:4, 2:4].mean())
    # a field varying along x only: block i's centre is 1 mm voxel 2i + 0.5, edges are held
    values = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    coarse = np.broadcast_to(values[None, :, None, None], (1, 3, 2, 2)).copy()
    up = upsample(coarse, (5, 4, 3), (2, 2, 2))
    assert up.shape == (1, 5, 4, 3)
    np.testing.assert_allclose(up[0, :, 1, 1], [0.2, 0.275, 0.425, 0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(up[0, :, 1, 1], _trilinear_1d(values, 2, 5), atol=1e-6)
    np.testing.assert_array_equal(upsample(coarse, (3, 2, 2), (1, 1, 1)), coarse)


def test_fixed_pattern_gives_the_expected_1mm_result():
    image = _image(shape=(21, 8, 7))
    model = FixedPattern()
    res = segment_volume(image, [model], manifests=[_toy_manifest(2.0)], mc_samples=2, device="cpu", num_threads=1)
    # the model saw the block means of the zero-padded image
    np.testing.assert_allclose(model.seen[0, 0].numpy(), block_mean(image, (2, 2, 2)), rtol=1e-6)
    assert tuple(model.seen.shape[2:]) == (11, 4, 4)
    ramp = np.linspace(0.1, 0.9, 11)
    expected = _trilinear_1d(ramp, 2, 21)
    np.testing.assert_allclose(res.probabilities[1], np.broadcast_to(expected[:, None, None], (21, 8, 7)), atol=1e-5)
    np.testing.assert_allclose(res.probabilities.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(res.labels, (expected > 0.5).astype(np.int16)[:, None, None] * np.ones((21, 8, 7)))
    # entropy: the model-grid entropy upsampled the same way
    h = -(ramp * np.log(ramp) + (1 - ramp) * np.log(1 - ramp))
    np.testing.assert_allclose(res.entropy[:, 3, 3], _trilinear_1d(h, 2, 21), atol=1e-5)
    assert res.protocol.name == "toy2" and res.models == ["fixed"]


def test_non_integer_ratio_and_mixed_voxel_sizes(tmp_path, checkpoint):
    image = _image(shape=(12, 13, 11))
    res = segment_volume(image, [FixedPattern()], manifests=[_toy_manifest(1.5)], mc_samples=1, device="cpu")
    assert res.probabilities.shape == (2, 12, 13, 11)
    np.testing.assert_allclose(res.probabilities.sum(axis=0), 1.0, atol=1e-5)
    # an ensemble of a 2 mm and a 1 mm member: two grids, one 1 mm result
    fine = tiny_wholebrain_checkpoint(tmp_path / "tiny-1mm", voxel_size_mm=1.0, seed=3)
    mixed = segment_volume(image, [checkpoint, fine], mc_samples=2, device="cpu", num_threads=1)
    assert mixed.probabilities.shape == (33, 12, 13, 11)
    np.testing.assert_allclose(mixed.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert mixed.models == ["tiny-aseg", "tiny-1mm"] and len(mixed.model_voxel_sizes_mm) == 2


def test_coarser_protocols(result):
    cer = coarser(result, "cerebrum7")
    assert cer.protocol.name == "cerebrum7" and cer.probabilities.shape == (8,) + result.labels.shape
    np.testing.assert_allclose(cer.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert set(np.unique(cer.labels)) <= set(cer.protocol.indices)
    np.testing.assert_array_equal(coarse_labels(result, "cerebrum7"), cer.labels)
    index = merge_index(result.protocol, cer.protocol)
    gm = cer.protocol.position(1)
    expected = result.probabilities[index == gm].sum(axis=0)
    np.testing.assert_allclose(coarse_probability(result, "cerebrum7", gm), expected, atol=1e-6)
    # the CV merges the sample volumes before the statistics
    merged = np.zeros((3, 8))
    for k, t in enumerate(index):
        merged[:, t] += result.mc_volumes_mm3[:, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.where(merged.mean(0) > 0, 100 * merged.std(0) / merged.mean(0), np.nan)
    np.testing.assert_allclose(cer.cv_percent, cv, equal_nan=True)
    assert coarse_cv(result, "cerebrum7")[1] == pytest.approx(cer.mean_cv_percent, nan_ok=True)
    deep_cv, _, _ = coarse_cv(result, "deep14")
    assert deep_cv.shape == (15,)


def test_default_wholebrain_models(tmp_path, monkeypatch, no_package_models):
    folder = tmp_path / "installed"
    folder.mkdir()
    wb = tiny_wholebrain_checkpoint(folder / "wb")
    tiny_wholebrain_checkpoint(folder / "other", task="cerebellum")
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(folder))
    assert default_wholebrain_models() == [str(wb)]
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "nothing"))
    assert default_wholebrain_models() == []


def test_validate_wholebrain_checkpoints(tmp_path, checkpoint):
    paths, protocol = validate_wholebrain_checkpoints([checkpoint.with_suffix("")])
    assert paths == [checkpoint.resolve()] and protocol == "aseg"
    with pytest.raises(ModelError, match="no such model checkpoint") as exc:
        validate_wholebrain_checkpoints([tmp_path / "missing"])
    assert exc.value.exit_code == 4
    bad = tiny_wholebrain_checkpoint(tmp_path / "bad")
    weights = bad.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match="checksum"):
        validate_wholebrain_checkpoints([bad])
    deep = tiny_wholebrain_checkpoint(tmp_path / "deep", protocol="deep14")
    with pytest.raises(ModelError, match="cannot be merged into 'aseg'"):
        validate_wholebrain_checkpoints([deep])
    dkt = tiny_wholebrain_checkpoint(tmp_path / "dkt", protocol="dkt-aseg")
    with pytest.raises(ModelError, match="label protocol 'dkt-aseg' differs"):
        validate_wholebrain_checkpoints([checkpoint, dkt])
    manifest = json.loads(dkt.read_text())
    assert manifest["task"] == "wholebrain"


def test_image_already_on_the_model_grid(checkpoint):
    image = _image(shape=(11, 12, 9))
    res = segment_volume(image, [checkpoint], mc_samples=2, device="cpu", num_threads=1, image_voxel_mm=2.0)
    assert res.probabilities.shape == (33, 11, 12, 9) and res.voxel_size_mm == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(res.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.mc_volumes_mm3.sum(axis=1), 11 * 12 * 9 * 8.0)


def test_mask_forces_background_outside_the_icv():
    image = _image(shape=(21, 8, 7))
    mask = np.zeros(image.shape, dtype=bool)
    mask[:12] = True  # the ramp's class 1 wins on the upper half of x: outside the mask
    kwargs = dict(manifests=[_toy_manifest(2.0)], mc_samples=2, device="cpu", num_threads=1)
    plain = segment_volume(image, [FixedPattern()], **kwargs)
    masked = segment_volume(image, [FixedPattern()], mask=mask, **kwargs)
    outside = ~mask
    assert (plain.labels[outside] == 1).any() and (plain.entropy[outside] > 0).all()  # it would leak
    assert (masked.labels[outside] == 0).all()
    np.testing.assert_array_equal(masked.probabilities[0][outside], 1.0)
    np.testing.assert_array_equal(masked.probabilities[1][outside], 0.0)
    np.testing.assert_array_equal(masked.entropy[outside], 0.0)
    # inside the mask nothing changes
    np.testing.assert_array_equal(masked.labels[mask], plain.labels[mask])
    np.testing.assert_array_equal(masked.probabilities[:, mask], plain.probabilities[:, mask])
    np.testing.assert_array_equal(masked.entropy[mask], plain.entropy[mask])
    with pytest.raises(ValueError, match="mask's shape"):
        segment_volume(image, [FixedPattern()], mask=mask[:-1], **kwargs)


def test_mask_with_a_coarser_protocol(checkpoint):
    image = _image()
    mask = image > 0
    mask[:, :, :9] = False
    res = segment_volume(image, [checkpoint], mc_samples=2, device="cpu", num_threads=1, mask=mask)
    assert (res.labels[~mask] == 0).all() and (coarse_labels(res, "cerebrum7")[~mask] == 0).all()
    for position in range(1, 8):  # every CEREBRUM class: probability 0 outside
        assert coarse_probability(res, "cerebrum7", position)[~mask].max() == 0.0


def test_default_and_validate_parcellation_models(tmp_path, monkeypatch, checkpoint, no_package_models):
    folder = tmp_path / "installed"
    folder.mkdir()
    parc = tiny_parcellation_checkpoint(folder / "parc")
    wb = tiny_wholebrain_checkpoint(folder / "wb")
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(folder))
    assert default_parcellation_models() == [str(parc)] and default_wholebrain_models() == [str(wb)]
    assert json.loads(parc.read_text())["task"] == "parcellation"
    paths, protocol = validate_parcellation_checkpoints([parc])
    assert paths == [parc.resolve()] and protocol == "dkt-aseg"
    with pytest.raises(ModelError, match="whole-brain protocol") as exc:
        validate_parcellation_checkpoints([wb])
    assert exc.value.exit_code == 4
    with pytest.raises(ModelError, match="no such model checkpoint"):
        validate_parcellation_checkpoints([tmp_path / "missing"])
    deep = tiny_wholebrain_checkpoint(tmp_path / "deep", protocol="deep14")
    with pytest.raises(ModelError, match="cannot be merged into 'aseg'"):
        validate_parcellation_checkpoints([deep])


# --------------------------------------------------------------------------- test-time augmentation


class HalvesModel(nn.Module):
    """Three classes: 'Left-thing' in the first half of the grid's first axis (RAS x: the left), 'Right-thing'
    in the second half, whatever the input; every input it sees is kept."""

    n_classes = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        n = x.shape[2]
        first = (torch.arange(n) < n // 2).float().view(1, 1, n, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        p = torch.cat([torch.full_like(first, 0.1), 0.8 * first + 0.05, 0.8 * (1 - first) + 0.05], dim=1)
        return torch.log(p)


def _lateral_manifest():
    manifest = _toy_manifest(2.0, name="halves")
    manifest["label_protocol"] = {"name": "toy-lr", "labels": [
        {"index": 0, "name": "background"}, {"index": 1, "name": "Left-thing"}, {"index": 2, "name": "Right-thing"}]}
    return manifest


def test_view_samples_and_seeds():
    assert view_samples(15, 4) == [4, 4, 4, 3] and view_samples(15, 2) == [8, 7] and view_samples(3, 1) == [3]
    assert sum(view_samples(17, 4)) == 17
    assert view_seed(42, 0) == 42 and len({view_seed(42, v) for v in range(4)}) == 4
    assert set(TTA_VIEWS) == {"none", "flip", "shift", "flip-shift"} and DEFAULT_TTA in TTA_VIEWS


def test_flip_view_mirrors_back_and_swaps_left_and_right():
    image = _image(shape=(20, 8, 6))
    model = HalvesModel()
    plain = segment_volume(image, [model], manifests=[_lateral_manifest()], mc_samples=2, device="cpu", tta="none")
    flipped = segment_volume(image, [model], manifests=[_lateral_manifest()], mc_samples=2, device="cpu", tta="flip")
    # the second view saw the mirrored model-grid image
    np.testing.assert_allclose(model.seen[-1][0, 0].numpy(), block_mean(image, (2, 2, 2))[::-1], rtol=1e-6)
    # a model that puts the left structure on the left in both views: mirrored back and swapped, the views agree
    np.testing.assert_allclose(flipped.probabilities, plain.probabilities, atol=1e-6)
    np.testing.assert_array_equal(flipped.labels, plain.labels)
    assert (plain.labels[:10] == 1).all() and (plain.labels[10:] == 2).all()
    np.testing.assert_allclose(flipped.mc_volumes_mm3, plain.mc_volumes_mm3)
    assert flipped.tta == "flip" and plain.tta == "none"
    # a mirror without the class swap would have mixed left and right: the probabilities show they were swapped
    assert flipped.probabilities[1, 0, 4, 3] > 0.8


def test_flip_view_averages_a_fixed_ramp_with_its_mirror():
    image = _image(shape=(21, 8, 7))
    res = segment_volume(image, [FixedPattern()], manifests=[_toy_manifest(2.0)], mc_samples=2, device="cpu",
                         tta="flip")
    ramp = np.linspace(0.1, 0.9, 11)
    expected = _trilinear_1d(0.5 * (ramp + ramp[::-1]), 2, 21)
    np.testing.assert_allclose(res.probabilities[1], np.broadcast_to(expected[:, None, None], (21, 8, 7)), atol=1e-5)
    # the entropy is that of the combined probabilities
    np.testing.assert_allclose(res.entropy[:, 3, 3], -(expected * np.log(expected) + (1 - expected) *
                                                         np.log(1 - expected)), atol=1e-5)


def test_shift_view_samples_the_image_half_a_model_voxel_later():
    image = _image(shape=(21, 8, 7))
    model = FixedPattern()
    res = segment_volume(image, [model], manifests=[_toy_manifest(2.0)], mc_samples=3, device="cpu", tta="shift")
    # view 1 (the last one run) saw the block means of the image padded by one voxel at the start of every axis
    np.testing.assert_allclose(model.seen[0, 0].numpy(), block_mean(np.pad(image, ((1, 0),) * 3), (2, 2, 2)), rtol=1e-6)
    assert tuple(model.seen.shape[2:]) == (11, 5, 4)
    ramp = np.linspace(0.1, 0.9, 11)
    unshifted = _trilinear_1d(ramp, 2, 21)
    shifted = _trilinear_1d(ramp, 2, 22)[1:]  # up-sampled on the padded grid, cropped back
    expected = (2 * unshifted + 1 * shifted) / 3  # 2 samples in view 0, 1 in view 1
    np.testing.assert_allclose(res.probabilities[1], np.broadcast_to(expected[:, None, None], (21, 8, 7)), atol=1e-5)
    assert res.mc_volumes_mm3.shape == (3, 2)


def test_flip_shift_spreads_the_samples_and_checks_their_number(checkpoint):
    res = segment_volume(_image(), [checkpoint], mc_samples=5, seed=1, device="cpu", num_threads=1, tta="flip-shift")
    assert res.mc_volumes_mm3.shape == (5, 33) and res.tta == "flip-shift"
    np.testing.assert_allclose(res.probabilities.sum(axis=0), 1.0, atol=1e-5)
    again = segment_volume(_image(), [checkpoint], mc_samples=5, seed=1, device="cpu", num_threads=1, tta="flip-shift")
    np.testing.assert_array_equal(again.probabilities, res.probabilities)
    with pytest.raises(ValueError, match="4 views"):
        segment_volume(_image(), [checkpoint], mc_samples=3, device="cpu", tta="flip-shift")
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        segment_volume(_image(), [checkpoint], mc_samples=3, device="cpu", tta="rotate")


class SteepPattern(nn.Module):
    """Two classes, "thing" from 2 % to 98 % along x of the model grid (50 % at the middle)."""

    n_classes = 2

    def forward(self, x):
        n = x.shape[2]
        ramp = torch.linspace(0.02, 0.98, n, dtype=torch.float32).view(1, 1, n, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.log(torch.cat([1 - ramp, ramp], dim=1))


def test_intensity_refinement_refines_the_probabilities_and_keeps_the_networks_uncertainty():
    from bids_app.core.refinement import refine_probabilities

    rng = np.random.default_rng(0)
    image = np.where(np.arange(40)[:, None, None] < 16, 0.3, 0.8) + 0.02 * rng.standard_normal((40, 8, 6))
    image = image.astype(np.float32)
    mask = np.ones(image.shape, bool)
    mask[:, :, 0] = False
    image[~mask] = 0
    kwargs = dict(manifests=[_toy_manifest(2.0)], mc_samples=2, seed=3, device="cpu", tta="shift", mask=mask)
    plain = segment_volume(image, [SteepPattern()], **kwargs)
    refined = segment_volume(image, [SteepPattern()], refinement="intensity", **kwargs)
    assert plain.refinement == "none" and refined.refinement == "intensity"
    # exactly the core refinement of the networks' probabilities, inside the mask
    expected = plain.probabilities.copy()
    refine_probabilities(expected, image, mask)
    np.testing.assert_allclose(refined.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(refined.labels, plain.protocol.to_labels(expected.argmax(axis=0)))
    # the network put the boundary at x = 20, the image has it at 16: the refinement moves it there
    inside = refined.labels[:, :, 1:]
    assert (plain.labels[16:20, :, 1:] == 0).all()
    assert (inside[:16] == 0).all() and (inside[16:] == 1).all() and (refined.labels[~mask] == 0).all()
    # the uncertainty map and the QC are the networks' own
    np.testing.assert_allclose(refined.entropy, plain.entropy, atol=1e-6)
    np.testing.assert_array_equal(refined.mc_volumes_mm3, plain.mc_volumes_mm3)
    assert refined.mean_cv_percent == plain.mean_cv_percent and "refine_s" in refined.timings
    with pytest.raises(ValueError, match="unknown refinement"):
        segment_volume(image, [SteepPattern()], manifests=[_toy_manifest(2.0)], mc_samples=1, device="cpu",
                       refinement="crf")


def test_coarser_protocols_keep_the_tta_and_the_refinement(checkpoint):
    res = segment_volume(_image(), [checkpoint], mc_samples=2, seed=1, device="cpu", num_threads=1, tta="flip",
                         refinement="intensity")
    coarse = coarser(res, "cerebrum7")
    assert (coarse.tta, coarse.refinement) == ("flip", "intensity")
