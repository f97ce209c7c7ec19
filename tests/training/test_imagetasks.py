"""Training data and loop of the super-resolution / T2-synthesis networks (tiny synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bids_app.training import imagetasks as it  # noqa: E402
from bids_app.training.image_eval import tissue_mapping  # noqa: E402


def _phantom(shape=(24, 20, 20)):
    """Tissue map: WM core, GM shell, CSF pocket; and a T1/T2 pair with T1 WM > GM > CSF, T2 the reverse."""
    z, y, x = np.indices(shape)
    r = np.sqrt((z - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2)
    tissue = np.zeros(shape, np.uint8)
    tissue[r < 9] = 2
    tissue[r < 5] = 3
    tissue[(r < 9) & (z < 6)] = 1
    t1 = np.choose(tissue, [0.0, 0.3, 0.65, 0.9]).astype(np.float32)
    t2 = np.choose(tissue, [0.0, 1.0, 0.6, 0.45]).astype(np.float32)
    return tissue, t1, t2


def test_kmeans_tissues_orders_dark_to_bright():
    tissue, t1, _ = _phantom()
    rng = np.random.default_rng(0)
    noisy = t1 + rng.normal(0, 0.02, t1.shape).astype(np.float32) * (tissue > 0)
    cls = it.kmeans_tissues(noisy, tissue > 0)
    assert (cls == tissue).mean() > 0.99


def test_tissue_intensities_and_synthetic_pairs():
    tissue, t1, t2 = _phantom()
    stats = it.tissue_intensities([(t1, t2, tissue > 0)])
    assert stats["wm"]["t1"][0] == pytest.approx(0.9) and stats["csf"]["t2"][0] == pytest.approx(1.0)
    s1, s2 = it.synthetic_pair(tissue, stats, np.random.default_rng(1))
    inner = (tissue == 3)
    assert s1[inner].mean() > s1[tissue == 2].mean() and s2[inner].mean() < s2[tissue == 1].mean()
    assert not s1[tissue == 0].any() and not s2[tissue == 0].any()
    base = tissue_mapping(t1, tissue > 0, stats)
    assert np.allclose(base, t2, atol=1e-6)


def test_tissue_map_of_a_library_case():
    full = np.array([0, 2, 3, 4, 10, 1010, 1013, 3], dtype=np.int32)
    lob = np.array([0, 0, 0, 0, 0, 10, 13, 113], dtype=np.int16)
    assert it.tissue_map(full, lob).tolist() == [0, 3, 2, 1, 4, 2, 3, 3]


def test_batches_have_matching_shapes():
    tissue, t1, t2 = _phantom()
    rng = np.random.default_rng(3)
    lo, hi = it.sr_batch([("a", t1)], rng, 2, 8, 2)
    assert lo.shape == (2, 1, 4, 4, 4) and hi.shape == (2, 1, 8, 8, 8)
    data = it.T2Data(real=[("p", t1, t2, tissue > 0)], tissues=[tissue], stats=it.tissue_intensities(
        [(t1, t2, tissue > 0)]))
    x, y, w = it.t2_batch(data, rng, 3, 8)
    assert x.shape == y.shape == w.shape == (3, 1, 8, 8, 8)
    assert set(np.unique(w)) <= {0.0, 1.0}


def test_fit_resume_and_export(tmp_path):
    from bids_app.models.imaging import image_file, load_image_model

    tissue, t1, _ = _phantom()
    cfg = it.ImageTaskConfig(name="tiny-sr", task="superres", iterations=4, batch_size=1, patch=8,
                             checkpoint_every=2, log_every=2, model={"scale": 2, "width": 4, "n_blocks": 1})

    def sample(rng):
        return it.sr_batch([("a", t1)], rng, cfg.batch_size, cfg.patch, 2)

    run = tmp_path / "run"
    cfg.iterations = 2
    model, history = it.fit(cfg, run, sample)
    assert (run / "state.safetensors").is_file() and history[-1]["iteration"] == 2
    cfg.iterations = 4
    model, history = it.fit(cfg, run, sample)  # resumes at 2
    assert [h["iteration"] for h in history] == [2, 4]
    manifest = it.export(model, tmp_path / "tiny-sr", cfg, data="phantom", licence="CC0", history=history)
    assert manifest["task"] == "superres" and manifest["scale"] == 2 and manifest["label_protocol"] is None
    load_image_model(tmp_path / "tiny-sr", "superres")
    import nibabel as nib

    nib.save(nib.Nifti1Image(t1, np.eye(4)), str(tmp_path / "crop.nii.gz"))
    out = image_file("superres", tmp_path / "crop.nii.gz", tmp_path / "sr.nii.gz", checkpoint=tmp_path / "tiny-sr")
    assert out["shape"] == [48, 40, 40]
