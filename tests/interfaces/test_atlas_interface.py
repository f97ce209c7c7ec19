"""The AtlasPrior Nipype interface runs the atlas prior adapter on a tiny synthetic library."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np

from bids_app import atlas_library as al
from bids_app.core.atlas_fusion import DEFAULT_N
from bids_app.interfaces.atlas import AtlasPrior

SHAPE = (24, 24, 24)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def test_atlas_prior_interface_runs(tmp_path, monkeypatch):
    library = al.write_synthetic_library(tmp_path / "library", subjects=2, shape=SHAPE, affine=AFFINE)
    crop = tmp_path / "crop.nii.gz"
    nb.save(nb.Nifti1Image(al.synthetic_case(SHAPE, seed=5)[0], AFFINE), str(crop))
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    monkeypatch.chdir(node_dir)
    iface = AtlasPrior(in_file=str(crop), library_dir=str(library), n_atlases=2, exclude_subjects=["synth-01"],
                       num_threads=1, random_seed=7, syn_preset="fine")
    assert AtlasPrior().inputs.n_atlases == DEFAULT_N
    result = iface.run()
    out = result.outputs
    assert out.out_prior == str(node_dir / "atlas_prior.nii.gz")
    assert out.out_json == str(node_dir / "atlas_prior.json")
    img = nb.load(out.out_prior)
    assert img.shape == SHAPE + (27,)
    meta = json.loads(open(out.out_json).read())
    # synth-01 and its mirrored twin are left out: synth-00 and its twin remain
    assert sorted(meta["selected_cases"]) == ["synth-00", "synth-00-mirror"]
    assert meta["random_seed"] == 7 and meta["syn_preset"] == "fine" and meta["exclude_subjects"] == ["synth-01"]
    # num_threads does not change the cache key
    a = AtlasPrior(in_file=str(crop), library_dir=str(library), num_threads=1)
    b = AtlasPrior(in_file=str(crop), library_dir=str(library), num_threads=4)
    assert a.inputs.get_hashval()[1] == b.inputs.get_hashval()[1]
