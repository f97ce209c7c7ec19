"""Intensity refinement (bids_app.core.refinement) on small arrays made here."""

import numpy as np
import pytest

from bids_app.core.refinement import intensity_model, refine_probabilities


def _blurred_two_classes(shape=(40, 6, 6), edge=20, network_edge=23, width=4.0, seed=0):
    """An image whose intensity changes at ``edge`` and network probabilities whose 50 % point is at
    ``network_edge`` (a coarse network that misplaced the boundary), spread over ``width`` voxels."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    image = np.where(x < edge, 0.35, 0.85) + 0.03 * rng.standard_normal(shape)
    p1 = 1.0 / (1.0 + np.exp(-(x - network_edge + 0.5) / (width / 4)))
    probs = np.stack([1.0 - p1, p1]).astype(np.float32)
    return image.astype(np.float32), probs


def test_refinement_moves_the_boundary_to_the_intensity_edge():
    image, probs = _blurred_two_classes()
    truth = (np.arange(40) >= 20)[:, None, None] * np.ones(image.shape, bool)
    before = probs.argmax(axis=0)
    assert (before[20:23] == 0).all() and (before != truth).sum() == 3 * 36  # 3 voxels late
    model = refine_probabilities(probs, image)
    after = probs.argmax(axis=0)
    # the slab next to the edge is still inside the network's confident background (p > 0.9), so its
    # histogram holds a little of the bright class: two of the three misplaced slabs move, none go wrong
    assert (after[:20] == 0).all() and (after[21:] == 1).all()
    assert (after != truth).sum() <= 36
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert model.own.all() and model.log_density.shape == (2, 48)
    # each class's density peaks at its intensity
    centres = 0.5 * (model.edges[1:] + model.edges[:-1])
    assert abs(centres[model.log_density[0].argmax()] - 0.35) < 0.06
    assert abs(centres[model.log_density[1].argmax()] - 0.85) < 0.06


def test_confident_voxels_are_kept_and_beta_zero_changes_nothing():
    image, probs = _blurred_two_classes()
    original = probs.copy()
    refine_probabilities(probs, image, beta=0.0)
    np.testing.assert_allclose(probs, original, atol=1e-6)
    refine_probabilities(probs, image)
    far = np.r_[0:10, 32:40]  # far from both boundaries the network is sure and stays so
    assert (probs[:, far].argmax(axis=0) == original[:, far].argmax(axis=0)).all()


def test_voxels_outside_the_mask_are_untouched():
    image, probs = _blurred_two_classes()
    mask = np.ones(image.shape, bool)
    mask[:, :, :3] = False
    original = probs.copy()
    refine_probabilities(probs, image, mask)
    np.testing.assert_array_equal(probs[:, ~mask], original[:, ~mask])
    assert not np.array_equal(probs[:, mask], original[:, mask])


def test_a_class_without_confident_voxels_gets_the_whole_mask_histogram():
    image, probs = _blurred_two_classes()
    third = np.full((1,) + image.shape, 0.05, np.float32)  # never confident
    probs = np.concatenate([probs * 0.95, third]).astype(np.float32)
    model = intensity_model(probs, image, image > 0)
    assert model.own.tolist() == [True, True, False]
    pooled = np.histogram(np.clip(image, 0, 1.3 - 1e-6), bins=48, range=(0, 1.3))[0]
    assert model.log_density[2].argmax() in np.flatnonzero(pooled >= 0.5 * pooled.max())
    refine_probabilities(probs, image)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_bad_input_is_refused():
    image, probs = _blurred_two_classes()
    with pytest.raises(ValueError, match="do not match"):
        refine_probabilities(probs[:, :10], image)
    with pytest.raises(ValueError, match="float32"):
        refine_probabilities(probs.astype(np.float64), image)
    with pytest.raises(ValueError, match="invalid refinement"):
        refine_probabilities(probs, image, confidence=1.5)
    with pytest.raises(ValueError, match="mask is empty"):
        refine_probabilities(probs, image, np.zeros(image.shape, bool))
    with pytest.raises(ValueError, match="mask's shape"):
        refine_probabilities(probs, image, np.ones((3, 3, 3), bool))
