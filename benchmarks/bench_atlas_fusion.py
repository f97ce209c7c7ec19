"""Per-stage time (and quality) of the atlas prior: load, selection, registrations, label warping, fusion, write.

Usage:
    python benchmarks/bench_atlas_fusion.py [--library DIR] [--targets K | --target-file CROP]
        [--n 2 4 6 8] [--presets fast balanced] [--threads 2] [--budget 60]

``--library`` defaults to /work/_lib/cerebellum (or $ARBORSEG_LIBRARY_DIR) when it holds a
``library.json``; otherwise a synthetic library (``--synthetic-subjects`` subjects, each with its
mirrored twin, 128x88x88) is built in a temporary folder, so the benchmark always runs.

Targets: by default the first ``--targets`` library cases (not mirrored), each with its subject
left out (its mirrored twin too), so the Dice of the prior's argmax against the case's own labels
is a leave-subject-out quality figure; ``--target-file`` times a crop of your own (no Dice).

For each target and SyN preset the ``max(--n)`` closest cases are registered once (wall and CPU
seconds each); every N of ``--n`` then uses the first N of them (the selection is ordered), so the
stage time for N is load + selection + the first N registrations and label warps + fusion + write.
The vectorised fusion is compared in the same run with a naive baseline (a Python loop over the
voxels, timed on ``--naive-voxels`` voxels and extrapolated; and a per-class numpy loop), and its
output checked against both. Finally the defaults (``DEFAULT_N``, ``DEFAULT_PRESET``) are run end
to end through :func:`bids_app.atlas_library.atlas_prior_file` and the largest N per preset that
fits ``--budget`` seconds is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LIBRARY = "/work/_lib/cerebellum"


def _dice(a, b) -> float:
    import numpy as np

    values = [v for v in np.unique(b) if v != 0]
    scores = [2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in values]
    return float(np.mean(scores)) if scores else float("nan")


def _per_class_fusion(target, images, labels, values, d, scale):
    """The straightforward numpy version: one boolean mask per class and atlas (K x N passes)."""
    import numpy as np

    probs = np.zeros((len(values),) + target.shape, np.float32)
    wsum = np.zeros(target.shape, np.float32)
    for img in images:
        wsum += 1.0 / (1.0 + d * np.abs(scale * target - scale * img))
    for k, v in enumerate(values):
        for img, lab in zip(images, labels):
            w = 1.0 / (1.0 + d * np.abs(scale * target - scale * img))
            probs[k] += w * (lab == v)
    return probs / wsum


def _timed(fn, *args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, default=None)
    parser.add_argument("--targets", type=int, default=1, help="library cases used as targets (leave-subject-out)")
    parser.add_argument("--target-file", type=Path, help="a cerebellum crop of your own as the target")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--presets", nargs="+", default=None, help="SyN presets (default: the default preset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds allowed for the whole stage")
    parser.add_argument("--label-interpolation", default="genericLabel")
    parser.add_argument("--naive-voxels", type=int, default=20000)
    parser.add_argument("--synthetic-subjects", type=int, default=15)
    parser.add_argument("--d-sweep", type=float, nargs="*", default=[0.0, 0.005, 0.05, 0.5, 2.0],
                        help="d values whose prior Dice is reported at the largest N (library targets)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the run of atlas_prior_file")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # before ITK starts

    import nibabel as nb
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bids_app import atlas_library as al
    from bids_app.core import atlas_fusion as af
    from bids_app.core.images import new_image
    from bids_app.core.labels import load_protocol

    presets = args.presets or [af.DEFAULT_PRESET]
    ns = sorted(set(args.n))
    tmp = Path(tempfile.mkdtemp(prefix="bench-atlas-"))
    library_dir = args.library or Path(os.getenv("ARBORSEG_LIBRARY_DIR") or DEFAULT_LIBRARY)
    if not (al.library_json_path(library_dir)).is_file():
        t = time.perf_counter()
        print(f"no library at {library_dir}: building a synthetic one ({args.synthetic_subjects} subjects x 2, "
              f"128x88x88) in {tmp / 'library'}", flush=True)
        library_dir = al.write_synthetic_library(tmp / "library", subjects=args.synthetic_subjects,
                                                 shape=(128, 88, 88))
        print(f"  built in {time.perf_counter() - t:.1f} s")
    print(f"library {library_dir}; {args.threads} ITK threads; presets {presets}; N {ns}; "
          f"label interpolation {args.label_interpolation}; CPUs here {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # ---------------------------------------------------------------- load
    (library, t_hdr, _) = _timed(al.read_library, library_dir)
    t = time.perf_counter()
    for c in library.cases:
        c.image  # noqa: B018 - what the selection reads
    t_img = time.perf_counter() - t
    values = load_protocol(library.protocol).indices
    print(f"load: headers {t_hdr:.2f} s, {len(library)} images {t_img:.2f} s "
          f"({t_img / len(library):.3f} s each)")

    if args.target_file:
        img = nb.load(str(args.target_file))
        targets = [("file", new_image(np.asarray(img.dataobj, np.float32), img.affine), None, [])]
    else:
        real = [c for c in library.cases if not c.mirrored][: args.targets]
        targets = [(c.case, new_image(c.image, library.affine), c, [c.subject]) for c in real]

    rows = []  # (preset, N, total, dice)
    fusion_checked = False
    for name, timg, tcase, exclude in targets:
        target = np.asarray(timg.dataobj, np.float32)
        candidates = library.subset(exclude_subjects=exclude)
        (sel, t_sel, _) = _timed(af.select_similar, target, [c.image for c in candidates], max(ns))
        chosen = [candidates[i] for i in sel[0]]
        truth = tcase.labels if tcase is not None else None
        print(f"\ntarget {name}: {len(candidates)} candidates, selection {t_sel:.3f} s; closest "
              + ", ".join(f"{c.case} ({d:.4f})" for c, d in zip(chosen, sel[1])))
        if truth is not None:
            print(f"  unregistered closest case: Dice {_dice(chosen[0].labels, truth):.3f}")
        for preset in presets:
            warped, wlabels, reg_wall, reg_cpu, lab_wall = [], [], [], [], []
            for c in chosen:
                moving = new_image(c.image, library.affine)
                labels = new_image(c.labels.astype(np.float32), library.affine)
                reg, wall, cpu = _timed(af.register_nonlinear, timg, moving, moving_labels=labels,
                                        label_interpolation=args.label_interpolation, preset=preset)
                warped.append(np.asarray(reg.warped.dataobj, np.float32))
                wlabels.append(np.rint(np.asarray(reg.warped_labels.dataobj)).astype(np.int16))
                reg_wall.append(wall - reg.label_seconds)
                reg_cpu.append(cpu)
                lab_wall.append(reg.label_seconds)
                extra = f", Dice {_dice(wlabels[-1], truth):.3f}" if truth is not None else ""
                print(f"  [{preset}] {c.case}: registration {reg_wall[-1]:.1f} s wall / {cpu:.1f} s CPU, "
                      f"labels {reg.label_seconds:.2f} s{extra}", flush=True)
            for n in ns:
                if n > len(chosen):
                    continue
                probs, t_fuse, _ = _timed(af.fuse_weighted, target, warped[:n], wlabels[:n], values)
                dice = _dice(np.asarray(values)[probs.argmax(0)], truth) if truth is not None else float("nan")
                total = t_hdr + t_img + t_sel + sum(reg_wall[:n]) + sum(lab_wall[:n]) + t_fuse
                rows.append((preset, n, total, dice, sum(reg_cpu[:n])))
                print(f"  [{preset}] N={n:2d}: registrations {sum(reg_wall[:n]):6.1f} s "
                      f"(CPU {sum(reg_cpu[:n]):6.1f} s), labels {sum(lab_wall[:n]):4.1f} s, fusion {t_fuse:.2f} s "
                      f"-> stage {total:6.1f} s"
                      + (f", prior Dice {dice:.3f}" if truth is not None else ""), flush=True)
            if truth is not None and args.d_sweep:
                n = min(max(ns), len(warped))
                scores = []
                for d in args.d_sweep:
                    probs = af.fuse_weighted(target, warped[:n], wlabels[:n], values, d=d)
                    scores.append(f"d={d:g}: {_dice(np.asarray(values)[probs.argmax(0)], truth):.3f}")
                print(f"  [{preset}] N={n}, Dice against d (scale {af.DEFAULT_SCALE:g}; d=0 is a plain vote): "
                      + ", ".join(scores))
            if not fusion_checked:
                fusion_checked = True
                n = min(max(ns), len(warped))
                probs, t_vec, _ = _timed(af.fuse_weighted, target, warped[:n], wlabels[:n], values)
                rng = np.random.default_rng(0)
                vox = rng.choice(target.size, min(args.naive_voxels, target.size), replace=False)
                naive, t_naive, _ = _timed(af.fuse_weighted_naive, target, warped[:n], wlabels[:n], values,
                                           voxels=vox)
                per_class, t_pc, _ = _timed(_per_class_fusion, target, warped[:n], wlabels[:n], values,
                                            af.DEFAULT_D, af.DEFAULT_SCALE)
                err = float(np.abs(probs.reshape(len(values), -1)[:, vox] - naive).max())
                err_pc = float(np.abs(probs - per_class).max())
                naive_full = t_naive * target.size / len(vox)
                print(f"\nfusion of N={n} ({len(values)} labels, {target.size} voxels): vectorised {t_vec:.2f} s; "
                      f"per-class numpy {t_pc:.2f} s ({t_pc / t_vec:.0f}x); naive Python loop {t_naive:.2f} s on "
                      f"{len(vox)} voxels -> {naive_full:.0f} s for the volume ({naive_full / t_vec:.0f}x); "
                      f"max |difference| {err:.1e} (naive), {err_pc:.1e} (per-class)")
                res = af.AtlasPriorResult(probs, tuple(values), library.protocol, [], [], [], 0, [], {}, [], {})
                for storage in ("uint8", "float32"):
                    _, t_w, _ = _timed(al.save_prior, res, library.affine, tmp / f"prior_{storage}.nii.gz",
                                       storage=storage)
                    size = (tmp / f"prior_{storage}.nii.gz").stat().st_size / 2**20
                    print(f"write 4D prior as {storage}: {t_w:.2f} s, {size:.1f} MiB")
                print(flush=True)

    print(f"\nsummary (mean over {len(targets)} target(s)); budget {args.budget:.0f} s with {args.threads} threads")
    best = {}
    for preset in presets:
        for n in ns:
            sel = [r for r in rows if r[0] == preset and r[1] == n]
            if not sel:
                continue
            total = float(np.mean([r[2] for r in sel]))
            dice = float(np.mean([r[3] for r in sel]))
            cpu = float(np.mean([r[4] for r in sel]))
            ok = total <= args.budget
            print(f"  {preset:>12} N={n:2d}: stage {total:6.1f} s (registration CPU {cpu:6.1f} s)"
                  + (f", prior Dice {dice:.3f}" if not np.isnan(dice) else "") + ("" if ok else "  > budget"))
            if ok:
                best[preset] = n
    for preset, n in best.items():
        print(f"  largest N within {args.budget:.0f} s for preset {preset}: {n}")

    if not args.no_end_to_end:
        name, timg, tcase, exclude = targets[0]
        crop = tmp / "target_crop.nii.gz"
        nb.save(timg, str(crop))
        t = time.perf_counter()
        out, sidecar = al.atlas_prior_file(crop, library_dir, out_file=tmp / "prior.nii.gz",
                                           exclude_subjects=exclude)
        import json

        meta = json.loads(Path(sidecar).read_text())
        print(f"\nend to end (atlas_prior_file, defaults N={af.DEFAULT_N}, preset {af.DEFAULT_PRESET}) on {name}: "
              f"{time.perf_counter() - t:.1f} s; stages " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                      meta["timings_s"].items()))
        if tcase is not None:
            prior = np.asarray(nb.load(out).dataobj, np.float32)
            labels = np.asarray(values)[prior.argmax(-1)]
            print(f"  prior Dice (leave-subject-out) {_dice(labels, tcase.labels):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
