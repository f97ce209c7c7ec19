"""Evaluation of the super-resolution and T2-synthesis networks, and the ablation of both stages.

``superres``: the held-out library subjects' 1 mm crops are degraded to 2 mm
(:func:`bids_app.core.superres.degrade` with fixed settings, one "clean" box-average and one
"realistic" with blur and noise), restored to 1 mm by trilinear and cubic B-spline interpolation
and by the network, and scored inside the brain with PSNR and SSIM against the 1 mm original; each
restored image is then segmented by the shipped cerebellum cascade (no prior) and its lobule Dice
against the library's silver labels is set beside the Dice on the original 1 mm image.

``t2synth``: the network's T2w against a per-tissue intensity mapping baseline (3-class k-means
tissues of the test T1w, each given the mean T2w of that tissue on the training pairs) on held-out
real pairs: the left half of the MNI152 T1w/T2w crop (training saw only the right half) and the
BraTS-Metastases subject ``bratsmet110`` of ``bids-realworld`` (affinely registered to the
template, tumour excluded with a FLAIR-hyperintensity mask): MAE, PSNR, SSIM inside the brain.

``ablation`` (DeepCERES Tables 4 and 10, with ArborSeg's atlas fusion as the segmenter, because the
shipped lobule networks are trained at 1 mm on T1w only): leave-subject-out fusion of the N most
similar library atlases, with the intensity weights computed (a) on the native 1 mm T1w, (b) on
the 0.5 mm super-resolved T1w (target and warped atlases; labels up-sampled by nearest neighbour,
probabilities block-averaged back to 1 mm), (c) on a trilinear 0.5 mm grid (the same without the
network), (d) on T1w + synthetic T2w (1 mm). No labelled subject has a real T2w, so the real-T2w
arm cannot be scored.

    python -m bids_app.training.image_eval superres --library DIR --out DIR
    python -m bids_app.training.image_eval t2synth --templateflow DIR --templates-extra DIR --bids DIR --out DIR
    python -m bids_app.training.image_eval ablation --library DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from bids_app.atomic import atomic_output
from bids_app.core.image_quality import correlation, mae, psnr, ssim
from bids_app.core.superres import block_mean, degrade, interpolate

from .imagetasks import FOLD0_TEST, kmeans_tissues

log = logging.getLogger(__name__)

#: fixed degradations of the 2 mm -> 1 mm test: (name, degrade() keyword arguments)
SR_SETTINGS = (
    ("clean", {"blur_sigma": (0.0, 0.0), "thick_slice_probability": 0.0, "noise_std": (0.0, 0.0)}),
    ("realistic", {"blur_sigma": (0.5, 0.5), "thick_slice_probability": 0.0, "noise_std": (0.02, 0.02)}),
)


def _write(out_dir: Path, name: str, payload) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / name) as tmp:
        Path(tmp).write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=1) + "\n")


def _summary(rows: list[dict], keys: Sequence[str], group: Sequence[str]) -> dict:
    out: dict = {}
    for row in rows:
        key = " / ".join(str(row[g]) for g in group)
        out.setdefault(key, []).append(row)
    return {k: {m: {"mean": float(np.nanmean([r[m] for r in v])), "std": float(np.nanstd([r[m] for r in v])),
                    "n": len(v)} for m in keys if m in v[0]} for k, v in out.items()}


def _tsv(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join(["\t".join(cols)] + ["\t".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                                    for c in cols) for r in rows]) + "\n"


def _test_cases(library: Path, subjects: Sequence[str]) -> list[dict]:
    cases = json.loads((library / "library.json").read_text())["cases"]
    return [c for c in cases if c["subject"] in set(subjects) and not c["mirrored"]]


def _lobule_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    from .cerebellum_cv import score

    return score(pred, ref)["lobule_dice_mean"]


def eval_superres(library: Path, out_dir: Path, *, model_path: str | None = None, subjects=FOLD0_TEST,
                  hemisphere: Sequence[str] | None = None, lobules: Sequence[str] | None = None,
                  threads: int = 2) -> dict:
    import torch

    from bids_app.models.cascade import default_cerebellum_models, segment_cerebellum, select_cerebellum_models
    from bids_app.models.imaging import default_image_model, load_image_model, superresolve

    torch.set_num_threads(threads)
    model_path = model_path or default_image_model("superres")
    model, manifest = load_image_model(model_path, "superres")
    if hemisphere is None or lobules is None:
        chosen = select_cerebellum_models(default_cerebellum_models(), prior_available=False)
        hemisphere, lobules = [str(p) for p in chosen.hemispheres], [str(p) for p in chosen.lobules]
    rows = []
    for case in _test_cases(library, subjects):
        hr = np.asarray(nib.load(str(library / case["t1w"])).dataobj, dtype=np.float32)
        ref = np.asarray(nib.load(str(library / case["dseg"])).dataobj).astype(np.int16)
        brain = hr > 0
        seg = segment_cerebellum(hr, hemisphere, lobules, mc_samples=1, num_threads=threads)
        base_dice = _lobule_dice(seg.labels, ref)
        for setting, kwargs in SR_SETTINGS:
            lr = degrade(hr, 2, np.random.default_rng(0), **kwargs)
            t0 = time.perf_counter()
            restored = {"trilinear": interpolate(lr, 2, order=1), "bspline": interpolate(lr, 2, order=3)}
            t_interp = time.perf_counter() - t0
            t0 = time.perf_counter()
            restored["network"] = superresolve(model, lr)
            t_net = time.perf_counter() - t0
            for method, img in restored.items():
                img = np.clip(img, 0, None) * brain  # the pipeline's crops are zero outside the brain
                seg = segment_cerebellum(img, hemisphere, lobules, mc_samples=1, num_threads=threads)
                row = {"subject": case["subject"], "degradation": setting, "method": method,
                       "psnr_db": psnr(img, hr, brain), "ssim": ssim(img, hr, brain),
                       "lobule_dice": _lobule_dice(seg.labels, ref), "lobule_dice_original_1mm": base_dice,
                       "seconds": round(t_net if method == "network" else t_interp / 2, 3)}
                rows.append(row)
                log.info("%s %s %s: PSNR %.2f dB, SSIM %.4f, lobule Dice %.3f (original %.3f)", case["subject"],
                         setting, method, row["psnr_db"], row["ssim"], row["lobule_dice"], base_dice)
        _write(out_dir, "subjects.tsv", _tsv(rows))
    summary = {"model": manifest["name"], "task": "2 mm -> 1 mm on held-out subjects (library 1 mm crops, box "
               "average of 2^3 voxels, 'realistic' adds blur sigma 0.5 voxel and Rician noise 0.02)",
               "segmenter": {"hemisphere": [Path(h).name for h in hemisphere], "lobules": [Path(m).name for m in lobules],
                             "mc_samples": 1},
               "subjects": list(subjects),
               "methods": _summary(rows, ("psnr_db", "ssim", "lobule_dice", "lobule_dice_original_1mm", "seconds"),
                                   ("degradation", "method"))}
    _write(out_dir, "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- T2 synthesis


def tissue_mapping(t1: np.ndarray, mask: np.ndarray, stats: dict) -> np.ndarray:
    """The per-tissue baseline: k-means tissue classes of ``t1`` painted with the training pairs' mean T2."""
    cls = kmeans_tissues(t1, mask)
    out = np.zeros(t1.shape, np.float32)
    for k, tissue in enumerate(("csf", "gm", "wm"), start=1):
        out[cls == k] = stats[tissue]["t2"][0]
    return out


def brats_pair(bids_dir: Path, templateflow: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1w, T2w of ``sub-bratsmet110`` in the crop (affine to the template) and the brain-minus-lesion mask."""
    from bids_app.core.intensity import normalise_intensity
    from bids_app.core.registration import apply_transform, register_affine

    from .imagetasks import TEMPLATE_T1W, box_grid

    anat = bids_dir / "sub-bratsmet110" / "anat"
    imgs = {s: nib.load(str(anat / f"sub-bratsmet110_{s}.nii.gz")) for s in ("T1w", "T2w", "FLAIR")}
    template = nib.load(str(templateflow / "tpl-MNI152NLin6Asym" / TEMPLATE_T1W))
    transform = register_affine(imgs["T1w"], template)
    shape, affine = box_grid(templateflow)
    reference = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    out = {s: np.asarray(apply_transform(transform, img, reference).dataobj, dtype=np.float32)
           for s, img in imgs.items()}
    brain = (out["T1w"] > 0) & (out["T2w"] > 0)
    flair = normalise_intensity(out["FLAIR"] * brain, brain)
    lesion = flair > 1.0  # above the 99th percentile of the brain: oedema / tumour
    from scipy import ndimage

    lesion = ndimage.binary_dilation(lesion, iterations=3)
    mask = brain & ~lesion
    t1 = normalise_intensity(out["T1w"] * brain, mask) * brain
    t2 = normalise_intensity(out["T2w"] * brain, mask) * brain
    return t1, t2, ndimage.binary_erosion(mask, iterations=1)


def eval_t2synth(templateflow: Path, templates_extra: Path, bids_dir: Path | None, out_dir: Path, *,
                 model_path: str | None = None, stats_path: Path | None = None) -> dict:
    from bids_app.models.imaging import default_image_model, load_image_model, synthesise_t2

    from .imagetasks import box_grid, left_half, t2_real_pairs, tissue_intensities

    model_path = model_path or default_image_model("t2synth")
    model, manifest = load_image_model(model_path, "t2synth")
    shape, affine = box_grid(templateflow)
    held = left_half(affine, shape)
    real = t2_real_pairs(templateflow, templates_extra / "spm12")
    stats = (json.loads(Path(stats_path).read_text()) if stats_path else
             tissue_intensities([(t1, t2, m & ~held) for _, t1, t2, m in real]))
    tests = [(f"{n} (left half, held out)", t1, t2, m & held) for n, t1, t2, m in real if n == "MNI152NLin6Asym"]
    if bids_dir is not None and (bids_dir / "sub-bratsmet110").is_dir():
        t1, t2, mask = brats_pair(bids_dir, templateflow)
        tests.append(("bratsmet110 (real subject, lesion excluded)", t1, t2, mask))
    rows = []
    for name, t1, t2, mask in tests:
        t0 = time.perf_counter()
        synth = synthesise_t2(model, t1)
        seconds = time.perf_counter() - t0
        for method, img in (("network", synth), ("per-tissue mapping", tissue_mapping(t1, t1 > 0, stats))):
            rows.append({"test": name, "method": method, "mae": mae(img, t2, mask), "psnr_db": psnr(img, t2, mask),
                         "ssim": ssim(img, t2, mask), "correlation": correlation(img, t2, mask),
                         "voxels": int(mask.sum()),
                         "seconds": round(seconds, 3) if method == "network" else 0.0})
            log.info("%s %s: MAE %.4f PSNR %.2f SSIM %.4f r %.3f", name, method, rows[-1]["mae"],
                     rows[-1]["psnr_db"], rows[-1]["ssim"], rows[-1]["correlation"])
    summary = {"model": manifest["name"], "units": "T2w / its 99th percentile inside the brain",
               "tissue_intensities": stats, "results": rows}
    _write(out_dir, "results.tsv", _tsv(rows))
    _write(out_dir, "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- ablation


def eval_ablation(library: Path, out_dir: Path, *, subjects=FOLD0_TEST, n_atlases: int = 10,
                  sr_path: str | None = None, t2_path: str | None = None, threads: int = 2) -> dict:
    import torch

    from bids_app.atlas_library import read_library
    from bids_app.core.atlas_fusion import DEFAULT_D, DEFAULT_SCALE, fuse_weighted, register_nonlinear, select_similar
    from bids_app.core.images import like
    from bids_app.core.labels import load_protocol
    from bids_app.models.imaging import default_image_model, load_image_model, superresolve, synthesise_t2

    torch.set_num_threads(threads)
    sr_model, _ = load_image_model(sr_path or default_image_model("superres"), "superres")
    t2_model, _ = load_image_model(t2_path or default_image_model("t2synth"), "t2synth")
    protocol = load_protocol("lobules")
    values = protocol.indices
    lib = read_library(library)
    rows = []
    for case in _test_cases(library, subjects):
        target_img = nib.load(str(library / case["t1w"]))
        target = np.asarray(target_img.dataobj, dtype=np.float32)
        ref = np.asarray(nib.load(str(library / case["dseg"])).dataobj).astype(np.int16)
        candidates = lib.subset(exclude_subjects=[case["subject"]])
        idx, _ = select_similar(target, [(lambda c=c: c.image) for c in candidates], n_atlases)
        warped_t1, warped_lab = [], []
        t0 = time.perf_counter()
        for i in idx:
            c = candidates[i]
            reg = register_nonlinear(target_img, like(target_img, c.image, dtype=np.float32),
                                     moving_labels=like(target_img, c.labels, dtype=np.float32))
            warped_t1.append(np.asarray(reg.warped.dataobj, dtype=np.float32))
            warped_lab.append(np.rint(np.asarray(reg.warped_labels.dataobj)).astype(np.int16))
        t_reg = time.perf_counter() - t0

        def score(name: str, probs: np.ndarray, seconds: float) -> None:
            pred = protocol.to_labels(np.argmax(probs, axis=0))
            rows.append({"subject": case["subject"], "input": name, "lobule_dice": _lobule_dice(pred, ref),
                         "seconds_extra": round(seconds, 2)})
            log.info("%s %s: lobule Dice %.4f", case["subject"], name, rows[-1]["lobule_dice"])

        t0 = time.perf_counter()
        score("T1w 1 mm", fuse_weighted(target, warped_t1, warped_lab, values, DEFAULT_D, DEFAULT_SCALE), 0.0)
        t0 = time.perf_counter()
        t2_target = synthesise_t2(t2_model, target)
        t2_atlases = [synthesise_t2(t2_model, w) for w in warped_t1]
        t_t2 = time.perf_counter() - t0
        score("T1w + synthetic T2w 1 mm", fuse_weighted(np.stack([target, t2_target]),
                                                        [np.stack([a, b]) for a, b in zip(warped_t1, t2_atlases)],
                                                        warped_lab, values, DEFAULT_D, DEFAULT_SCALE, channels=True),
              t_t2)
        labels_hi = [np.repeat(np.repeat(np.repeat(lab, 2, 0), 2, 1), 2, 2) for lab in warped_lab]
        for name, up in (("T1w super-resolved 0.5 mm", lambda a: superresolve(sr_model, a)),
                         ("T1w trilinear 0.5 mm", lambda a: np.clip(interpolate(a, 2, order=1), 0, None))):
            t0 = time.perf_counter()
            hi_target = up(target)
            hi_atlases = [up(w) for w in warped_t1]
            t_up = time.perf_counter() - t0
            probs_hi = fuse_weighted(hi_target, hi_atlases, labels_hi, values, DEFAULT_D, DEFAULT_SCALE)
            probs = np.stack([block_mean(p, 2) for p in probs_hi])
            del probs_hi
            score(name, probs, t_up)
        log.info("%s: %d registrations in %.0f s", case["subject"], len(idx), t_reg)
        _write(out_dir, "subjects.tsv", _tsv(rows))
    summary = {"segmenter": f"atlas fusion, {n_atlases} atlases, leave-subject-out, d={DEFAULT_D}, scale="
               f"{DEFAULT_SCALE}", "labels": "silver (library)", "subjects": list(subjects),
               "real_t2": "not scored: no labelled subject has a real T2w",
               "inputs": _summary(rows, ("lobule_dice", "seconds_extra"), ("input",))}
    _write(out_dir, "summary.json", summary)
    return summary


def record_metrics(manifest_path: Path, metrics: dict) -> None:
    """Write ``metrics`` into a checkpoint manifest (the weights, and so the checksum, are untouched)."""
    from bids_app.models.checkpoint import validate_manifest

    manifest = json.loads(Path(manifest_path).read_text())
    manifest["metrics"] = metrics
    validate_manifest(manifest, where=str(manifest_path), check_kwargs=False)
    _write(Path(manifest_path).parent, Path(manifest_path).name, manifest)


def _manifest_metrics(what: str, summary: dict) -> dict:
    if what == "superres":
        return {"task": summary["task"], "subjects": summary["subjects"], **{
            f"{key.replace(' / ', '_')}_{m}": round(v[m]["mean"], 4) for key, v in summary["methods"].items()
            for m in ("psnr_db", "ssim", "lobule_dice")}}
    return {"units": summary["units"], **{
        f"{r['test'].split(' ')[0]}_{r['method'].replace(' ', '-')}_{m}": round(r[m], 4)
        for r in summary["results"] for m in ("mae", "psnr_db", "ssim", "correlation")}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_app.training.image_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("superres", "t2synth", "ablation"))
    parser.add_argument("--library", type=Path)
    parser.add_argument("--templateflow", type=Path)
    parser.add_argument("--templates-extra", type=Path)
    parser.add_argument("--bids", type=Path, help="bids-realworld (for the BraTS T1w/T2w pair)")
    parser.add_argument("--stats", type=Path, help="tissue_intensities.json of the T2 training run")
    parser.add_argument("--sr-model")
    parser.add_argument("--t2-model")
    parser.add_argument("--subjects", nargs="+", default=list(FOLD0_TEST))
    parser.add_argument("--n-atlases", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", type=Path, help="write the figures into this model manifest (superres, t2synth)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.what == "superres":
        summary = eval_superres(args.library, args.out, model_path=args.sr_model, subjects=args.subjects,
                                threads=args.threads)
    elif args.what == "t2synth":
        summary = eval_t2synth(args.templateflow, args.templates_extra, args.bids, args.out, model_path=args.t2_model,
                               stats_path=args.stats)
    else:
        summary = eval_ablation(args.library, args.out, subjects=args.subjects, n_atlases=args.n_atlases,
                                sr_path=args.sr_model, t2_path=args.t2_model, threads=args.threads)
    if args.record and args.what != "ablation":
        record_metrics(args.record, _manifest_metrics(args.what, summary))
    print(json.dumps(summary, indent=1)[:4000])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
