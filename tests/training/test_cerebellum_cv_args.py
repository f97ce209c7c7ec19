"""The cerebellum cross-validation gives each lobule set the prior its channels ask for, and refuses sets it cannot
feed before any work (bids_app.training.cerebellum_cv)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.atlas_library import write_synthetic_library
from bids_app.models.cascade import HEMISPHERES_TASK, LOBULES_TASK
from bids_app.training.cerebellum_cv import run_cerebellum_cv
from tests.models.test_cascade import tiny_cerebellum_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    library = write_synthetic_library(root / "lib", subjects=1, shape=(8, 8, 8), mirrored=False)
    ck = {name: str(tiny_cerebellum_checkpoint(root / name, task=LOBULES_TASK, prior=prior, seed=i))
          for i, (name, prior) in enumerate((("plain", False), ("atlas", True), ("population", "population")))}
    ck["hemi"] = str(tiny_cerebellum_checkpoint(root / "hemi", task=HEMISPHERES_TASK, seed=9))
    return root, library, ck


@pytest.mark.parametrize("sets, kwargs, message", [
    ({"mixed": ["atlas", "population"]}, {"atlas_n": 2}, "mixes models taking different priors"),
    ({"a": ["atlas"]}, {}, "takes the atlas prior: give atlas_n"),
    ({"p": ["population"]}, {}, "takes the population prior: give population_prior"),
    ({"plain": ["plain"]}, {"robust": ["nope"]}, "--robust nope: not among the lobule sets plain"),
])
def test_sets_it_cannot_feed_are_refused(setup, sets, kwargs, message):
    root, library, ck = setup
    lobules = {name: [ck[m] for m in members] for name, members in sets.items()}
    with pytest.raises(ValueError, match=message):
        run_cerebellum_cv(library, root / "oasis", root / "template.nii.gz", root / "out", test_subjects=["synth-00"],
                          hemisphere=[ck["hemi"]], lobules=lobules, **kwargs)


def test_deformation_moves_image_and_references_together():
    from bids_app.training.cerebellum_cv import DEGRADATIONS, deform_crop

    assert "deformation" in DEGRADATIONS
    labels = np.zeros((24, 20, 22), dtype=np.int16)
    labels[6:18, 5:15, 6:16] = 7
    labels[9:14, 8:12, 9:13] = 3
    image = labels.astype(np.float32) / 7.0
    same, (kept,) = deform_crop(image, [labels], seed=1, max_displacement=0.0)
    assert np.allclose(same, image) and np.array_equal(kept, labels)
    warped, (warped_labels, warped_copy) = deform_crop(image, [labels, labels.copy()], seed=1)
    assert not np.array_equal(warped_labels, labels)  # it moved
    assert np.array_equal(warped_labels, warped_copy) and warped_labels.dtype == labels.dtype
    # image and labels moved by the same field: the warped image is highest where the warped label is 7
    assert warped[warped_labels == 7].mean() > 0.9 and warped[warped_labels == 0].mean() < 0.1
    again, _ = deform_crop(image, [labels], seed=1)
    assert np.array_equal(again, warped)  # seeded
