"""The super-resolution network, image-task checkpoints and the image inference helpers."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bids_app.core.superres import interpolate, upsampled_affine  # noqa: E402
from bids_app.models import imaging  # noqa: E402
from bids_app.models.checkpoint import ModelError, list_models, load_checkpoint, save_checkpoint  # noqa: E402
from bids_app.models.superres import SuperResolution3D, pixel_shuffle_3d  # noqa: E402
from bids_app.models.unet import UNet3D  # noqa: E402


def _fields(task: str, out: str) -> dict:
    return {"name": f"tiny-{task}", "version": "0.0.1", "task": task, "label_protocol": None,
            "input_channels": [{"name": "T1w", "normalisation": "percentile99"}],
            "output_channels": [{"name": out, "normalisation": "percentile99"}], "voxel_size_mm": 1.0,
            "training": {"data": "test", "licence": "CC0", "seed": 0}, "metrics": {}}


def test_pixel_shuffle_places_channels_at_offsets():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1, 1, 1)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 1, 2, 2, 2)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                assert y[0, 0, a, b, c] == (a * 2 + b) * 2 + c
    with pytest.raises(ValueError):
        pixel_shuffle_3d(torch.zeros(1, 3, 2, 2, 2), 2)


def test_untrained_network_is_trilinear_interpolation():
    net = SuperResolution3D(width=4, n_blocks=1).eval()
    x = np.random.default_rng(0).random((6, 4, 4)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)[None, None])[0, 0].numpy()
    assert y.shape == (12, 8, 8)
    assert np.allclose(y, interpolate(x, 2, order=1), atol=1e-5)
    # the residual path is trained: a gradient reaches the head
    net.train()
    net(torch.from_numpy(x)[None, None]).sum().backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_image_task_checkpoints(tmp_path, monkeypatch):
    stem = tmp_path / "models" / "tiny-sr"
    stem.parent.mkdir()
    save_checkpoint(SuperResolution3D(width=4, n_blocks=1), stem, _fields("superres", "T1w"))
    model, manifest = load_checkpoint(stem)
    assert manifest["label_protocol"] is None and model.scale == 2
    rows = [r for r in list_models(stem.parent) if r["name"] == "tiny-superres"]
    assert rows and rows[0]["protocol"] == "image:T1w"
    # an image task needs output_channels and no label protocol
    bad = json.loads((tmp_path / "models" / "tiny-sr.json").read_text())
    bad["label_protocol"] = {"name": "x", "labels": [{"index": 0, "name": "bg"}]}
    (tmp_path / "models" / "tiny-sr.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="must be null"):
        load_checkpoint(stem)
    del bad["output_channels"]
    bad["label_protocol"] = None
    (tmp_path / "models" / "tiny-sr.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="output_channels"):
        load_checkpoint(stem)


def test_image_file_superres_and_t2(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    save_checkpoint(SuperResolution3D(width=4, n_blocks=1), models / "tiny-sr", _fields("superres", "T1w"))
    save_checkpoint(UNet3D(in_channels=1, n_classes=1, base_filters=4, depth=1, dropout=0.0), models / "tiny-t2",
                    _fields("t2synth", "T2w"))
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(models))
    assert imaging.default_image_model("superres").endswith("tiny-sr.json")
    data = np.zeros((10, 8, 6), np.float32)
    data[2:8, 2:6, 1:5] = 0.8
    affine = np.array([[-1.0, 0, 0, 5], [0, 1, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1]])
    crop = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(crop))
    summary = imaging.image_file("superres", crop, tmp_path / "sr.nii.gz")
    out = nib.load(str(tmp_path / "sr.nii.gz"))
    assert out.shape == (20, 16, 12) and summary["voxel_size_mm"] == [0.5, 0.5, 0.5]
    assert np.allclose(out.affine, upsampled_affine(affine, 2))
    sr = np.asarray(out.dataobj)
    assert (sr >= 0).all() and not sr[:2].any()  # zero far from the brain
    imaging.image_file("t2synth", crop, tmp_path / "t2.nii.gz")
    t2 = nib.load(str(tmp_path / "t2.nii.gz"))
    assert t2.shape == data.shape and np.allclose(t2.affine, affine)
    assert not np.asarray(t2.dataobj)[data == 0].any()
    # a checkpoint of the other task is refused; a missing model is a clear error
    with pytest.raises(ModelError, match="not 'superres'"):
        imaging.image_file("superres", crop, tmp_path / "x.nii.gz", checkpoint=models / "tiny-t2")
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr("bids_app.models.checkpoint.PACKAGE_MODELS_DIR", tmp_path / "empty")
    with pytest.raises(ModelError, match="no installed model"):
        imaging.image_file("t2synth", crop, tmp_path / "y.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ModelError, match="cannot read"):
        imaging.image_file("superres", bad, tmp_path / "z.nii.gz", checkpoint=models / "tiny-sr")


def test_a_user_model_overrides_the_shipped_one(tmp_path, monkeypatch):
    shipped, user = tmp_path / "package", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    save_checkpoint(SuperResolution3D(width=4, n_blocks=1), shipped / "a-shipped", _fields("superres", "T1w"))
    monkeypatch.setattr("bids_app.models.checkpoint.PACKAGE_MODELS_DIR", shipped)
    monkeypatch.delenv("ARBORSEG_MODELS_DIR", raising=False)
    assert imaging.default_image_model("superres").endswith("a-shipped.json")
    assert imaging.default_image_model("t2synth") is None
    save_checkpoint(SuperResolution3D(width=4, n_blocks=1), user / "z-user", _fields("superres", "T1w"))
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(user))
    assert imaging.default_image_model("superres").endswith("z-user.json")
    with pytest.raises(ValueError, match="unknown image task"):
        imaging.default_image_model("wholebrain")


def test_upsampled_support_matches_the_scipy_interpolation():
    rng = np.random.default_rng(3)
    data = rng.random((9, 7, 8)).astype(np.float32)
    data[rng.random(data.shape) < 0.4] = 0.0  # a ragged support, edges included
    reference = interpolate((data > 0).astype(np.float32), 2, order=1) > 0.5
    support = imaging.upsampled_support(data, 2)
    assert support.shape == (18, 14, 16) and support.dtype == bool
    assert np.array_equal(support, reference)
    assert 0 < support.sum() < support.size
