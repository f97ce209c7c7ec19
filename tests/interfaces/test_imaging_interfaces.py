"""The image interfaces of the cerebellum branch (SuperResolution, T2Synthesis, RealT2w) on a tiny crop with tiny
random checkpoints made here."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.interfaces.imaging import RealT2w, SuperResolution, T2Synthesis
from tests.conftest import tiny_image_checkpoint

SHAPE = (16, 12, 12)


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """A 16 x 12 x 12 1 mm crop (MNI-like LAS affine: x flipped), zero outside an ellipsoid; tiny checkpoints."""
    root = tmp_path_factory.mktemp("imaging")
    grid = np.indices(SHAPE).astype(float)
    centre = (np.asarray(SHAPE) - 1) / 2
    r = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, SHAPE))
    rng = np.random.default_rng(0)
    data = np.where(r < 1, 0.5 + 0.4 * rng.random(SHAPE), 0.0).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 8.0], [0, 1.0, 0, -70.0], [0, 0, 1.0, -40.0], [0, 0, 0, 1]])
    path = root / "crop.nii.gz"
    nb.save(nb.Nifti1Image(data, affine), str(path))
    models = root / "models"
    return {"root": root, "file": path, "data": data, "affine": affine,
            "superres": tiny_image_checkpoint(models / "tiny-superres", task="superres", seed=1),
            "t2synth": tiny_image_checkpoint(models / "tiny-t2synth", task="t2synth", seed=2)}


def _corners(img) -> np.ndarray:
    """World coordinates of the outer corners of the field of view (voxel edges, not centres)."""
    lo = np.full(3, -0.5)
    hi = np.asarray(img.shape[:3]) - 0.5
    return np.array([nb.affines.apply_affine(img.affine, lo), nb.affines.apply_affine(img.affine, hi)])


def _run(node, cwd, monkeypatch):
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    return node.run().outputs


def test_superres_doubles_the_grid_over_the_same_field_of_view(crop, tmp_path, monkeypatch):
    node = SuperResolution(in_file=str(crop["file"]), checkpoint=str(crop["superres"]), device="cpu", num_threads=1,
                           isolate=False)
    out = _run(node, tmp_path / "sr", monkeypatch)
    img = nb.load(out.out_file)
    src = nb.load(str(crop["file"]))
    assert img.shape == tuple(2 * n for n in SHAPE)
    np.testing.assert_allclose(nb.affines.voxel_sizes(img.affine), 0.5)
    np.testing.assert_allclose(_corners(img), _corners(src), atol=1e-6)  # same field of view
    assert np.sign(img.affine[0, 0]) == np.sign(src.affine[0, 0])  # same orientation (LAS)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and data.min() >= 0 and data.max() > 0
    assert (data[::2, ::2, ::2][crop["data"] == 0] == 0).mean() > 0.9  # zero outside the brain, up to the edge
    summary = json.loads(Path(out.out_json).read_text())
    assert summary["task"] == "superres" and summary["model"] == "tiny-superres" and summary["version"] == "0.0.1"
    assert summary["shape"] == list(img.shape) and summary["voxel_size_mm"] == [0.5, 0.5, 0.5]
    assert summary["checkpoint"] == "tiny-superres.json" and summary["device"] == "cpu"


def test_t2synth_in_a_fresh_process_keeps_the_crop_grid(crop, tmp_path, monkeypatch):
    node = T2Synthesis(in_file=str(crop["file"]), checkpoint=str(crop["t2synth"]), device="cpu", num_threads=1)
    out = _run(node, tmp_path / "t2", monkeypatch)  # isolate=True: python -m bids_app.models.image_files
    img = nb.load(out.out_file)
    assert img.shape == SHAPE and np.allclose(img.affine, crop["affine"])
    data = np.asarray(img.dataobj)
    assert (data[crop["data"] == 0] == 0).all() and data.min() >= 0
    summary = json.loads(Path(out.out_json).read_text())
    assert summary["task"] == "t2synth" and summary["model"] == "tiny-t2synth"
    assert summary["voxel_size_mm"] == [1.0, 1.0, 1.0]
    assert (tmp_path / "t2" / "image_files.log").is_file()


def test_installed_model_is_the_default(crop, tmp_path, monkeypatch, no_package_models):
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(crop["superres"].parent))
    out = _run(T2Synthesis(in_file=str(crop["file"]), device="cpu", isolate=False), tmp_path / "default",
               monkeypatch)
    assert json.loads(Path(out.out_json).read_text())["model"] == "tiny-t2synth"


def test_no_installed_model_is_a_clear_error(crop, tmp_path, monkeypatch, no_package_models):
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    with pytest.raises(Exception, match=r"no super-resolution model is installed.*--no-superres"):
        _run(SuperResolution(in_file=str(crop["file"]), device="cpu", isolate=False), tmp_path / "a", monkeypatch)
    # in a fresh process (which sees the shipped models) a model error comes back as one line
    broken = tmp_path / "broken-t2.json"
    broken.write_text("{}")
    with pytest.raises(RuntimeError, match=r"T2 synthesis failed .*broken-t2.json: missing field"):
        _run(T2Synthesis(in_file=str(crop["file"]), checkpoint=str(broken), device="cpu"), tmp_path / "b",
             monkeypatch)


def test_a_checkpoint_of_the_other_task_is_refused(crop, tmp_path, monkeypatch):
    node = SuperResolution(in_file=str(crop["file"]), checkpoint=str(crop["t2synth"]), device="cpu", isolate=False)
    with pytest.raises(Exception, match="not 'superres'"):
        _run(node, tmp_path / "wrong", monkeypatch)


def test_threads_and_device_do_not_change_the_hash(crop):
    import nipype

    hashes = set()
    for threads, device, isolate in ((1, "cpu", True), (4, "auto", False)):
        node = nipype.pipeline.engine.Node(SuperResolution(in_file=str(crop["file"]), checkpoint=str(crop["superres"]),
                                                           num_threads=threads, device=device, isolate=isolate),
                                           name="superres")
        node.config = deepcopy(nipype.config._sections)
        hashes.add(node._get_hashval()[1])
    assert len(hashes) == 1


def test_real_t2w_interface(tmp_path, monkeypatch):
    """The subject's T2w (a shifted head with another contrast) registered and cut to the crop grid."""
    from bids_app.core import registration
    from tests.core.test_t2 import SHIFT, make_head

    data = make_head()
    paths = {}
    for key in ("t1w", "t2w", "crop"):
        paths[key] = tmp_path / f"sub-01_{key}.nii.gz"
        nb.save(data[key], str(paths[key]))
    fwd = registration.write_transform(data["forward"], tmp_path / "fwd.mat")
    out = _run(RealT2w(t2w_file=str(paths["t2w"]), t1w_file=str(paths["t1w"]), crop_file=str(paths["crop"]),
                       forward_transform=str(fwd), random_seed=1, num_threads=1), tmp_path / "real", monkeypatch)
    img = nb.load(out.out_file)
    assert img.shape == data["crop"].shape and np.allclose(img.affine, data["crop"].affine)
    summary = json.loads(Path(out.out_json).read_text())
    assert summary["file"] == "sub-01_t2w.nii.gz"
    np.testing.assert_allclose(summary["TranslationMM"], SHIFT, atol=0.8)
    assert Path(out.out_transform).name == "from-T2w_to-T1w_xfm.mat"
