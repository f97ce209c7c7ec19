"""Shared fixtures: tiny BIDS datasets and a phantom TemplateFlow folder, all made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("ARBORSEG_OFFLINE", "1")  # tests never try to download anything


@pytest.fixture(scope="session")
def phantom_templateflow(tmp_path_factory) -> Path:
    """A TemplateFlow home with the phantom template (4 mm target, 2 mm reference)."""
    from bids_app.cli.demo import write_phantom_templateflow

    home = tmp_path_factory.mktemp("templateflow")
    write_phantom_templateflow(home, target_res_mm=4.0, reference_res_mm=2.0)
    return home


def write_nifti(path: Path, data, affine=None, dtype=None) -> Path:
    import nibabel as nb

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=dtype) if dtype else np.asarray(data)
    nb.save(nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def blob_volume(shape=(40, 48, 40), seed=0) -> np.ndarray:
    """A bright ellipsoid with noise: a valid, tiny anatomical-looking volume."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.35 * s)) ** 2 for g, c, s in zip(grid, centre, shape))
    return (np.where(r < 1, 100.0, 5.0) + rng.normal(0, 2, shape)).clip(0).astype(np.float32)


@pytest.fixture
def make_bids(tmp_path):
    """``make_bids({"01": {"T1w": array_or_path_or_callable}, ...})`` -> a BIDS root."""

    def _make(subjects: dict, name="bids") -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
        for sub, images in subjects.items():
            anat = root / f"sub-{sub}" / "anat"
            anat.mkdir(parents=True)
            for suffix, content in images.items():
                path = anat / f"sub-{sub}_{suffix}.nii.gz"
                if callable(content):
                    content(path)
                else:
                    write_nifti(path, content)
        return root

    return _make


def tree_state(root: Path) -> dict:
    """Every file under ``root`` with its size and mtime: to prove nothing was written there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def tiny_wholebrain_checkpoint(path_stem, *, voxel_size_mm=2.0, protocol="aseg", seed=0, task="wholebrain",
                               name=None):
    """A random UNet3D (2 filters, depth 1) saved as a whole-brain checkpoint; returns the manifest path."""
    import torch

    from bids_app.core.labels import load_protocol
    from bids_app.models.checkpoint import save_checkpoint
    from bids_app.models.unet import UNet3D

    torch.manual_seed(seed)
    prot = load_protocol(protocol)
    net = UNet3D(in_channels=1, n_classes=len(prot), base_filters=2, depth=1)
    save_checkpoint(net, path_stem, {
        "name": name or path_stem.name, "version": "0.0.1", "task": task,
        "label_protocol": prot.as_manifest(),
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}], "voxel_size_mm": voxel_size_mm,
        "training": {"data": "random weights (tests)", "licence": "CC0-1.0", "seed": seed}, "metrics": {},
    })
    return path_stem.with_name(path_stem.name + ".json")


def tiny_parcellation_checkpoint(path_stem, *, voxel_size_mm=2.0, seed=0, name=None):
    """A random CEREBRUM (2 filters) saved as a cortical parcellation checkpoint (``dkt-aseg``, 93 classes,
    ``"task": "parcellation"``); returns the manifest path."""
    import torch

    from bids_app.core.labels import load_protocol
    from bids_app.models.cerebrum import Cerebrum
    from bids_app.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    prot = load_protocol("dkt-aseg")
    net = Cerebrum(in_channels=1, n_classes=len(prot), base_filters=2)
    save_checkpoint(net, path_stem, {
        "name": name or path_stem.name, "version": "0.0.1", "task": "parcellation",
        "label_protocol": prot.as_manifest(),
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}], "voxel_size_mm": voxel_size_mm,
        "training": {"data": "random weights (tests)", "licence": "CC0-1.0", "seed": seed}, "metrics": {},
    })
    return path_stem.with_name(path_stem.name + ".json")


@pytest.fixture
def no_package_models(tmp_path_factory, monkeypatch):
    """Hide the models shipped in ``bids_app/data/models`` (tests of the empty / env-folder cases)."""
    from bids_app.models import checkpoint

    monkeypatch.setattr(checkpoint, "PACKAGE_MODELS_DIR", tmp_path_factory.mktemp("no-package-models"))


def tiny_image_checkpoint(path_stem, *, task, seed=0, name=None):
    """A tiny random image-to-image network saved as an image-task checkpoint (manifest fields as
    ``bids_app.training.imagetasks.export``): ``task="superres"``: ``SuperResolution3D(width=4, n_blocks=1)``
    (x2, its head perturbed so that it is not plain trilinear); ``"t2synth"``: a one-output ``UNet3D`` (4
    filters, depth 1). Returns the manifest path."""
    import torch

    from bids_app.core.crop import CEREBELLUM_BOX_MM
    from bids_app.models.checkpoint import save_checkpoint
    from bids_app.models.superres import SuperResolution3D
    from bids_app.models.unet import UNet3D

    torch.manual_seed(seed)
    if task == "superres":
        net = SuperResolution3D(width=4, n_blocks=1)
        with torch.no_grad():
            net.head.weight.normal_(0.0, 0.01)
    else:
        net = UNet3D(in_channels=1, n_classes=1, base_filters=4, depth=1, dropout=0.0)
    fields = {
        "name": name or path_stem.name, "version": "0.0.1", "task": task, "label_protocol": None,
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}],
        "output_channels": [{"name": "T1w" if task == "superres" else "T2w", "normalisation": "percentile99"}],
        "voxel_size_mm": 1.0, "crop": {"space": "MNI152NLin6Asym", "box_mm": [list(b) for b in CEREBELLUM_BOX_MM]},
        "training": {"data": "random weights (tests)", "licence": "CC0-1.0", "seed": seed}, "metrics": {},
    }
    if task == "superres":
        fields["scale"] = 2
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, path_stem, fields)
    return path_stem.with_name(path_stem.name + ".json")
