"""Per-stage wall time and peak memory of ArborSeg's preprocessing on one T1w image.

Usage:
    python benchmarks/bench_preproc.py T1W [--templateflow-home DIR] [--threads N] [--cli BIDS_DIR LABEL]

Runs each stage's core function in sequence (the same functions the Nipype nodes call), samples
the process's resident memory every 20 ms and prints one line per stage plus the total. With
``--cli`` it also times the full ``arborseg`` participant run (graph, derivatives, reportlets)
on the same machine in the same invocation, as the end-to-end figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakRSS:
    """Peak resident set size (MB) while the ``with`` block runs."""

    def __enter__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("t1w", type=Path)
    parser.add_argument("--templateflow-home", type=Path, default=os.getenv("TEMPLATEFLOW_HOME"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cli", nargs=2, metavar=("BIDS_DIR", "LABEL"), help="also time the full arborseg run")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)

    import numpy as np

    from bids_app.config import PreprocConfig
    from bids_app.core import bias, conform, crop, denoise, images, intensity, masks, registration
    from bids_app.resources import resolve_template

    cfg = PreprocConfig()
    tpl = resolve_template("MNI152NLin6Asym", home=args.templateflow_home)
    import nibabel as nb

    target, reference, tmask = (nb.load(str(p)) for p in (tpl.target, tpl.reference, tpl.brain_mask))
    state: dict = {}
    rows: list[tuple[str, float, float]] = []

    def stage(name, fn):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        rows.append((name, seconds, mem.peak))
        print(f"{name:<26} {seconds:7.1f} s   peak RSS {mem.peak:7.0f} MB", flush=True)

    def s_load():
        state["img"], _ = images.load_anatomical(args.t1w)

    def s_conform():
        state["conf"] = conform.conform(state["img"], voxel_size=cfg.voxel_size, crop_margin_mm=cfg.crop_margin_mm)
        state["head"] = conform.head_mask(np.asarray(state["conf"].dataobj), zooms=images.zooms_of(state["conf"]))

    def s_denoise():
        state["den"] = denoise.denoise_nlm(state["conf"], mask=state["head"], patch_radius=cfg.denoise_patch_radius,
                                           search_radius=cfg.denoise_search_radius)

    n4kw = dict(shrink_factor=cfg.n4_shrink_factor, iterations=cfg.n4_iterations,
                spline_distance_mm=cfg.n4_spline_distance_mm, convergence=cfg.n4_convergence)

    def s_n4():
        state["n4"], _ = bias.n4_correct(state["den"], mask=state["head"], **n4kw)

    def s_register():
        state["tx"] = registration.register_affine(state["n4"], target)

    def s_masks():
        prior = registration.apply_transform(state["tx"], tmask, state["n4"], invert=True)
        state["icv"], state["brain"] = masks.brain_masks(np.asarray(state["n4"].dataobj), np.asarray(prior.dataobj),
                                                         zooms=images.zooms_of(state["n4"]))

    def s_n4_masked():
        state["n4b"], _ = bias.n4_correct(state["n4"], mask=state["icv"], **n4kw)

    def s_normalise():
        state["norm"] = images.like(state["n4b"], intensity.normalise_intensity(
            np.asarray(state["n4b"].dataobj), state["brain"], percentile=cfg.normalise_percentile))

    def s_template():
        state["mni"] = registration.apply_transform(state["tx"], state["norm"], reference, interpolation="bSpline")

    def s_crop():
        state["crop"] = crop.crop_box(state["mni"])

    for name, fn in [("load+validate", s_load), ("conform", s_conform), ("denoise (NLM)", s_denoise),
                     ("N4", s_n4), ("affine registration", s_register), ("ICV/brain masks", s_masks),
                     ("N4 inside ICV", s_n4_masked), ("intensity normalisation", s_normalise),
                     ("to template space", s_template), ("cerebellum crop", s_crop)]:
        stage(name, fn)
    total = sum(r[1] for r in rows)
    print(f"{'TOTAL core stages':<26} {total:7.1f} s   peak RSS {max(r[2] for r in rows):7.0f} MB")
    print(f"input {args.t1w.name}: {state['img'].shape} -> conformed {state['conf'].shape}, threads {args.threads}")

    # baseline in the same run: ANTs' default NLM search radius (2) instead of ArborSeg's (1)
    def s_baseline():
        state["den2"] = denoise.denoise_nlm(state["conf"], mask=state["head"], patch_radius=1, search_radius=2)

    stage("baseline: NLM r=2 (ANTs)", s_baseline)
    diff = np.abs(np.asarray(state["den2"].dataobj) - np.asarray(state["den"].dataobj))[state["head"]]
    rng = float(np.ptp(np.asarray(state["conf"].dataobj)[state["head"]]))
    print(f"NLM r=1 vs r=2: mean |difference| {diff.mean():.3f} ({100 * diff.mean() / rng:.2f}% of the range)")

    if args.cli:
        bids_dir, label = args.cli
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["arborseg", bids_dir, f"{tmp}/out", "participant", "--participant-label", label, "-w",
                   f"{tmp}/work", "--nprocs", str(args.threads), "--omp-nthreads", str(args.threads)]
            if args.templateflow_home:
                cmd += ["--templateflow-home", str(args.templateflow_home)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            print(f"{'arborseg participant (CLI)':<26} {seconds:7.1f} s   exit {proc.returncode}")
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
