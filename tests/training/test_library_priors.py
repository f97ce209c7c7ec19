"""tools/make_library_priors.py: leave-subject-out training priors, and a fold's test subjects kept out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app import atlas_library as al
from bids_app.core.atlas_fusion import population_prior
from bids_app.core.labels import load_protocol
from bids_app.models.cascade import fold_prior

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_library_priors.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_library_priors", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory):
    # x = 0 (the mirror plane) mid-grid, as in the crop, so that the mirrored priors stay on the grid
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[0, 3] = 11.5
    return al.write_synthetic_library(tmp_path_factory.mktemp("library"), subjects=3, shape=(24, 24, 24),
                                      affine=affine)


def test_fold_test_subject_is_kept_out_of_every_prior(tool, library_dir, tmp_path):
    out = tmp_path / "priors"
    assert tool.main([str(library_dir), str(out), "--exclude-subjects", "synth-02"]) == 0
    cases = json.loads((library_dir / "library.json").read_text())["cases"]
    # every case has a prior (the pack needs all subjects for the fold split): the 13 side-free
    # lobular classes (background is what they leave), mostly on the cerebellum
    for case in cases:
        prior = np.load(out / f"{case['case']}_prior.npy").astype(np.float32)
        assert prior.shape == (13, 24, 24, 24)
        assert prior.min() >= 0 and prior.sum(0).max() <= 1.0 + 5e-3 and prior.sum() > 100
    # a mirrored case gets its twin's prior, mirrored
    own = np.load(out / "synth-00_prior.npy").astype(np.float32)
    twin = np.load(out / "synth-00-mirror_prior.npy").astype(np.float32)
    np.testing.assert_array_equal(twin, own[:, ::-1])
    # the registered priors of the included subjects never used the excluded subject (nor their own)
    for subject, other in (("synth-00", "synth-01"), ("synth-01", "synth-00")):
        record = json.loads((out / f"{subject}_atlas.json").read_text())
        assert record["excluded_subjects"] == [subject, "synth-02"]
        assert record["selected"] and all(s.startswith(other) for s in record["selected"])
    # the excluded subject's cases get the population prior of the other two subjects, unregistered
    kept = [np.asarray(nb.load(str(library_dir / c["dseg"])).dataobj) for c in cases if c["subject"] != "synth-02"]
    expected = fold_prior(population_prior(kept, list(load_protocol("lobules").indices)))
    for name in ("synth-02", "synth-02-mirror"):
        np.testing.assert_allclose(np.load(out / f"{name}_prior.npy").astype(np.float32), expected, atol=1e-3)
        assert not (out / f"{name}_atlas.json").exists()


def test_unknown_subject_is_refused_before_any_work(tool, library_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tool.main([str(library_dir), str(tmp_path / "priors"), "--exclude-subjects", "synth-07"])
    assert stop.value.code == 2
    assert "synth-07" in capsys.readouterr().err
    assert not (tmp_path / "priors").exists()
