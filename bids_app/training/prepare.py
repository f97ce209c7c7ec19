"""Pack training data: real labelled images and label maps, resampled once into compact arrays.

Every case is written as one ``<case>.npz`` in the chosen folder (never inside the package):

* real cases (OASIS-TRT-20): ``img1`` (float16, 1 mm RAS, p99-normalised inside the brain),
  ``lab1`` (int16 label values of the target protocol, 1 mm, the evaluation reference),
  ``img2``/``cls2`` (the same on the 2 mm model grid: 2x2x2 block mean / block majority of class
  positions) and the two affines;
* label-map cases (Mindboggle-101, SynthSeg): ``gen2`` (uint8 generation classes: the distinct
  source labels, for domain-randomised synthesis) and ``cls2`` (target class positions), 2 mm.

``index.json`` lists the cases with their subject, source and protocol. Cases from the same person
(the Mindboggle copy of an OASIS-TRT-20 subject) carry the same ``subject`` so that no fold has a
subject in both its training and its test set.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_app.atomic import atomic_output
from bids_app.core.intensity import normalise_intensity
from bids_app.core.labels import Protocol, load_mapping, load_protocol, map_labels
from bids_app.models.segment import block_mean as model_grid_mean

log = logging.getLogger(__name__)


def block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``-cubed blocks: the same resampling the pipeline applies before a model
    (:func:`bids_app.models.segment.block_mean`), so training and inference grids agree."""
    return model_grid_mean(data, (factor,) * 3)


def block_mode(classes: np.ndarray, factor: int) -> np.ndarray:
    """Most frequent value of every ``factor``-cubed block (ties: the smallest value)."""
    classes = pad_to_multiple(np.asarray(classes), factor)
    x, y, z = (s // factor for s in classes.shape)
    blocks = classes.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5).reshape(-1, factor**3)
    blocks = np.sort(blocks, axis=1)
    counts = (blocks[:, :, None] == blocks[:, None, :]).sum(axis=2)
    best = np.argmax(counts, axis=1)
    return blocks[np.arange(blocks.shape[0]), best].reshape(x, y, z)


def pad_to_multiple(data: np.ndarray, factor: int) -> np.ndarray:
    pad = [(0, (-s) % factor) for s in data.shape]
    return np.pad(data, pad) if any(p[1] for p in pad) else data


def block_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the block grid: block ``i`` is centred on fine voxel ``factor * i + (factor - 1) / 2``."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return affine @ scale


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


def _resample_nearest(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape) -> np.ndarray:
    vox = np.linalg.inv(affine) @ target_affine
    return ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=tuple(shape), order=0)


def _crop_box(mask: np.ndarray, margin: int, factor: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    # an extent that is a multiple of the block factor
    hi = np.minimum(lo + ((hi - lo + factor - 1) // factor) * factor, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _shift_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box]) + affine[:3, 3]
    return out


def prepare_oasis_case(t1w_path: Path, labels_path: Path, protocol: Protocol, source: str = "aparcNMMjt+aseg",
                       factor: int = 2, margin: int = 4) -> dict:
    """One real case: arrays of :mod:`this module's <bids_app.training.prepare>` real layout."""
    t1 = nib.load(str(t1w_path))
    lab = nib.load(str(labels_path))
    data = np.asarray(t1.dataobj, dtype=np.float32)
    labels = _resample_nearest(np.asarray(lab.dataobj).astype(np.int32), lab.affine, t1.affine, t1.shape)
    labels = map_labels(labels, load_mapping(source, protocol.name), unknown="zero")
    data, affine = _canonical(data, t1.affine)
    labels, _ = _canonical(labels, t1.affine)
    mask = data > 0
    box = _crop_box(mask | (labels > 0), margin, factor)
    data, labels, mask = data[box], labels[box], mask[box]
    affine = _shift_affine(affine, box)
    img1 = normalise_intensity(data, mask)
    classes = protocol.to_classes(labels)
    return {
        "img1": img1.astype(np.float16), "lab1": labels.astype(np.int16), "affine1": affine,
        "img2": block_mean(img1, factor).astype(np.float16), "cls2": block_mode(classes, factor).astype(np.uint8),
        "affine2": block_affine(affine, factor),
    }


def prepare_labelmap_case(path: Path, protocol: Protocol, source: str, factor: int = 2, margin: int = 4) -> dict:
    """One label-map case: generation classes + target class positions on the block grid."""
    img = nib.load(str(path))
    raw = np.asarray(img.dataobj).astype(np.int32)
    raw, affine = _canonical(raw, img.affine)
    box = _crop_box(raw > 0, margin, factor)
    raw = raw[box]
    affine = _shift_affine(affine, box)
    target = map_labels(raw, load_mapping(source, protocol.name), unknown="zero")
    values, gen = np.unique(raw, return_inverse=True)
    gen = gen.reshape(raw.shape)
    if values.size > 255:
        raise ValueError(f"{path}: more than 255 distinct labels")
    return {
        "gen2": block_mode(gen.astype(np.uint8), factor).astype(np.uint8),
        "cls2": block_mode(protocol.to_classes(target), factor).astype(np.uint8),
        "gen_values": values.astype(np.int32), "affine2": block_affine(affine, factor),
    }


def _save_npz(path: Path, arrays: dict) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def prepare(out_dir: Path, *, oasis: Path | None = None, mindboggle: Path | None = None,
            synthseg: Path | None = None, protocol: str = "dkt-aseg", factor: int = 2) -> dict:
    """Pack every source given into ``out_dir``; returns the index written to ``index.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = load_protocol(protocol)
    index = {"protocol": protocol, "voxel_size_mm": float(factor), "cases": []}

    def add(entry: dict) -> None:
        # the index is rewritten after every case, so a long packing can be used while it runs
        index["cases"].append(entry)
        with atomic_output(out_dir / "index.json") as tmp:
            Path(tmp).write_text(json.dumps(index, indent=1) + "\n")

    if oasis is not None:
        subjects = sorted(p for p in Path(oasis).glob("sub-*") if p.is_dir())
        for i, sub in enumerate(subjects, 1):
            label = sub.name
            t1w = sub / f"{label}_desc-brain_T1w.nii.gz"
            labels = sub / f"{label}_desc-aparcNMMjt+aseg_dseg.mgz"
            log.info("[%d/%d] OASIS-TRT-20 %s", i, len(subjects), label)
            _save_npz(out_dir / f"oasis-{label}.npz", prepare_oasis_case(t1w, labels, proto, factor=factor))
            add({"case": f"oasis-{label}", "subject": f"OASIS-TRT-20-{int(label[4:])}",
                                   "kind": "real", "source": "OASIS-TRT-20", "licence": "CC BY-NC-SA 3.0"})
    if mindboggle is not None:
        maps = sorted(Path(mindboggle).glob("*_aparcNMMjt+aseg.mgz"))
        for i, path in enumerate(maps, 1):
            name = path.name.replace("_aparcNMMjt+aseg.mgz", "")
            log.info("[%d/%d] Mindboggle-101 %s", i, len(maps), name)
            _save_npz(out_dir / f"mb-{name}.npz", prepare_labelmap_case(path, proto, "aparcNMMjt+aseg", factor))
            add({"case": f"mb-{name}", "subject": name, "kind": "labelmap",
                                   "source": "Mindboggle-101", "licence": "CC BY-NC-SA 3.0"})
    if synthseg is not None:
        if protocol != "aseg":
            log.warning("SynthSeg label maps have no cortical parcels; skipped for protocol %s", protocol)
        else:
            maps = sorted(Path(synthseg).glob("training_seg_*.nii.gz"))
            for i, path in enumerate(maps, 1):
                name = re.sub(r"\.nii\.gz$", "", path.name)
                log.info("[%d/%d] SynthSeg %s", i, len(maps), name)
                _save_npz(out_dir / f"ss-{name}.npz", prepare_labelmap_case(path, proto, "synthseg", factor))
                add({"case": f"ss-{name}", "subject": f"synthseg-{name}", "kind": "labelmap",
                                       "source": "SynthSeg training label maps", "licence": "Apache-2.0"})
    return index



#: the arrays a training run never reads: the 1 mm image, reference and affine of the evaluation
EVALUATION_ARRAYS = ("img1", "lab1", "affine1")


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def slim_packs(data: Path, out: Path, folders: list[str], *, init: list[Path] = (),
               max_mib: float | None = None) -> dict:
    """A training-only copy of packed folders, for a training machine that takes a small upload.

    Every ``data/<folder>`` (written by :func:`prepare`) is copied to ``out/<folder>`` without the
    arrays of :data:`EVALUATION_ARRAYS` (the cross-validation reads those where the packs were made,
    training does not). Every model of ``init`` (a manifest ``.json`` or its stem) is copied with its
    weights to ``out/init/<its manifest name>``, where a config's ``init_from`` finds it. With
    ``max_mib``, a copy larger than that is an error (a ``ValueError`` naming its size).

    Returns ``{"folders": {folder: cases}, "init": [names], "bytes": size of out}``.
    """
    import shutil

    from bids_app.models.checkpoint import _split_path, load_checkpoint

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        raise ValueError(f"{out}: the slim copy must be outside the packed data {data}")
    if not folders and not init:
        raise ValueError("nothing to copy: name packed folders and/or models to start from (init)")
    sources = []
    for folder in folders:
        index_path = data / folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no packed folder here (run `arborseg-train prepare` first)")
        sources.append((folder, json.loads(index_path.read_text())))
    models = []
    for path in init:
        manifest_path, weights_path = _split_path(path)
        if not manifest_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{path}: a model needs its manifest {manifest_path.name} and weights "
                                    f"{weights_path.name}")
        _, manifest = load_checkpoint(manifest_path)  # a damaged model fails here, not on the training machine
        models.append((manifest["name"], manifest_path, weights_path))
    names = [name for name, _, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models to start from share a name: {', '.join(sorted(names))}")

    summary: dict = {"folders": {}, "init": names}
    for folder, index in sources:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for entry in index["cases"]:
            stem = entry.get("file", entry["case"])
            with np.load(data / folder / f"{stem}.npz") as npz:
                arrays = {k: npz[k] for k in npz.files if k not in EVALUATION_ARRAYS}
            _save_npz(out / folder / f"{stem}.npz", arrays)
        with atomic_output(out / folder / "index.json") as tmp:  # last: a complete folder or none
            Path(tmp).write_text(json.dumps(index, indent=1) + "\n")
        summary["folders"][folder] = len(index["cases"])
        log.info("%s: %d cases copied without the 1 mm evaluation arrays", folder, len(index["cases"]))
    for name, manifest_path, weights_path in models:
        (out / "init").mkdir(parents=True, exist_ok=True)
        # the weights first: a manifest is only ever beside its weights
        with atomic_output(out / "init" / f"{name}.safetensors") as tmp:
            shutil.copyfile(weights_path, tmp)
        with atomic_output(out / "init" / f"{name}.json") as tmp:
            shutil.copyfile(manifest_path, tmp)
    summary["bytes"] = _tree_bytes(out)
    log.info("%s: %.1f MiB", out, summary["bytes"] / 2**20)
    if max_mib is not None and summary["bytes"] > max_mib * 2**20:
        raise ValueError(f"{out}: {summary['bytes'] / 2**20:.1f} MiB, more than the {max_mib:g} MiB allowed")
    return summary

def prepare_library_case(t1w: np.ndarray, lobules: np.ndarray, full: np.ndarray, affine: np.ndarray,
                         factor: int = 1, prior: np.ndarray | None = None) -> dict:
    """One cerebellum-library case (crop grid): the T1w, the lobule classes, the generation labels of
    its ``full`` label map (for synthetic images of the same anatomy) and optionally the atlas prior
    ``(13, X, Y, Z)`` (side-free lobule probabilities), all on the ``factor`` block grid."""
    protocol = load_protocol("lobules")
    values, gen = np.unique(np.asarray(full, dtype=np.int32), return_inverse=True)
    if values.size > 255:
        raise ValueError(f"more than 255 distinct labels in the full label map ({values.size})")
    gen = gen.reshape(full.shape).astype(np.uint8)
    out = {
        "img2": block_mean(np.asarray(t1w, np.float32), factor).astype(np.float16),
        "cls2": block_mode(protocol.to_classes(lobules), factor).astype(np.uint8),
        "gen2": block_mode(gen, factor).astype(np.uint8) if factor > 1 else gen,
        "gen_values": values.astype(np.int32), "affine2": block_affine(np.asarray(affine, float), factor),
    }
    if prior is not None:
        out["prior"] = np.stack([block_mean(np.asarray(p, np.float32), factor) for p in prior]).astype(np.float16)
    return out


def prepare_library(out_dir: Path, library_dir: Path, *, factor: int = 1, priors: Path | None = None) -> dict:
    """Pack a cerebellum library (``arborseg-build-library``) for training: one ``npz`` per case,
    listed twice in ``index.json``: as a real case and as a label-map (synthetic image) case.

    ``priors`` is a folder of ``<case>_prior.npy`` (leave-subject-out atlas priors, side-free
    13-class, crop grid), added as extra input channels when given.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .library import read_index

    library = read_index(Path(library_dir), need_full_maps=True)
    index = {"protocol": "lobules", "voxel_size_mm": float(factor), "cases": [],
             "library": str(library_dir), "prior": priors is not None}
    for i, entry in enumerate(library["cases"], 1):
        case = entry["case"]
        load = lambda key: nib.load(str(Path(library_dir) / entry[key]))  # noqa: E731
        t1 = load("t1w")
        prior = None
        if priors is not None:
            path = Path(priors) / f"{case}_prior.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no atlas prior for library case {case}")
            prior = np.load(path)
        arrays = prepare_library_case(np.asarray(t1.dataobj, np.float32), np.asarray(load("dseg").dataobj),
                                      np.asarray(load("full").dataobj), t1.affine, factor, prior)
        _save_npz(out_dir / f"{case}.npz", arrays)
        common = {"file": case, "subject": entry["subject"], "source": "ArborSeg cerebellum library (OASIS-TRT-20 "
                  "+ Park 2014 lobules)", "licence": "CC BY-NC-SA 4.0"}
        index["cases"].append({"case": case, "kind": "real", **common})
        index["cases"].append({"case": f"{case}-synth", "kind": "labelmap", **common})
        log.info("[%d/%d] packed %s", i, len(library["cases"]), case)
    with atomic_output(out_dir / "index.json") as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1) + "\n")
    return index


def kfold_subjects(subjects: list[str], k: int, seed: int) -> list[list[str]]:
    """Split sorted subject names into ``k`` folds of near-equal size (seeded shuffle)."""
    rng = np.random.default_rng(seed)
    order = sorted(set(subjects))
    rng.shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]
