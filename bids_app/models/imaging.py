"""Inference of the image-to-image networks of the cerebellum branch: x2 super-resolution and T2 synthesis.

Both work on the cerebellum crop of the template-space T1w (1 mm, normalised so that the 99th
percentile inside the brain is 1, zero outside the brain), the input of the cascade:

* :func:`superresolve` (manifest ``task: "superres"``, architecture ``srresnet``): the crop on a
  grid ``scale`` times finer (0.5 mm); the header comes from
  :func:`bids_app.core.superres.upsampled_affine`, so the image overlays the input exactly.
* :func:`synthesise_t2` (``task: "t2synth"``, a U-Net with one linear output channel): a T2w-like
  image on the crop grid, in units of the T2w's 99th brain percentile, zero outside the brain.

The whole crop goes through the network at once (no patches: the crop is small). Outputs are
written atomically (:func:`bids_app.core.files.save_atomic`). ``python -m
bids_app.models.imaging superres|t2synth IN OUT [--model STEM]`` runs one of them from the shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

import numpy as np

from ..core.superres import upsampled_affine
from .checkpoint import IMAGE_TASKS, ModelError, models_with_task

log = logging.getLogger(__name__)


def default_image_model(task: str, folder: str | os.PathLike | None = None) -> str | None:
    """Manifest path of the installed checkpoint for image ``task``, or ``None``.

    One model serves each image task: one in ``$ARBORSEG_MODELS_DIR`` (or ``folder``) overrides the
    shipped one (the last folder of :func:`bids_app.models.checkpoint.model_folders` that has one
    wins; inside a folder, the first by name).
    """
    from pathlib import Path

    from .checkpoint import model_folders

    if task not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {task!r} (known: {', '.join(IMAGE_TASKS)})")
    found = models_with_task(task, folder)
    for base in reversed(model_folders(folder)):
        mine = [p for p in found if Path(p).resolve().is_relative_to(base)]
        if mine:
            return sorted(mine)[0]
    return None


def load_image_model(path: str | os.PathLike, task: str, *, device: str = "cpu"):
    """``(model, manifest)`` of the checkpoint at ``path``; refuses a checkpoint made for another task."""
    from .checkpoint import load_checkpoint

    model, manifest = load_checkpoint(path, device=device)
    if manifest.get("task") != task:
        raise ModelError(f"{path}: the manifest's task is {manifest.get('task')!r}, not {task!r}")
    return model, manifest


def _run(model, data: np.ndarray, device: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None].to(device)
    with torch.inference_mode():
        return model(x)[0, 0].float().cpu().numpy()


def _pad_to(data: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[slice, ...]]:
    pads = [(0, (-n) % divisor) for n in data.shape]
    return np.pad(data, pads), tuple(slice(0, n) for n in data.shape)


def upsampled_support(data: np.ndarray, scale: int, device: str = "cpu") -> np.ndarray:
    """Where the trilinear up-sampling of ``data > 0`` by ``scale`` exceeds 0.5: the same grid and weights as
    :func:`bids_app.core.superres.interpolate` (order 1), computed by torch on ``device`` (the scipy version
    took as long as the network itself on a GPU)."""
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy((np.asarray(data) > 0).astype(np.float32))[None, None].to(device)
    with torch.inference_mode():
        up = F.interpolate(mask, scale_factor=float(scale), mode="trilinear", align_corners=False)
        return (up[0, 0] > 0.5).cpu().numpy()


def superresolve(model, data: np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """``data`` up-sampled by the model's scale; non-negative, zero where the trilinear up-sampling is zero."""
    out = _run(model, data, device)
    support = upsampled_support(data, model.scale, device)
    return (np.clip(out, 0.0, None) * support).astype(np.float32)


def synthesise_t2(model, t1w: np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """Synthetic T2w of a normalised T1w crop; zero outside the T1w's non-zero voxels."""
    padded, crop = _pad_to(np.asarray(t1w, dtype=np.float32), int(getattr(model, "size_divisor", 1)))
    out = _run(model, padded, device)[crop]
    return (np.clip(out, 0.0, None) * (np.asarray(t1w) > 0)).astype(np.float32)


def _save(data: np.ndarray, affine: np.ndarray, out_file: str | os.PathLike) -> str:
    import nibabel as nib

    from ..core.files import save_atomic

    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    return save_atomic(img, out_file)


def image_file(task: str, in_file: str | os.PathLike, out_file: str | os.PathLike, *,
               checkpoint: str | os.PathLike | None = None, device: str = "cpu") -> dict:
    """Run image ``task`` on the crop ``in_file``; writes ``out_file``; returns a summary (model, seconds, grid)."""
    import nibabel as nib

    checkpoint = checkpoint or default_image_model(task)
    if checkpoint is None:
        raise ModelError(f"no installed model for the image task {task!r} (bids_app/data/models/ or "
                         f"$ARBORSEG_MODELS_DIR)")
    try:
        img = nib.load(str(in_file))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ModelError(f"{in_file}: cannot read the input image ({exc})") from None
    if data.ndim != 3 or not np.isfinite(data).all():
        raise ModelError(f"{in_file}: expected a finite 3D image, got shape {data.shape}")
    model, manifest = load_image_model(checkpoint, task, device=device)
    t0 = time.perf_counter()
    if task == "superres":
        out = superresolve(model, data, device=device)
        affine = upsampled_affine(img.affine, model.scale)
    else:
        out = synthesise_t2(model, data, device=device)
        affine = img.affine
    seconds = time.perf_counter() - t0
    _save(out, affine, out_file)
    log.info("%s: %s -> %s (%s, %.1f s)", task, in_file, out_file, manifest["name"], seconds)
    return {"model": manifest["name"], "version": manifest["version"], "seconds": round(seconds, 2),
            "shape": list(out.shape), "voxel_size_mm": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_app.models.imaging", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=IMAGE_TASKS)
    parser.add_argument("in_file")
    parser.add_argument("out_file")
    parser.add_argument("--model", help="checkpoint stem or manifest (default: the installed one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = image_file(args.task, args.in_file, args.out_file, checkpoint=args.model, device=args.device)
    except ModelError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
