"""Training data and loop of the image-to-image networks of the cerebellum branch (issue 6).

* ``superres``: x2 super-resolution, self-supervised. High-resolution patches come from the
  library's 1 mm T1w crops (training subjects only) and from the sub-millimetre templates
  (MNI152 0.8 mm, ICBM 2009 0.737 mm, resampled to 0.5 mm in the cerebellum box); the input is
  :func:`bids_app.core.superres.degrade` of the patch (blur, thick slices, ``scale``-block mean,
  Rician noise). Loss: L1.
* ``t2synth``: T2w from T1w in the 1 mm crop. Real pairs: the MNI152NLin6Asym T1w/T2w brains and
  the SPM avg152 T1/T2 pair, right half of the crop only (the left half of the MNI152 pair is
  held out for evaluation); synthetic pairs: the library's label maps painted with per-tissue
  T1 and T2 intensities measured on those real pairs (:func:`tissue_intensities`). Loss: L1
  inside the brain.

Both write resumable ``state.safetensors`` checkpoints (:func:`bids_app.training.trainer.save_state`)
and a ``final`` ArborSeg checkpoint whose manifest says ``"task": "superres"`` / ``"t2synth"``.

    python -m bids_app.training.imagetasks superres RUN --library DIR --templates DIR [--iterations N]
    python -m bids_app.training.imagetasks t2synth RUN --library DIR --templateflow DIR --spm DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from bids_app.core.crop import CEREBELLUM_BOX_MM
from bids_app.core.intensity import normalise_intensity
from bids_app.core.resample import resample_to_grid
from bids_app.core.superres import degrade

log = logging.getLogger("arborseg.train")

#: the test subjects of fold 0 of the cerebellum cross-validation (kept out of every training set here)
FOLD0_TEST = ("OASIS-TRT-20-4", "OASIS-TRT-20-6", "OASIS-TRT-20-8", "OASIS-TRT-20-12", "OASIS-TRT-20-18")
#: tissue classes of the synthetic T2 pairs
TISSUES = ("csf", "gm", "wm")
TEMPLATE_T1W = "tpl-MNI152NLin6Asym_res-01_desc-brain_T1w.nii.gz"
LICENCE_SR = ("CC BY-NC-SA 4.0 (trained on OASIS-TRT-20 T1w crops, CC BY-NC-SA 3.0, and the MNI152 / ICBM 2009 "
              "templates)")
LICENCE_T2 = ("FSL/HCP template terms and GPL-2 (SPM avg152); label maps of OASIS-TRT-20 (CC BY-NC-SA 3.0): "
              "CC BY-NC-SA 4.0")


@dataclasses.dataclass
class ImageTaskConfig:
    """What :func:`fit` needs; ``name``/``iterations``/``log_every`` also drive the progress log."""

    name: str
    task: str
    iterations: int = 600
    batch_size: int = 2
    patch: int = 48
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 7
    log_every: int = 10
    checkpoint_every: int = 25
    model: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data


def box_grid(templateflow: Path, scale: int = 1) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the pipeline's cerebellum crop (the box cut from the 1 mm MNI152NLin6Asym grid,
    its axis order kept), or of the grid ``scale`` times finer."""
    from bids_app.core.crop import crop_box
    from bids_app.core.superres import upsampled_affine, upsampled_shape

    crop = crop_box(nib.load(str(templateflow / "tpl-MNI152NLin6Asym" / TEMPLATE_T1W)), CEREBELLUM_BOX_MM)
    return upsampled_shape(crop.shape, scale), upsampled_affine(crop.affine, scale)


def to_box(path: Path, grid, *, order: int = 3, mask: np.ndarray | None = None) -> np.ndarray:
    """``path`` (an MNI-space image) resampled onto ``grid`` (shape, affine); normalised to its 99th percentile."""
    img = nib.load(str(path))
    shape, affine = grid
    data = resample_to_grid(np.asarray(img.dataobj, dtype=np.float32), img.affine, shape, affine, order=order,
                            dtype=np.float32)
    data = np.clip(data, 0, None)
    inside = (data > 0) if mask is None else mask
    out = normalise_intensity(data, inside)
    return out if mask is None else out * mask


def library_cases(library: Path, exclude_subjects: Sequence[str]) -> list[dict]:
    meta = json.loads((library / "library.json").read_text())
    return [c for c in meta["cases"] if c["subject"] not in set(exclude_subjects)]


def sr_sources(library: Path, templates_extra: Path | None, templateflow: Path,
               exclude_subjects: Sequence[str] = FOLD0_TEST) -> list[tuple[str, np.ndarray]]:
    """High-resolution training images: library T1w crops (1 mm) and sub-millimetre templates (0.5 mm)."""
    out = []
    for case in library_cases(library, exclude_subjects):
        out.append((case["case"], np.asarray(nib.load(str(library / case["t1w"])).dataobj, np.float32)))
    out.append(("MNI152NLin6Asym-1mm", to_box(templateflow / "tpl-MNI152NLin6Asym" / TEMPLATE_T1W,
                                              box_grid(templateflow))))
    if templates_extra is not None:
        for name, rel in (("MNI152-0.8mm", "hcp-mni152/MNI152_T1_0.8mm_brain.nii.gz"),
                          ("ICBM2009-0.737mm", "icbm2009-0.737mm/spm152.nii.gz")):
            if (templates_extra / rel).is_file():
                out.append((name + "@0.5mm", to_box(templates_extra / rel, box_grid(templateflow, 2))))
    log.info("super-resolution sources: %s", ", ".join(n for n, _ in out))
    return out


def _foreground_corner(volume: np.ndarray, patch: Sequence[int], rng: np.random.Generator, tries: int = 20):
    best, best_fill = None, -1.0
    for _ in range(tries):
        corner = [int(rng.integers(0, max(1, s - p + 1))) for s, p in zip(volume.shape, patch)]
        sl = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        fill = float((volume[sl] > 0.05).mean())
        if fill > best_fill:
            best, best_fill = sl, fill
        if fill > 0.3:
            break
    return best


def _random_flip(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    for axis in range(3):
        if rng.random() < 0.5:
            arrays = [np.flip(a, axis) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]


def sr_batch(sources, rng: np.random.Generator, batch: int, patch: int, scale: int):
    lows, highs = [], []
    for _ in range(batch):
        _, vol = sources[int(rng.integers(len(sources)))]
        sl = _foreground_corner(vol, [patch] * 3, rng)
        (hr,) = _random_flip([vol[sl]], rng)
        lows.append(degrade(hr, scale, rng))
        highs.append(hr)
    return np.stack(lows)[:, None], np.stack(highs)[:, None]


def kmeans_tissues(t1: np.ndarray, mask: np.ndarray, iterations: int = 30) -> np.ndarray:
    """3-class k-means of the T1w intensities inside ``mask``: 0 outside, 1 CSF, 2 GM, 3 WM (dark to bright)."""
    values = t1[mask].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        new = np.array([values[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    out = np.zeros(t1.shape, np.uint8)
    out[mask] = 1 + np.argmin(np.abs(values[:, None] - np.sort(centres)[None]), axis=1)
    return out


def tissue_intensities(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Per-tissue mean and SD of T1 and T2 on real pairs ``(t1, t2, mask)`` (k-means tissue classes of the T1)."""
    stats: dict = {}
    for k, tissue in enumerate(TISSUES, start=1):
        t1s, t2s = [], []
        for t1, t2, mask in pairs:
            cls = kmeans_tissues(t1, mask)
            t1s.append(t1[cls == k])
            t2s.append(t2[cls == k])
        a, b = np.concatenate(t1s), np.concatenate(t2s)
        stats[tissue] = {"t1": [float(a.mean()), float(a.std())], "t2": [float(b.mean()), float(b.std())]}
    return stats


#: aseg labels by tissue (everything else inside the brain, incl. the DKT cortical labels, is grey matter)
_CSF_LABELS = (4, 5, 14, 15, 24, 43, 44, 72)
_WM_LABELS = (2, 41, 7, 46, 16, 28, 60, 192, 251, 252, 253, 254, 255)
_DEEP_GM = (10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58)


def tissue_map(full: np.ndarray, lobules: np.ndarray) -> np.ndarray:
    """0 background, 1 CSF, 2 GM, 3 WM, 4 deep GM of a library case (lobule map first: 13/113 are WM)."""
    out = np.where(full > 0, 2, 0).astype(np.uint8)
    out[np.isin(full, _CSF_LABELS)] = 1
    out[np.isin(full, _WM_LABELS)] = 3
    out[np.isin(full, _DEEP_GM)] = 4
    lob = lobules > 0
    out[lob] = np.where(np.isin(lobules[lob], (13, 113)), 3, 2)
    return out


def synthetic_pair(tissue: np.ndarray, stats: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A T1w/T2w pair painted from a tissue map with intensities drawn around the measured ones."""
    from scipy import ndimage

    t1 = np.zeros(tissue.shape, np.float32)
    t2 = np.zeros(tissue.shape, np.float32)
    means = {1: stats["csf"], 2: stats["gm"], 3: stats["wm"]}
    means[4] = {m: [0.5 * (stats["gm"][m][0] + stats["wm"][m][0]), stats["gm"][m][1]] for m in ("t1", "t2")}
    for k, st in means.items():
        z = rng.normal(0, 0.5)
        sel = tissue == k
        t1[sel] = st["t1"][0] + z * 0.3 * st["t1"][1] + rng.normal(0, 0.5 * st["t1"][1], int(sel.sum()))
        t2[sel] = st["t2"][0] + z * 0.3 * st["t2"][1] + rng.normal(0, 0.5 * st["t2"][1], int(sel.sum()))
    sigma = float(rng.uniform(0.5, 1.0))
    brain = tissue > 0
    t1 = np.clip(ndimage.gaussian_filter(t1, sigma), 0, None) * brain
    t2 = np.clip(ndimage.gaussian_filter(t2, sigma), 0, None) * brain
    return t1.astype(np.float32), t2.astype(np.float32)


@dataclasses.dataclass
class T2Data:
    real: list  # (name, t1, t2, weight mask)
    tissues: list  # tissue maps of the library training cases
    stats: dict


def t2_real_pairs(templateflow: Path, spm: Path | None) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The real T1w/T2w pairs in the 1 mm box (brain-masked, each normalised to its 99th percentile)."""
    tpl = templateflow / "tpl-MNI152NLin6Asym"
    grid = box_grid(templateflow)
    mimg = nib.load(str(tpl / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"))
    mask = resample_to_grid(np.asarray(mimg.dataobj), mimg.affine, grid[0], grid[1], order=0) > 0
    pairs = [("MNI152NLin6Asym", to_box(tpl / TEMPLATE_T1W, grid, mask=mask),
              to_box(tpl / "tpl-MNI152NLin6Asym_res-01_desc-brain_T2w.nii.gz", grid, mask=mask), mask)]
    if spm is not None and (spm / "avg152T1.nii.gz").is_file():
        pairs.append(("avg152", to_box(spm / "avg152T1.nii.gz", grid, mask=mask),
                      to_box(spm / "avg152T2.nii.gz", grid, mask=mask), mask))
    return pairs


def left_half(affine: np.ndarray, shape) -> np.ndarray:
    """Boolean mask of the voxels with world x < 0 (the held-out half of the real template pairs)."""
    ijk = np.indices(tuple(shape)).reshape(3, -1)
    x = (affine[0, :3] @ ijk) + affine[0, 3]
    return (x < 0).reshape(tuple(shape))


def t2_data(library: Path, templateflow: Path, spm: Path | None,
            exclude_subjects: Sequence[str] = FOLD0_TEST) -> T2Data:
    shape, affine = box_grid(templateflow)
    held = left_half(affine, shape)
    real = [(n, t1, t2, m & ~held) for n, t1, t2, m in t2_real_pairs(templateflow, spm)]
    stats = tissue_intensities([(t1, t2, m) for _, t1, t2, m in real])
    from .library import read_index

    read_index(library, need_full_maps=True)
    tissues = []
    for case in library_cases(library, exclude_subjects):
        full = np.asarray(nib.load(str(library / case["full"])).dataobj)
        lob = np.asarray(nib.load(str(library / case["dseg"])).dataobj)
        tissues.append(tissue_map(full, lob))
    log.info("T2 synthesis: %d real pairs (right half), %d label maps; tissue intensities %s", len(real),
             len(tissues), json.dumps(stats))
    return T2Data(real, tissues, stats)


def t2_batch(data: T2Data, rng: np.random.Generator, batch: int, patch: int, real_fraction: float = 0.6):
    xs, ys, ws = [], [], []
    for _ in range(batch):
        if rng.random() < real_fraction:
            _, t1, t2, weight = data.real[int(rng.integers(len(data.real)))]
        else:
            tissue = data.tissues[int(rng.integers(len(data.tissues)))]
            t1, t2 = synthetic_pair(tissue, data.stats, rng)
            weight = tissue > 0
        sl = _foreground_corner(weight.astype(np.float32), [patch] * 3, rng)
        a, b, w = _random_flip([t1[sl], t2[sl], weight[sl]], rng)
        # T1 contrast / scale jitter (the input only: the target keeps its scale)
        a = np.clip(a, 0, None) ** float(np.exp(rng.normal(0, 0.1))) * float(rng.uniform(0.9, 1.1))
        a = a + rng.normal(0, float(rng.uniform(0, 0.02)), a.shape).astype(np.float32) * (a > 0)
        xs.append(a.astype(np.float32))
        ys.append(b.astype(np.float32))
        ws.append(w.astype(np.float32))
    return np.stack(xs)[:, None], np.stack(ys)[:, None], np.stack(ws)[:, None]


# --------------------------------------------------------------------------- loop


def build_model(cfg: ImageTaskConfig):
    from bids_app.models.registry import build

    if cfg.task == "superres":
        return build("srresnet", **cfg.model)
    return build("unet", **cfg.model)


def fit(cfg: ImageTaskConfig, run_dir: Path, sample, *, device: str = "cpu", resume: bool = True) -> Path:
    """Train with ``sample(rng) -> batch`` arrays; writes ``state.*`` as it goes and ``final.*`` at the end."""
    import torch

    from bids_app.training.trainer import _Progress, load_state, save_state

    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if resume and (run_dir / "state.safetensors").is_file():
        start, history = load_state(run_dir, model, opt, gen)
        log.info("%s: resumed at iteration %d", cfg.name, start)
    rng = np.random.default_rng([cfg.seed, start])
    progress = _Progress(cfg, "l1", history)
    model.train()
    for it in range(start + 1, cfg.iterations + 1):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / cfg.iterations))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [torch.from_numpy(a).to(device) for a in sample(rng)]
        pred = model(batch[0])
        if len(batch) == 3:  # weighted (T2 synthesis: inside the brain)
            loss = (torch.abs(pred - batch[1]) * batch[2]).sum() / batch[2].sum().clamp_min(1.0)
        else:
            loss = torch.abs(pred - batch[1]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.step(it, float(loss.item()), float(loss.item()), lr)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save_state(run_dir, model, opt, gen, it, history, cfg)
    return model, history


def export(model, stem: Path, cfg: ImageTaskConfig, *, data: str, licence: str, history: list,
           metrics: dict | None = None, dtype: str = "float16") -> dict:
    """The trained network as an ArborSeg checkpoint with an image-task manifest."""
    from bids_app.models.checkpoint import save_checkpoint

    model.eval()
    out_name = "T1w" if cfg.task == "superres" else "T2w"
    fields = {
        "name": cfg.name, "version": "0.1.0", "task": cfg.task, "label_protocol": None,
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}],
        "output_channels": [{"name": out_name, "normalisation": "percentile99"}],
        "voxel_size_mm": 1.0,
        "crop": {"space": "MNI152NLin6Asym", "box_mm": [list(b) for b in CEREBELLUM_BOX_MM]},
        "training": {"data": data, "licence": licence, "seed": cfg.seed, "iterations": cfg.iterations,
                     "batch_size": cfg.batch_size, "patch": cfg.patch, "final_l1": history[-1]["loss"] if history
                     else None, "held_out_subjects": list(FOLD0_TEST)},
        "metrics": metrics or {},
    }
    if cfg.task == "superres":
        fields["scale"] = int(cfg.model.get("scale", 2))
    return save_checkpoint(model, stem, fields, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_app.training.imagetasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("superres", "t2synth"))
    parser.add_argument("run", type=Path)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--templateflow", type=Path, help="TemplateFlow home (tpl-MNI152NLin6Asym)")
    parser.add_argument("--templates-extra", type=Path, help="../shared/data/templates-extra")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--export", type=Path, help="write the final checkpoint to this stem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "superres":
        cfg = ImageTaskConfig(name="cerebellum-superres-x2", task="superres", iterations=600, batch_size=4, patch=48,
                              lr=1e-3, model={"in_channels": 1, "scale": 2, "width": 24, "n_blocks": 4})
        sources = sr_sources(args.library, args.templates_extra, args.templateflow)
        data = ("ArborSeg cerebellum library T1w crops (OASIS-TRT-20, fold-0 test subjects held out), "
                "MNI152NLin6Asym 1 mm, MNI152 0.8 mm, ICBM 2009 0.737 mm (0.5 mm)")
        licence = LICENCE_SR
    else:
        cfg = ImageTaskConfig(name="cerebellum-t2synth", task="t2synth", iterations=600, batch_size=2, patch=64,
                              lr=2e-3, model={"in_channels": 1, "n_classes": 1, "base_filters": 16, "depth": 3,
                                              "dropout": 0.0})
        spm = args.templates_extra / "spm12" if args.templates_extra else None
        tdata = t2_data(args.library, args.templateflow, spm)
        data = ("real pairs: MNI152NLin6Asym T1w/T2w and SPM avg152 T1/T2 (right half of the crop); synthetic pairs "
                "from the ArborSeg cerebellum library label maps (fold-0 test subjects held out)")
        licence = LICENCE_T2
    if args.iterations:
        cfg.iterations = args.iterations
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if cfg.task == "superres":
        def sample(rng):
            return sr_batch(sources, rng, cfg.batch_size, cfg.patch, cfg.model["scale"])
    else:
        (args.run).mkdir(parents=True, exist_ok=True)
        (args.run / "tissue_intensities.json").write_text(json.dumps(tdata.stats, indent=1) + "\n")

        def sample(rng):
            return t2_batch(tdata, rng, cfg.batch_size, cfg.patch)
    t0 = time.time()
    model, history = fit(cfg, args.run, sample, device=args.device)
    log.info("%s: trained in %.0f s", cfg.name, time.time() - t0)
    stem = args.export or (args.run / "final")
    export(model, stem, cfg, data=data, licence=licence, history=history)
    log.info("wrote %s", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
