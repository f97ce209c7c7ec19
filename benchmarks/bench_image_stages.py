"""Time of the super-resolution and T2-synthesis networks on one cerebellum crop (issue 6 speed goals).

Usage:
    python benchmarks/bench_image_stages.py [--crop CROP.nii.gz] [--threads 2] [--repeats 3] [--device cpu|cuda]

Without ``--crop`` a 128x88x88 phantom crop (the pipeline's crop size) is made in memory. For each
network the model load and every inference (``--repeats`` runs, the first one reported apart as the
warm-up) are timed, beside the baselines in the same run: trilinear and cubic B-spline
up-sampling (scipy) for the super-resolution, the per-tissue k-means mapping for the T2 synthesis.
Goals (issue 6): each network under 20 s per subject on the CPU, under 1 s on the GPU. The peak
resident memory of the process is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _phantom(shape=(128, 88, 88)) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    z, y, x = np.indices(shape)
    r = np.sqrt(((z - shape[0] / 2) / 55) ** 2 + ((y - shape[1] / 2) / 38) ** 2 + ((x - shape[2] / 2) / 38) ** 2)
    data = np.where(r < 1, 0.65, 0.0) + np.where(r < 0.6, 0.25, 0.0)
    data = ndimage.gaussian_filter(data + rng.normal(0, 0.02, shape) * (r < 1), 1.0)
    return (np.clip(data, 0, None) * (r < 1)).astype(np.float32)


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from bids_app.core.superres import interpolate
    from bids_app.models.imaging import default_image_model, load_image_model, superresolve, synthesise_t2
    from bids_app.training.image_eval import tissue_mapping

    torch.set_num_threads(args.threads)
    if args.crop:
        import nibabel as nib

        crop = np.asarray(nib.load(str(args.crop)).dataobj, dtype=np.float32)
    else:
        crop = _phantom()
    print(f"crop {crop.shape}, device {args.device}, threads {args.threads}, torch {torch.__version__}")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for task, run in (("superres", superresolve), ("t2synth", synthesise_t2)):
        path = default_image_model(task)
        if path is None:
            print(f"{task}: no installed model")
            continue
        t0 = time.perf_counter()
        model, manifest = load_image_model(path, task, device=args.device)
        load = time.perf_counter() - t0

        def once(model=model, run=run):
            run(model, crop, device=args.device)
            sync()

        first, rest = _time(once, args.repeats)
        rows.append((f"{task} network ({manifest['name']}, {manifest.get('n_parameters', 0)} parameters)", load, first,
                     float(np.median(rest))))
    t0 = time.perf_counter()
    for order, name in ((1, "trilinear"), (3, "cubic B-spline")):
        first, rest = _time(lambda o=order: interpolate(crop, 2, order=o), args.repeats)
        rows.append((f"superres baseline: {name} (scipy)", 0.0, first, float(np.median(rest))))
    stats = {t: {"t2": [v, 0.1]} for t, v in (("csf", 0.4), ("gm", 0.6), ("wm", 0.5))}
    first, rest = _time(lambda: tissue_mapping(crop, crop > 0, stats), args.repeats)
    rows.append(("t2synth baseline: per-tissue k-means mapping", 0.0, first, float(np.median(rest))))
    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  load s  first s  median s (of {args.repeats})")
    for name, load, first, median in rows:
        print(f"{name:<{width}}  {load:6.2f}  {first:7.2f}  {median:8.2f}")
    goal = 1.0 if args.device.startswith("cuda") else 20.0
    for name, load, first, median in rows:
        if "network" in name:
            print(f"goal < {goal:g} s per subject ({name.split(' ')[0]}): load + first run {load + first:.2f} s -> "
                  f"{'met' if load + first < goal else 'NOT met'}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
