"""Cross-validation of the cerebellum cascade on the library's OASIS-TRT-20 subjects.

For every test subject of a fold (the models were trained without that subject and its mirrored
copy) this scores, on the MNI cerebellum crop:

* lobule Dice of the 26 structures against the library labels (silver labels: five manual Park 2014
  maps propagated and fused under the manual tissue, see :mod:`bids_app.training.library`);
* whole-cerebellum, cerebellar cortex and white-matter Dice against the manual labels (the library
  labels cover the manual cerebellum exactly, so these are the manual masks);
* Dice of the manual vermis lobule groups (630/631/632) inside the manual vermis;
* the ablations: U-Net vs DPN vs ensemble lobule networks; atlas fusion alone (the classical peer,
  leave-subject-out) with its time;
* robustness (DeepCERES Table 6): the ensemble on corrupted inputs (noise, bias field, blur, thick
  slices, gamma, ghosting, elastic deformation; a deformed image is scored against its deformed
  references); a set that takes the atlas prior gets the prior of the corrupted image, as the pipeline
  would compute it;
* the MC-dropout QC study: every cascade run's mean and per-structure volume CVs (``lobules`` and
  ``hemispheres``) beside its lobule Dice, clean and corrupted, in ``cv_raw.json``, from which
  ``arborseg-train calibrate-qc --method NAME`` derives the cascade's QC thresholds.

``python -m bids_app.training.cerebellum_cv merge FOLD_DIR ... --out DIR`` gathers the folds' results
(disjoint test subjects) into one ``subjects.tsv`` and a ``summary.json`` over all their subjects.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.atomic import atomic_output
from bids_app.core.labels import load_protocol
from bids_app.core.lobules import vermis_agreement

log = logging.getLogger(__name__)

DEGRADATIONS = ("noise", "bias", "blur", "thick-slices", "gamma", "ghosting", "deformation")


def degrade_crop(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """The whole-brain CV's corruptions plus gamma and ghosting (DeepCERES Table 6 / TorchIO)."""
    from bids_app.core.intensity import normalise_intensity

    from .crossval import degrade

    if kind not in ("gamma", "ghosting"):
        return degrade(image, kind, seed)
    mask = image > 0
    x = image.astype(np.float32).copy()
    if kind == "gamma":
        x = np.clip(x, 0, None) ** np.float32(1.6)
    else:  # ghosting: a shifted, attenuated copy along the phase-encoding axis (y)
        x = x + 0.35 * np.roll(x, x.shape[1] // 4, axis=1)
    return normalise_intensity(np.clip(x, 0, None) * mask, mask)


def deform_crop(image: np.ndarray, labels: list[np.ndarray], seed: int = 0, control_points: int = 7,
                max_displacement: float = 4.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random elastic deformation (DeepCERES Table 6, TorchIO's ``RandomElasticDeformation``).

    Displacements drawn uniformly in +-``max_displacement`` voxels on a ``control_points``^3 grid and
    interpolated (cubic) to a smooth field, applied to the image (linear) and to every label map
    (nearest), so the prediction is scored against the deformed reference.
    """
    from scipy import ndimage

    shape = image.shape
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-max_displacement, max_displacement, (3,) + (control_points,) * 3)
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        field = ndimage.zoom(coarse[axis], [n / control_points for n in shape], order=3)
        coords[axis] += field[: shape[0], : shape[1], : shape[2]]
    warped = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    return warped.astype(np.float32), [ndimage.map_coordinates(lab, coords, order=0, mode="constant", cval=0)
                                       for lab in labels]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / denom) if denom else float("nan")


def score(pred: np.ndarray, ref: np.ndarray, manual: np.ndarray | None = None) -> dict:
    """Mean lobule Dice (26 structures), cerebellum / cortex / white-matter Dice, vermis groups."""
    protocol = load_protocol("lobules")
    wm_values = [v for v, n in zip(protocol.indices, protocol.names) if n.endswith("White-Matter")]
    values = [v for v in protocol.indices if v]
    per = {protocol.name_of(v): _dice(pred == v, ref == v) for v in values}
    out = {
        "lobule_dice_mean": float(np.nanmean(list(per.values()))),
        "cerebellum_dice": _dice(pred > 0, ref > 0),
        "cortex_dice": _dice((pred > 0) & ~np.isin(pred, wm_values), (ref > 0) & ~np.isin(ref, wm_values)),
        "wm_dice": _dice(np.isin(pred, wm_values), np.isin(ref, wm_values)),
        "per_structure": per,
    }
    if manual is not None:
        groups = vermis_agreement(pred, manual)
        out.update({f"dice_{k}": v for k, v in groups.items()})
        out["vermis_dice_mean"] = float(np.nanmean(list(groups.values())))
    return out


def _library_cases(library_dir: Path) -> list[dict]:
    return json.loads((Path(library_dir) / "library.json").read_text())["cases"]


def run_cerebellum_cv(library_dir: Path, oasis_dir: Path, template: Path, out_dir: Path, *,
                      test_subjects: list[str], hemisphere: list[str], lobules: dict[str, list[str]],
                      mc_samples: int = 5, atlas_n: int | None = None, degrade_kinds=DEGRADATIONS,
                      threads: int = 2, population_prior: Path | None = None,
                      robust: list[str] | None = None, hemisphere_prior_weight: float | None = None) -> dict:
    """Score every method on the test subjects; writes ``subjects.tsv`` and ``summary.json``.

    ``hemisphere_prior_weight`` goes to :func:`bids_app.models.cascade.segment_cerebellum` (None: the
    pipeline's default).

    Each set of lobule models gets the prior its channels ask for: the leave-subject-out atlas prior
    (``atlas_n``), the population prior file (``population_prior``, built without the test subjects) or none.
    The corruptions run with the sets ``robust`` (default: ``ensemble`` if given, else the first set).
    """
    from bids_app.models.cascade import prior_kind, segment_cerebellum
    from bids_app.models.checkpoint import verify_checkpoint

    from .library import subject_to_crop

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [c for c in _library_cases(library_dir) if c["subject"] in test_subjects and not c["mirrored"]]
    if not cases:
        raise ValueError(f"no library case of {test_subjects}")
    unknown = [r for r in robust or [] if r not in lobules]
    if unknown:
        raise ValueError(f"--robust {', '.join(unknown)}: not among the lobule sets {', '.join(lobules)}")
    kinds = {}
    for method, models in lobules.items():
        found = {prior_kind(verify_checkpoint(m)[1], m) for m in models}
        if len(found) != 1:
            raise ValueError(f"lobule set {method!r} mixes models taking different priors")
        kinds[method] = found.pop()
        if kinds[method] == "atlas" and not atlas_n:
            raise ValueError(f"lobule set {method!r} takes the atlas prior: give atlas_n")
        if kinds[method] == "population" and population_prior is None:
            raise ValueError(f"lobule set {method!r} takes the population prior: give population_prior")
    population = None
    if population_prior is not None:
        from bids_app.atlas_library import prior_probabilities

        population = prior_probabilities(nib.load(str(population_prior)))
    library = None
    if atlas_n:  # read and checked once: every subject's priors (clean and corrupted) use it
        from bids_app.atlas_library import read_library

        library = read_library(library_dir)
    rows: list[dict] = []
    qc: list[dict] = []
    timing: dict[str, list[float]] = {}
    for i, case in enumerate(cases, 1):
        t1 = nib.load(str(Path(library_dir) / case["t1w"]))
        crop = np.asarray(t1.dataobj, dtype=np.float32)
        ref = np.asarray(nib.load(str(Path(library_dir) / case["dseg"])).dataobj).astype(np.int16)
        label = case["case"].replace("oasis-", "")
        sub = Path(oasis_dir) / label
        manual = subject_to_crop(sub / f"{label}_desc-brain_T1w.nii.gz", sub / f"{label}_desc-manualvermis_dseg.nii.gz",
                                 sub / f"{label}_desc-aparcNMMjt+aseg_dseg.mgz", template)["manual"]

        def add(method: str, pred: np.ndarray, seconds: float, truth: tuple | None = None, **extra) -> None:
            row = {"subject": case["subject"], "method": method, **extra, "seconds": round(seconds, 2)}
            scores = score(pred, *(truth or (ref, manual)))
            row.update({k: v for k, v in scores.items() if k != "per_structure"})
            row["per_structure"] = scores["per_structure"]
            rows.append(row)
            timing.setdefault(method, []).append(seconds)
            log.info("[%d/%d] %s %s%s: lobules %.3f, cerebellum %.3f, vermis %.3f (%.1f s)", i, len(cases),
                     case["subject"], method, f" ({extra})" if extra else "", row["lobule_dice_mean"],
                     row["cerebellum_dice"], row.get("vermis_dice_mean", float("nan")), seconds)

        prior = None
        if atlas_n:
            from bids_app.core.atlas_fusion import atlas_prior

            def leave_out_prior(image: np.ndarray) -> np.ndarray:
                """Leave-subject-out, as for a new subject: the atlas-fusion baseline and the prior channels."""
                return atlas_prior(nib.Nifti1Image(image, t1.affine), library, n=atlas_n,
                                   exclude_subjects=[case["subject"]]).probabilities

            t0 = time.perf_counter()
            prior = leave_out_prior(crop)
            pred = load_protocol("lobules").to_labels(np.argmax(prior, axis=0))
            add(f"atlas-fusion-n{atlas_n}", pred, time.perf_counter() - t0)
        if population is not None:  # the population prior alone (its argmax; no image, no registration)
            add("population-prior", load_protocol("lobules").to_labels(np.argmax(population, axis=0)), 0.0)
        priors = {"atlas": prior, "population": population, None: None}
        for method, models in lobules.items():
            t0 = time.perf_counter()
            res = segment_cerebellum(crop, hemisphere, models, prior=priors[kinds[method]], mc_samples=mc_samples,
                                     hemisphere_prior_weight=hemisphere_prior_weight,
                                     num_threads=threads)
            add(method, res.labels, time.perf_counter() - t0, mean_cv_percent=round(float(res.mean_cv_percent), 2),
                prior=kinds[method] or "none")
            qc.append(_qc_row(res, case["subject"], method, "clean", rows[-1]["lobule_dice_mean"]))
        for ens in robust or ["ensemble" if "ensemble" in lobules else next(iter(lobules))]:
            for kind in degrade_kinds:
                t0 = time.perf_counter()
                truth = None
                if kind == "deformation":
                    image, warped = deform_crop(crop, [ref, manual], seed=i)
                    truth = tuple(warped)
                else:
                    image = degrade_crop(crop, kind, seed=i)
                # the corrupted image gets its own atlas prior, as the pipeline would give it
                used = leave_out_prior(image) if kinds[ens] == "atlas" else priors[kinds[ens]]
                res = segment_cerebellum(image, hemisphere, lobules[ens],
                                         hemisphere_prior_weight=hemisphere_prior_weight,
                                         prior=used, mc_samples=mc_samples, num_threads=threads)
                add(f"{ens}+{kind}", res.labels, time.perf_counter() - t0, truth,
                    mean_cv_percent=round(float(res.mean_cv_percent), 2))
                qc.append(_qc_row(res, case["subject"], ens, kind, rows[-1]["lobule_dice_mean"]))
        _write(out_dir, rows, timing, test_subjects, qc, mc_samples, hemisphere_prior_weight)
    return _write(out_dir, rows, timing, test_subjects, qc, mc_samples, hemisphere_prior_weight)


def _qc_row(result, subject: str, method: str, condition: str, dice: float) -> dict:
    """One run of the QC study: its mean CV, lobule Dice and per-structure CVs of both protocols."""
    from bids_app.models.cascade import HEMISPHERES_PROTOCOL, merged_cv

    hemi_cv, hemi_mcv, _ = merged_cv(result, HEMISPHERES_PROTOCOL)
    return {"subject": subject, "method": method, "condition": condition,
            "mean_cv_percent": float(result.mean_cv_percent), "dice": float(dice),
            "structure_cv": {result.protocol.name: {"mean_cv_percent": float(result.mean_cv_percent),
                                                    "cv_percent": [float(c) for c in result.cv_percent]},
                             HEMISPHERES_PROTOCOL: {"mean_cv_percent": float(hemi_mcv),
                                                    "cv_percent": [float(c) for c in hemi_cv]}}}


SCORE_KEYS = ("lobule_dice_mean", "cerebellum_dice", "cortex_dice", "wm_dice", "vermis_dice_mean")
SUBJECT_COLUMNS = ("subject", "method", *SCORE_KEYS, "mean_cv_percent", "seconds")


def _write_subjects_tsv(out_dir: Path, rows: list[dict]) -> None:
    """``subjects.tsv``: one row per subject and method; numbers to 4 decimals, NaN or missing as ``n/a``."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["\t".join(SUBJECT_COLUMNS)] + ["\t".join(cell(r.get(c)) for c in SUBJECT_COLUMNS) for r in rows]
    with atomic_output(Path(out_dir) / "subjects.tsv") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def _write(out_dir: Path, rows: list[dict], timing: dict, test_subjects: list[str], qc: list[dict] | None = None,
           mc_samples: int | None = None, hemisphere_prior_weight: float | None = None) -> dict:
    keys = list(SCORE_KEYS)
    methods = sorted({r["method"] for r in rows}, key=lambda m: [r["method"] for r in rows].index(m))
    summary = {"test_subjects": test_subjects, "labels": "lobules: silver (library); cerebellum/cortex/WM and "
               "vermis groups: manual", "methods": {}}
    if qc is not None:  # a CV run (not a merge): the cascade's settings
        from bids_app.models.cascade import HEMISPHERE_PRIOR_WEIGHT

        summary["hemisphere_prior_weight"] = (HEMISPHERE_PRIOR_WEIGHT if hemisphere_prior_weight is None
                                              else float(hemisphere_prior_weight))
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        summary["methods"][m] = {k: _mean_std([r[k] for r in sel]) for k in keys}
        summary["methods"][m]["n"] = len(sel)
        summary["methods"][m]["seconds_mean"] = float(np.mean(timing[m]))
        per = {}
        for name in sel[0]["per_structure"]:
            per[name] = float(np.nanmean([r["per_structure"][name] for r in sel]))
        summary["methods"][m]["per_structure_dice"] = per
    _write_subjects_tsv(out_dir, rows)
    with atomic_output(out_dir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
    if qc:
        with atomic_output(out_dir / "cv_raw.json") as tmp:
            Path(tmp).write_text(json.dumps({"qc": qc, "mc_samples": mc_samples}) + "\n")
    return summary


def _read_rows(folder: Path) -> list[dict]:
    lines = (folder / "subjects.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t")))
        for key in SUBJECT_COLUMNS[2:]:
            value = row.get(key, "n/a")
            row[key] = float("nan") if value in ("n/a", "nan", "") else float(value)
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> dict:
    """Mean and SD ignoring NaN (both NaN, without a warning, when every value is NaN)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}


def merge_cerebellum_cv(fold_dirs: list[Path], out_dir: Path) -> dict:
    """One ``subjects.tsv`` and ``summary.json`` over the folds' test subjects (which must not overlap).

    Methods missing from a fold are left out and listed under ``methods_not_in_every_fold``. Means and
    standard deviations are over subjects; per-structure Dice is the folds' per-structure means weighted
    by their number of subjects; ``per_fold`` keeps each fold's mean lobule Dice.
    """
    fold_dirs = [Path(d) for d in fold_dirs]
    summaries, rows_of = {}, {}
    for d in fold_dirs:
        for name in ("summary.json", "subjects.tsv"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: not a cerebellum CV folder (no {name})")
        summaries[d] = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        rows_of[d] = _read_rows(d)
    seen: dict[str, Path] = {}
    for d, summary in summaries.items():
        for subject in summary["test_subjects"]:
            if subject in seen:
                raise ValueError(f"subject {subject} is a test subject of both {seen[subject]} and {d}")
            seen[subject] = d
    every = [m for m in summaries[fold_dirs[0]]["methods"] if all(m in s["methods"] for s in summaries.values())]
    others = sorted({m for s in summaries.values() for m in s["methods"]} - set(every))
    merged = {"folds": [str(d) for d in fold_dirs], "test_subjects": list(seen),
              "labels": summaries[fold_dirs[0]]["labels"], "methods": {}, "methods_not_in_every_fold": others}
    rows = [r for d in fold_dirs for r in rows_of[d] if r["method"] in every]
    for m in every:
        sel = [r for r in rows if r["method"] == m]
        entry: dict = {k: _mean_std([r[k] for r in sel]) for k in SCORE_KEYS}
        entry["n"] = len(sel)
        entry["seconds_mean"] = float(np.mean([r["seconds"] for r in sel]))
        weights = {d: summaries[d]["methods"][m]["n"] for d in fold_dirs}
        total = sum(weights.values())
        names = summaries[fold_dirs[0]]["methods"][m]["per_structure_dice"]
        entry["per_structure_dice"] = {
            name: float(sum(weights[d] * summaries[d]["methods"][m]["per_structure_dice"][name] for d in fold_dirs)
                        / total) for name in names}
        entry["per_fold"] = {str(d): summaries[d]["methods"][m]["lobule_dice_mean"]["mean"] for d in fold_dirs}
        merged["methods"][m] = entry
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_subjects_tsv(out_dir, rows)
    with atomic_output(out_dir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _merge_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bids_app.training.cerebellum_cv merge",
                                     description="Gather the cerebellum CV results of several folds.")
    parser.add_argument("folds", nargs="+", type=Path, help="the --out folders of the folds' runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        summary = merge_cerebellum_cv(args.folds, args.out)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for m, v in summary["methods"].items():
        print(m, f"n={v['n']}", " ".join(f"{k}={v[k]['mean']:.3f}±{v[k]['std']:.3f}" for k in SCORE_KEYS))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return _merge_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bids_app.training.cerebellum_cv", description=__doc__)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--oasis", type=Path, required=True)
    parser.add_argument("--template", type=Path, required=True, help="MNI152NLin6Asym 1 mm brain T1w")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-subjects", nargs="+", required=True)
    parser.add_argument("--hemisphere", nargs="+", required=True, help="net-1 checkpoints")
    parser.add_argument("--lobules", nargs="+", action="append", required=True, metavar="NAME=CKPT[,CKPT]",
                        help="a named set of lobule checkpoints, e.g. unet=runs/a/final")
    parser.add_argument("--mc-samples", type=int, default=5)
    parser.add_argument("--atlas-n", type=int, default=0, help="also score atlas fusion with N atlases")
    parser.add_argument("--degrade", nargs="*", default=list(DEGRADATIONS),
                        help="corruptions run with the 'ensemble' set (else the first set)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--population-prior", type=Path,
                        help="population prior (python -m bids_app.training.population_prior, without the test "
                             "subjects) for lobule models with population: channels")
    parser.add_argument("--robust", nargs="+", help="the lobule sets the corruptions run with (default: ensemble, "
                                                    "else the first)")
    parser.add_argument("--hemisphere-prior-weight", type=float,
                        help="weight of the atlas prior's hemispheres in net 1's (default: the pipeline's, "
                             "bids_app.models.cascade.HEMISPHERE_PRIOR_WEIGHT; 0: net 1 alone)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    lobules = {}
    for group in args.lobules:
        for item in group:
            name, _, paths = item.partition("=")
            lobules[name] = paths.split(",")
    summary = run_cerebellum_cv(args.library, args.oasis, args.template, args.out, test_subjects=args.test_subjects,
                                hemisphere=args.hemisphere, lobules=lobules, mc_samples=args.mc_samples,
                                atlas_n=args.atlas_n or None, degrade_kinds=args.degrade, threads=args.threads,
                                population_prior=args.population_prior, robust=args.robust,
                                hemisphere_prior_weight=args.hemisphere_prior_weight)
    for m, v in summary["methods"].items():
        print(m, " ".join(f"{k}={v[k]['mean']:.3f}±{v[k]['std']:.3f}" for k in v if isinstance(v[k], dict)
                          and "mean" in v[k]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
