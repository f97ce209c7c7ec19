"""Time of the whole-brain segmentation step (MC dropout) for one subject, with its baselines.

Usage:
    python benchmarks/bench_segment.py [IMAGE] [--models STEM ...] [--mc-samples 15] [--threads 2]
                                       [--device cpu|cuda|auto] [--parcellation] [--tta flip-shift]
                                       [--refinement intensity] [--fused]

``IMAGE`` is a conformed-like T1w brain (any NIfTI; it is conformed to 1 mm RAS, intensity-normalised
and masked where it is non-zero, the way the pipeline hands ``t1w_preproc`` to the segmentation
node); without it a procedural phantom brain is used. ``--models`` defaults to the installed
whole-brain ensemble (``--parcellation``: the installed parcellation models).

In the same run it prints, per configuration, the wall time of ``segment_volume`` (model grid,
MC sampling, upsampling to 1 mm, labels, QC) and the process's peak memory:

* ``1 pass``: one deterministic forward of the ensemble (``mc_samples=1``), the baseline;
* ``MC-N``: MC dropout alone, no test-time augmentation;
* ``MC-N + TTA``: the samples spread over the views of ``--tta`` (default the pipeline's, flip-shift);
* ``MC-N + TTA + intensity``: the pipeline's setting, the TTA run with the probabilities refined by
  ``--refinement`` (default the pipeline's, intensity) (goal: under 2 minutes on a 2-core CPU, 15 s
  on a GPU).

``--fused`` adds the pipeline's default when both ensembles run: the whole-brain and the
parcellation ensembles (the installed ones), unrefined, then fused and refined once
(:func:`bids_app.models.segment.fuse_parcellation`), against the two refined runs one after the
other (what the pipeline did before the fusion). Peak RSS is the process's peak so far.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_app.core.conform import conform  # noqa: E402
from bids_app.core.intensity import normalise_intensity  # noqa: E402
from bids_app.core.refinement import DEFAULT_REFINEMENT, REFINEMENTS  # noqa: E402
from bids_app.models.segment import (  # noqa: E402
    DEFAULT_TTA,
    TTA_VIEWS,
    default_parcellation_models,
    default_wholebrain_models,
    fuse_parcellation,
    segment_volume,
)

log = logging.getLogger("bench_segment")


def load_input(path: str | None) -> np.ndarray:
    if path is None:
        from bids_app.core.phantom import make_head_phantom

        img = make_head_phantom(seed=0, voxel_size=1.0)
    else:
        import nibabel as nib

        img = nib.load(path)
    data = np.asarray(conform(img, voxel_size=1.0).dataobj, dtype=np.float32)
    mask = data > 0.05 * np.percentile(data[data > 0], 99)
    return normalise_intensity(data, mask) * mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--parcellation", action="store_true")
    parser.add_argument("--mc-samples", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", default=DEFAULT_TTA, choices=list(TTA_VIEWS))
    parser.add_argument("--refinement", default=DEFAULT_REFINEMENT, choices=list(REFINEMENTS))
    parser.add_argument("--fused", action="store_true", help="also time the fused whole-brain + parcellation run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = args.models or (default_parcellation_models() if args.parcellation else default_wholebrain_models())
    if not models:
        print("no models installed", file=sys.stderr)
        return 1
    image = load_input(args.image)
    print(f"input {image.shape} (1 mm), {len(models)} member(s), device {args.device}, {args.threads} threads")
    runs = [("1 pass", 1, "none", "none"), (f"MC-{args.mc_samples}", args.mc_samples, "none", "none")]
    if args.tta != "none":
        runs.append((f"MC-{args.mc_samples} + TTA {args.tta}", args.mc_samples, args.tta, "none"))
    if args.refinement != "none":
        runs.append((f"MC-{args.mc_samples} + TTA {args.tta} + {args.refinement}", args.mc_samples, args.tta,
                     args.refinement))
    for label, n, tta, refinement in runs:
        t0 = time.perf_counter()
        result = segment_volume(image, models, mc_samples=n, num_threads=args.threads, device=args.device,
                                mask=image > 0, tta=tta, refinement=refinement)
        dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{label:>24}: {dt:7.1f} s   mean CV {result.mean_cv_percent:6.2f} %   peak RSS {peak:7.0f} MB   "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items() if isinstance(v, float))})")
    del result
    if args.fused:
        bench_fused(image, args)
    return 0


def bench_fused(image: np.ndarray, args) -> None:
    """Both installed ensembles: refined one after the other, then unrefined and fused (the pipeline's way)."""
    seg_models, parc_models = default_wholebrain_models(), default_parcellation_models()
    if not seg_models or not parc_models:
        print("--fused: the whole-brain and parcellation models must both be installed", file=sys.stderr)
        return
    common = dict(mc_samples=args.mc_samples, num_threads=args.threads, device=args.device, mask=image > 0,
                  tta=args.tta)
    t0 = time.perf_counter()
    for models in (seg_models, parc_models):
        segment_volume(image, models, refinement=args.refinement, **common)
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    seg = segment_volume(image, seg_models, refinement="none", **common)
    parc = segment_volume(image, parc_models, refinement="none", **common)
    fuse_parcellation(seg, parc, image, mask=image > 0, refinement=args.refinement)
    fused = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'both, separate':>24}: {separate:7.1f} s")
    print(f"{'both, fused':>24}: {fused:7.1f} s   peak RSS {peak:7.0f} MB   (fusion {seg.timings['fusion_s']:.1f} s, "
          f"of which refinement {seg.timings.get('refine_s', 0.0):.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
