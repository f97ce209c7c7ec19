"""The hierarchical fusion of a fine protocol's probabilities with its parent protocol's."""

import numpy as np
import pytest

from bids_app.core.hierarchy import hierarchical_probabilities, pooled_parent_probabilities, sum_into_parents

#: 4 fine classes: background, two children of parent 1, one of parent 2
PARENT_OF = np.array([0, 1, 1, 2])


def _random_probs(k, shape, seed):
    x = np.random.default_rng(seed).random((k,) + shape).astype(np.float32)
    return x / x.sum(axis=0, keepdims=True)


def test_children_sum_to_the_parent_and_keep_their_split():
    fine = _random_probs(4, (10, 3, 2), 0)
    parent = _random_probs(3, (10, 3, 2), 1)
    before = fine.copy()
    out = hierarchical_probabilities(fine, PARENT_OF, parent)
    assert out is fine
    np.testing.assert_allclose(sum_into_parents(fine, PARENT_OF, 3), parent, atol=1e-5)
    np.testing.assert_allclose(fine.sum(axis=0), 1.0, atol=1e-5)
    # the split of parent 1 between its two children is the fine ensemble's
    np.testing.assert_allclose(fine[1] / fine[2], before[1] / before[2], rtol=1e-3)
    # where the parent ensemble moves mass from parent 1 to parent 2, the labels follow it
    fine2, parent2 = before.copy(), np.zeros_like(parent)
    parent2[2] = 1.0
    hierarchical_probabilities(fine2, PARENT_OF, parent2)
    assert (fine2.argmax(axis=0) == 3).all()


def test_a_parent_the_fine_ensemble_left_empty_is_split_evenly():
    fine = np.zeros((4, 2, 1), dtype=np.float32)
    fine[3] = 1.0  # all mass on parent 2
    parent = np.zeros((3, 2, 1), dtype=np.float32)
    parent[1] = 1.0  # the parent ensemble says parent 1
    hierarchical_probabilities(fine, PARENT_OF, parent)
    np.testing.assert_allclose(fine[1], 0.5, atol=1e-4)
    np.testing.assert_allclose(fine[2], 0.5, atol=1e-4)
    np.testing.assert_allclose(fine[3], 0.0, atol=1e-4)


def test_pooled_parent_weights_every_network_equally():
    fine = _random_probs(4, (3, 2, 2), 2)
    parent = _random_probs(3, (3, 2, 2), 3)
    pooled = pooled_parent_probabilities(parent, 2, fine, PARENT_OF, 1)
    np.testing.assert_allclose(pooled, (2 * parent + sum_into_parents(fine, PARENT_OF, 3)) / 3, atol=1e-6)
    np.testing.assert_allclose(pooled.sum(axis=0), 1.0, atol=1e-5)


def test_errors():
    fine = _random_probs(4, (2, 2, 2), 4)
    with pytest.raises(ValueError, match="float32"):
        hierarchical_probabilities(fine.astype(np.float64), PARENT_OF, _random_probs(3, (2, 2, 2), 5))
    with pytest.raises(ValueError, match="grids differ"):
        hierarchical_probabilities(fine, PARENT_OF, _random_probs(3, (2, 2, 3), 5))
    with pytest.raises(ValueError, match="parent_of"):
        hierarchical_probabilities(fine, np.array([0, 1, 2]), _random_probs(3, (2, 2, 2), 5))
    with pytest.raises(ValueError, match="outside"):
        sum_into_parents(fine, np.array([0, 1, 1, 3]), 3)
    with pytest.raises(ValueError, match="at least one network"):
        pooled_parent_probabilities(_random_probs(3, (2, 2, 2), 5), 0, fine, PARENT_OF, 1)


def test_labels_are_taken_top_down():
    from bids_app.core.hierarchy import hierarchical_classes

    fine = np.zeros((4, 3), dtype=np.float32)
    fine[:, 0] = [0.1, 0.3, 0.25, 0.35]  # parent 1 has 0.55 split in two, parent 2 has 0.35
    fine[:, 1] = [0.7, 0.1, 0.1, 0.1]
    fine[:, 2] = [0.0, 0.2, 0.5, 0.3]
    parent = sum_into_parents(fine, PARENT_OF, 3)
    assert fine.argmax(axis=0).tolist() == [3, 0, 2]  # the plain argmax disagrees with the parent at voxel 0
    classes = hierarchical_classes(fine, PARENT_OF, parent)
    assert classes.tolist() == [1, 0, 2]
    assert (PARENT_OF[classes] == parent.argmax(axis=0)).all()
