"""File-level runner of the image-to-image networks (super-resolution, T2 synthesis) for the Nipype interfaces.

:func:`image_task_files` resolves the checkpoint (the installed one by default, with an error that
names the option switching the stage off when none is installed), the device and the PyTorch
threads, calls :func:`bids_app.models.imaging.image_file` and writes its summary next to the image.
``python -m bids_app.models.image_files SPEC.json OUTPUTS.json`` runs it in a fresh Python process
(:class:`bids_app.interfaces.imaging.SuperResolution` / ``T2Synthesis`` do, like the segmentation
interfaces: PyTorch's OpenMP pool hangs in a process forked from one that already used it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from .checkpoint import IMAGE_TASKS, ModelError

#: what each task is called in messages, and the command-line option that switches it off
TASK_NAMES = {"superres": "super-resolution", "t2synth": "T2 synthesis"}
SWITCH_OFF = {"superres": "--no-superres", "t2synth": "--cerebellum-t2 real or none"}


def resolve_checkpoint(task: str, checkpoint: str | os.PathLike | None = None) -> str:
    """``checkpoint``, or the installed model of ``task``; a :class:`ModelError` naming the problem otherwise."""
    from .imaging import default_image_model

    if task not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {task!r} (known: {', '.join(IMAGE_TASKS)})")
    if checkpoint:
        return str(checkpoint)
    found = default_image_model(task)
    if found is None:
        raise ModelError(f"no {TASK_NAMES[task]} model is installed (a checkpoint whose manifest has \"task\": "
                         f"\"{task}\" in bids_app/data/models/ or $ARBORSEG_MODELS_DIR); install one, or switch the "
                         f"stage off with {SWITCH_OFF[task]}")
    return str(found)


def image_task_files(task: str, in_file: str, out_file: str, json_file: str, *, checkpoint: str | None = None,
                     device: str = "auto", num_threads: int | None = None) -> dict:
    """Run image ``task`` on ``in_file``; writes ``out_file`` and the summary ``json_file``; returns their paths
    and the summary (model, version, seconds, shape, voxel size, task, checkpoint, device)."""
    import torch

    from ..bids import atomic_write_json
    from .imaging import image_file
    from .predictor import resolve_device

    manifest = resolve_checkpoint(task, checkpoint)
    where = str(resolve_device(device))
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(max(int(num_threads), 1))
    try:
        summary = image_file(task, in_file, out_file, checkpoint=manifest, device=where)
    finally:
        torch.set_num_threads(previous)
    summary = {"task": task, **summary, "checkpoint": Path(manifest).name, "device": where,
               "input": Path(str(in_file)).name}
    atomic_write_json(Path(json_file), summary)
    return {"out_file": str(out_file), "out_json": str(json_file), "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bids_app.models.image_files SPEC.json OUTPUTS.json``; exit 1 with one line on failure."""
    from .segment_files import spec_main

    return spec_main(argv, "bids_app.models.image_files", image_task_files)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
