"""The population lobule prior: the fraction of library label maps giving each label (bids_app.core.atlas_fusion
.population_prior) and its builder (bids_app.training.population_prior), on a tiny synthetic library."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_app.atlas_library import write_synthetic_library
from bids_app.core.atlas_fusion import population_prior
from bids_app.core.labels import load_protocol
from bids_app.training.population_prior import main


def test_population_prior_is_the_label_frequency():
    a = np.array([[0, 1], [2, 2]])
    b = np.array([[0, 2], [2, 1]])
    p = population_prior([a, b], [0, 1, 2])
    assert p.shape == (3, 2, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p[:, 0, 1], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(p[:, 1, 0], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(p.sum(axis=0), 1.0)
    with pytest.raises(ValueError, match="not among"):
        population_prior([np.array([[7]])], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        population_prior([a, np.zeros((3, 3), int)], [0, 1, 2])
    with pytest.raises(ValueError, match="at least one"):
        population_prior([], [0, 1])


def test_builder_writes_the_atlas_its_sidecar_and_leave_subject_out_case_priors(tmp_path):
    library = write_synthetic_library(tmp_path / "lib", subjects=3, shape=(12, 12, 12))
    out = tmp_path / "prior" / "population.nii.gz"
    out.parent.mkdir()
    assert main([str(library), "--out", str(out), "--exclude-subjects", "synth-02",
                 "--cases-dir", str(tmp_path / "cases")]) == 0
    img = nib.load(str(out))
    lobules = load_protocol("lobules")
    assert img.shape == (12, 12, 12, len(lobules)) and img.get_data_dtype() == np.uint8
    prob = np.moveaxis(np.asarray(img.dataobj, np.float32), -1, 0)
    np.testing.assert_allclose(prob.sum(axis=0), 1.0, atol=0.03)  # uint8 storage
    index = json.loads((library / "library.json").read_text())
    used = [c for c in index["cases"] if c["subject"] != "synth-02"]
    labels = [np.asarray(nib.load(str(library / c["dseg"])).dataobj) for c in used]
    np.testing.assert_allclose(prob, population_prior(labels, lobules.indices), atol=0.01)
    sidecar = json.loads((tmp_path / "prior" / "population.json").read_text())
    assert sidecar["kind"] == "population" and sidecar["protocol"] == "lobules" and sidecar["n_cases"] == 4
    assert sidecar["excluded_subjects"] == ["synth-02"] and "CC BY-NC-SA" in sidecar["licence"]
    # training priors: side-free 13 classes; leave-subject-out for included subjects, the full atlas for the rest
    from bids_app.models.cascade import fold_prior

    own = np.load(tmp_path / "cases" / "synth-00_prior.npy")
    others = [np.asarray(nib.load(str(library / c["dseg"])).dataobj) for c in used if c["subject"] != "synth-00"]
    assert own.shape == (13, 12, 12, 12) and own.dtype == np.float16
    np.testing.assert_allclose(own, fold_prior(population_prior(others, lobules.indices)), atol=1e-3)
    held_out = np.load(tmp_path / "cases" / "synth-02-mirror_prior.npy").astype(np.float32)
    np.testing.assert_allclose(held_out, fold_prior(population_prior(labels, lobules.indices)), atol=1e-3)


def test_builder_errors_name_the_problem(tmp_path, caplog):
    library = write_synthetic_library(tmp_path / "lib", subjects=1, shape=(8, 8, 8))
    out = str(tmp_path / "p.nii.gz")
    assert main([str(library), "--out", out, "--exclude-subjects", "nobody"]) == 2
    assert "no library case of the excluded subject(s) nobody" in caplog.text
    assert main([str(library), "--out", out, "--exclude-subjects", "synth-00"]) == 2
    assert "every case is excluded" in caplog.text
    assert main([str(tmp_path / "none"), "--out", out]) == 2
    assert "library.json: not found" in caplog.text
