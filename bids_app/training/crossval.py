"""Cross-validation of the whole-brain models on the packed OASIS-TRT-20 cases (``arborseg-train cv``).

For every fold ``k`` the networks of ``<runs>/<arch>-fold<k>/final`` (trained without the fold's
test subjects) segment each test subject's 1 mm image through
:func:`bids_app.models.segment.segment_volume`, exactly as the pipeline does, and the labels are
scored against the 1 mm manual/FreeSurfer reference in four protocols: the DKT + aseg
parcellation, aseg, CEREBRUM's 7 classes and the 14 deep structures (merged through the tables).

In the same run, optionally:

* the classical peer: ANTs joint label fusion (Wang et al.) with the fold's training subjects as
  atlases (SyN registration at the model grid, then ``ants.joint_label_fusion``), its Dice and its
  time per subject beside the networks';
* the MC-dropout QC study: the ensemble's mean volume CV against its Dice for clean and
  deliberately degraded inputs (noise, bias field, blur, thick slices), with Pearson's r. Every
  study row also keeps the per-structure CVs of each protocol (in ``cv_raw.json``), from which
  :func:`calibrate_qc` (``arborseg-train calibrate-qc``) derives the ensemble's QC thresholds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from bids_app.atomic import atomic_output
from bids_app.core import qc_calibration
from bids_app.core.intensity import normalise_intensity
from bids_app.core.labels import load_protocol, merge_labels
from bids_app.core.metrics import pearson
from bids_app.core.refinement import REFINEMENTS
from bids_app.evaluate import evaluate_arrays, summarise_rows

from .prepare import block_mean, block_mode
from .trainer import fold_split, load_cases

log = logging.getLogger(__name__)

PROTOCOLS = ("dkt-aseg", "aseg", "cerebrum7", "deep14")
DEGRADATIONS = ("noise", "bias", "blur", "thick-slices")


def degrade(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A deliberately corrupted copy of a normalised 1 mm image (renormalised inside its mask)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = image > 0
    x = image.astype(np.float32).copy()
    if kind == "noise":
        x = x + rng.normal(0, 0.12, x.shape).astype(np.float32)
    elif kind == "bias":
        coarse = rng.normal(0, 0.5, (4, 4, 4))
        field = ndimage.zoom(coarse, [s / 4 for s in x.shape], order=3)[: x.shape[0], : x.shape[1], : x.shape[2]]
        x = x * np.exp(field).astype(np.float32)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, 1.5)
    elif kind == "thick-slices":
        f = 5
        z = x.shape[2] - x.shape[2] % f
        thick = x[:, :, :z].reshape(x.shape[0], x.shape[1], z // f, f).mean(axis=3)
        x[:, :, :z] = ndimage.zoom(thick, (1, 1, f), order=1)[:, :, :z]
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    x = np.clip(x, 0, None) * mask
    return normalise_intensity(x, mask)


def score(pred: np.ndarray, ref_fine: np.ndarray, subject: str, method: str, pred_protocol: str = "dkt-aseg",
          ref_protocol: str = "dkt-aseg") -> list[dict]:
    """Metric rows of one prediction in every protocol of :data:`PROTOCOLS` it can be merged into."""
    from bids_app.core.labels import ProtocolError, merge_chain

    rows = []
    pred_p, ref_p = load_protocol(pred_protocol), load_protocol(ref_protocol)
    for name in PROTOCOLS:
        try:
            merge_chain(pred_protocol, name)
        except ProtocolError:
            continue  # a coarser prediction says nothing about a finer protocol
        proto = load_protocol(name)
        p = pred if name == pred_protocol else merge_labels(pred, pred_p, proto)
        r = ref_fine if name == ref_protocol else merge_labels(ref_fine, ref_p, proto)
        for row in evaluate_arrays(p, r, proto, (1.0, 1.0, 1.0), subject):
            row.update(method=method, protocol=name)
            rows.append(row)
    return rows


def _load_case(data: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data / "oasis" / f"{case}.npz") as npz:
        return npz["img1"].astype(np.float32), npz["lab1"].astype(np.int32)


def jlf_segment(target: np.ndarray, atlases: list[tuple[np.ndarray, np.ndarray]], factor: int = 2,
                threads: int = 1) -> np.ndarray:
    """ANTs joint label fusion of ``atlases`` (1 mm image, label values) onto ``target``, at the model grid.

    Returns label values on the 1 mm grid (each model-grid voxel repeated ``factor`` times per axis).
    """
    import ants
    from ants import config as ants_config

    ants_config._random_seed = 1  # ANTsPy >= 0.6 reads the seed from here (see core.registration)

    def down(img):
        return ants.from_numpy(block_mean(img, factor), spacing=(float(factor),) * 3)

    fixed = down(target)
    mask = ants.from_numpy((block_mean(target, factor) > 0.05).astype(np.float32), spacing=(float(factor),) * 3)
    warped_images, warped_labels = [], []
    for img, lab in atlases:
        moving = down(img)
        classes = block_mode(lab, factor).astype(np.float32)
        reg = ants.registration(fixed, moving, type_of_transform="SyN", reg_iterations=(40, 20, 0),
                                random_seed=1, verbose=False)
        warped_images.append(reg["warpedmovout"])
        warped_labels.append(ants.apply_transforms(fixed, ants.from_numpy(classes, spacing=(float(factor),) * 3),
                                                   reg["fwdtransforms"], interpolator="genericLabel"))
    fused = ants.joint_label_fusion(fixed, mask, atlas_list=warped_images, label_list=warped_labels, beta=2, rad=2,
                                   verbose=False)
    labels2 = fused["segmentation"].numpy().astype(np.int32)
    up = np.repeat(np.repeat(np.repeat(labels2, factor, 0), factor, 1), factor, 2)
    return up[: target.shape[0], : target.shape[1], : target.shape[2]]


def run_cv(data: Path, runs: Path, out: Path, *, archs: list[str], folds: list[int] | None = None,
           k: int = 3, cv_seed: int = 0, mc_samples: int = 15, threads: int = 2, jlf_folds: list[int] = (),
           jlf_subjects: int = 5, degrade_subjects: int = 0, single_mc: int = 5,
           max_subjects: int | None = None, subjects: list[str] | None = None, jlf_only: bool = False,
           tta: str = "none", refinement: str = "none", parc_runs: Path | None = None,
           parc_arch: str = "cerebrum") -> dict:
    """Cross-validate; writes ``<out>/cv_rows.tsv``, ``cv_summary.json`` and ``qc_study.tsv``.

    ``subjects`` keeps only these test subjects; ``jlf_only`` runs the joint-label-fusion peer alone
    (no networks needed), e.g. to extend it to more subjects and merge with ``cv-merge``. ``tta`` is
    the test-time augmentation of every network run (:data:`bids_app.models.segment.TTA_VIEWS`),
    ``refinement`` its refinement (:data:`bids_app.core.refinement.REFINEMENTS`). ``parc_runs``
    (a folder of ``<parc_arch>-fold<k>`` parcellation runs) also scores the pipeline's fusion of the
    ensemble with the fold's parcellation network (:func:`bids_app.models.segment.fuse_parcellation`,
    refined with ``refinement``) instead of the ensemble and its members alone: methods ``fused``
    (the whole-brain labels) and ``fused-parc`` (the parcellation's); the degraded runs stay the
    ensemble's own.
    """
    from bids_app.models.segment import fuse_parcellation, segment_volume, tta_views

    tta_views(tta)  # an unknown name fails before any work
    if refinement not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refinement!r}; choose one of {', '.join(REFINEMENTS)}")
    run = dict(num_threads=threads, device="cpu", tta=tta, refinement=refinement)
    data, runs, out = Path(data), Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in load_cases(data, ["oasis"], "dkt-aseg") if c["kind"] == "real"]
    by_subject = {c["subject"]: c["case"] for c in cases}
    split = fold_split(cases, k, cv_seed)
    folds = list(range(k)) if folds is None else folds
    rows: list[dict] = []
    qc: list[dict] = []
    timing: dict[str, list[float]] = {}
    for fold in folds:
        members = [runs / f"{a}-fold{fold}" / "final" for a in archs]
        parc_members = [Path(parc_runs) / f"{parc_arch}-fold{fold}" / "final"] if parc_runs else []
        missing = [str(m) for m in members + parc_members if not m.with_suffix(".json").is_file()]
        if missing and not jlf_only:
            raise FileNotFoundError(f"fold {fold}: no trained model {', '.join(missing)}")
        train_subjects = [s for s in sorted(by_subject) if s not in split[fold]]
        for i, subject in enumerate(split[fold][:max_subjects]):
            if subjects is not None and subject not in subjects:
                continue
            image, ref = _load_case(data, by_subject[subject])
            log.info("fold %d subject %s (%d/%d)", fold, subject, i + 1, len(split[fold]))
            if not jlf_only and parc_members:  # the pipeline's fused ensembles (their members are measured without)
                t0 = time.time()
                unrefined = dict(run, refinement="none")
                result = segment_volume(image, members, mc_samples=mc_samples, **unrefined)
                parc = segment_volume(image, parc_members, mc_samples=mc_samples, **unrefined)
                fuse_parcellation(result, parc, image, refinement=refinement)
                timing.setdefault("fused", []).append(time.time() - t0)
                fused_rows = score(result.labels, ref, subject, "fused", result.protocol.name)
                rows += fused_rows + score(parc.labels, ref, subject, "fused-parc", parc.protocol.name)
                qc.append(_qc_row(subject, fold, "clean", result, fused_rows))
                del result, parc
            elif not jlf_only:
                t0 = time.time()
                result = segment_volume(image, members, mc_samples=mc_samples, **run)
                timing.setdefault("ensemble", []).append(time.time() - t0)
                ens_rows = score(result.labels, ref, subject, "ensemble", result.protocol.name)
                rows += ens_rows
                qc.append(_qc_row(subject, fold, "clean", result, ens_rows))
                if len(archs) > 1:
                    for arch, member in zip(archs, members):
                        t0 = time.time()
                        single = segment_volume(image, [member], mc_samples=single_mc, **run)
                        timing.setdefault(arch, []).append(time.time() - t0)
                        rows += score(single.labels, ref, subject, arch, single.protocol.name)
            if jlf_only or (fold in jlf_folds and i < jlf_subjects):
                # the classical peer: joint label fusion with the fold's training subjects as atlases
                t0 = time.time()
                fused = jlf_segment(image, [_load_case(data, by_subject[s]) for s in train_subjects])
                timing.setdefault("jlf", []).append(time.time() - t0)
                rows += score(fused, ref, subject, "jlf")
            if not jlf_only and i < degrade_subjects:
                for kind in DEGRADATIONS:
                    res = segment_volume(degrade(image, kind, seed=i), members, mc_samples=mc_samples, **run)
                    d_rows = score(res.labels, ref, subject, f"ensemble-{kind}", res.protocol.name)
                    rows += d_rows
                    qc.append(_qc_row(subject, fold, kind, res, d_rows))
            _write(out, rows, qc, timing, archs, mc_samples, split, folds, tta, refinement)
    return _write(out, rows, qc, timing, archs, mc_samples, split, folds, tta, refinement)


def _qc_row(subject: str, fold: int, condition: str, result, score_rows: list[dict]) -> dict:
    """One row of the QC study: the run's mean CV and flag, its aseg mean Dice and per-structure CVs."""
    return {"subject": subject, "fold": fold, "condition": condition, "mean_cv_percent": result.mean_cv_percent,
            "aseg_mean_dice": float(np.nanmean([r["dice"] for r in score_rows if r["protocol"] == "aseg"])),
            "qc_flag": result.qc_flag, "structure_cv": structure_cvs(result)}


def structure_cvs(result) -> dict:
    """Per protocol the result gives (its own, the coarser ones, ``deep14``): mean CV and per-class CVs."""
    from bids_app.core.labels import ProtocolError, merge_chain
    from bids_app.models.segment import COARSE_PROTOCOLS, coarse_cv
    from bids_app.models.segment_files import DEEP_PROTOCOL

    out = {}
    for name in (result.protocol.name, *COARSE_PROTOCOLS, DEEP_PROTOCOL):
        if name in out:
            continue
        try:
            merge_chain(result.protocol.name, name)
        except ProtocolError:
            continue
        cv, mcv, _ = (result.cv_percent, result.mean_cv_percent, None) if name == result.protocol.name \
            else coarse_cv(result, name)
        out[name] = {"mean_cv_percent": float(mcv), "cv_percent": [float(c) for c in cv]}
    return out


def _write_table(rows: list[dict], path: Path) -> None:
    """Rows with any keys -> TSV (columns in first-seen order, ``n/a`` for NaN/None)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def fmt(v):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "n/a"
        return format(v, ".6g") if isinstance(v, float) else str(v)

    lines = ["\t".join(columns)] + ["\t".join(fmt(r.get(c)) for c in columns) for r in rows]
    with atomic_output(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def _write(out: Path, rows, qc, timing, archs, mc_samples, split, folds, tta: str = "none",
           refinement: str = "none") -> dict:
    summary: dict = {"folds": {str(f): split[f] for f in folds}, "mc_samples": mc_samples, "members": archs,
                     "tta": tta, "refinement": refinement,
                     "reference": "OASIS-TRT-20 manual DKT cortex + FreeSurfer (silver) subcortical labels, 1 mm",
                     "methods": {}}
    for method in sorted({r["method"] for r in rows}):
        summary["methods"][method] = {}
        for name in PROTOCOLS:
            sel = [r for r in rows if r["method"] == method and r["protocol"] == name]
            if sel:
                s = summarise_rows(sel, load_protocol(name))
                summary["methods"][method][name] = {"overall": s["overall"], "structures": s.get("structures")}
    summary["seconds_per_subject"] = {m: float(np.mean(t)) for m, t in timing.items()}
    if len(qc) >= 3:
        cv = np.array([q["mean_cv_percent"] for q in qc], dtype=float)
        dice = np.array([q["aseg_mean_dice"] for q in qc], dtype=float)
        summary["qc_study"] = {"pearson_r_cv_vs_dice": pearson(cv, dice), "n": len(qc),
                               "conditions": sorted({q["condition"] for q in qc})}
    with atomic_output(out / "cv_raw.json") as tmp:
        Path(tmp).write_text(json.dumps({"rows": rows, "qc": qc, "timing": timing, "archs": archs,
                                         "mc_samples": mc_samples, "tta": tta, "refinement": refinement,
                                         "split": split,
                                         "folds": list(folds)},
                                        default=float) + "\n")
    _write_table(rows, out / "cv_rows.tsv")
    _write_table([{k: v for k, v in q.items() if k != "structure_cv"} for q in qc], out / "qc_study.tsv")
    with atomic_output(out / "cv_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return summary


def merge_cv(parts: list[Path], out: Path, methods: list[str] | None = None) -> dict:
    """Combine the ``cv_raw.json`` of several partial runs (e.g. folds run in parallel) into one summary.

    ``methods`` keeps only the rows (and timings) of these methods, e.g. ``["jlf"]`` to gather the
    joint-label-fusion peer of runs that also scored networks; the QC study is then left out unless
    ``ensemble`` is among them.
    """
    rows, qc, timing, folds = [], [], {}, []
    raw = None
    ttas = set()
    for part in parts:
        raw = json.loads((Path(part) / "cv_raw.json").read_text())
        kept = [r for r in raw["rows"] if methods is None or r["method"] in methods]
        if any(r["method"] != "jlf" for r in kept):
            ttas.add(raw.get("tta", "none"))
        rows += kept
        if methods is None or "ensemble" in methods:
            qc += raw["qc"]
        if methods is None:
            folds += raw["folds"]
        else:  # the folds whose test subjects have kept rows
            scored = {r["subject"] for r in kept}
            folds += [k for k, subjects in enumerate(raw["split"]) if scored & set(subjects)]
        for key, values in raw["timing"].items():
            if methods is None or key in methods:
                timing.setdefault(key, []).extend(values)
    if raw is None:
        raise ValueError("nothing to merge")
    if len(ttas) > 1:
        raise ValueError(f"the runs used different test-time augmentations: {sorted(ttas)}")
    Path(out).mkdir(parents=True, exist_ok=True)
    return _write(Path(out), rows, qc, timing, raw["archs"], raw["mc_samples"], raw["split"], sorted(set(folds)),
                  ttas.pop() if ttas else "none")


def _study_dice(row: dict) -> float:
    """The Dice of a QC-study row: the whole-brain study's aseg mean, the cerebellum study's lobule mean."""
    return float(row["dice"] if "dice" in row else row["aseg_mean_dice"])


def calibrate_qc(parts: list[Path], ensemble: list[str], *, modality: str = "T1w",
                 n_sd: float = qc_calibration.DEFAULT_N_SD, method: str | None = None,
                 folds: list[int] | None = None) -> dict:
    """The ``qc_calibration`` of ``ensemble`` (manifest names) from the QC study of cross-validation runs.

    Thresholds from the clean held-out scans (:func:`bids_app.core.qc_calibration.calibrate_protocol`),
    and what the mean threshold does on every scan of the study, degraded ones included. ``method``
    keeps the rows of one model set of a study that compared several (the cerebellum CV); ``folds``
    keeps the rows of those folds (a run over all folds holds every fold's ensemble).
    """
    qc: list[dict] = []
    mc = set()
    ttas = set()
    for part in parts:
        raw = json.loads((Path(part) / "cv_raw.json").read_text())
        ttas.add(raw.get("tta", "none"))
        rows = [q for q in raw["qc"] if method is None or q.get("method") == method]
        if method is not None and not rows:
            raise ValueError(f"{part}: no QC-study rows of method {method!r} (found: "
                             f"{', '.join(sorted({str(q.get('method')) for q in raw['qc']}))})")
        if folds is not None:
            rows = [q for q in rows if int(q.get("fold", -1)) in folds]
            if not rows:
                raise ValueError(f"{part}: no QC-study rows of fold(s) {sorted(folds)}")
        qc += rows
        mc.add(int(raw["mc_samples"]))
    clean = [q for q in qc if q["condition"] == "clean" and q.get("structure_cv")]
    if not clean:
        raise ValueError(f"{', '.join(map(str, parts))}: no clean QC-study rows with per-structure CVs "
                         "(re-run `arborseg-train cv` with this version)")
    if len(mc) != 1:
        raise ValueError(f"the runs used different MC sample counts: {sorted(mc)}")
    if len(ttas) != 1:
        raise ValueError(f"the runs used different test-time augmentations: {sorted(ttas)}")
    protocols = {}
    for name in clean[0]["structure_cv"]:
        proto = load_protocol(name)
        rows = [q["structure_cv"][name] for q in clean if name in q["structure_cv"]]
        cv = np.array([r["cv_percent"] for r in rows], dtype=np.float64)
        keep = [k for k, index in enumerate(proto.indices) if not (k == 0 and index == 0)]
        protocols[name] = qc_calibration.calibrate_protocol(cv[:, keep], [r["mean_cv_percent"] for r in rows],
                                                            [proto.names[k] for k in keep], n_sd=n_sd)
    fine = next(iter(protocols))
    dice = [_study_dice(q) for q in qc]
    study = qc_calibration.threshold_study([q["mean_cv_percent"] for q in qc], dice,
                                           [q["condition"] for q in qc], protocols[fine]["mean_cv_threshold_percent"])
    study["dice"] = "aseg mean Dice" if "aseg_mean_dice" in qc[0] else "lobule mean Dice"
    study["pearson_r_cv_vs_dice"] = round(pearson(np.array([q["mean_cv_percent"] for q in qc], dtype=float),
                                              np.array(dice, dtype=float)), 4)
    study["subjects"] = sorted({q["subject"] for q in clean})
    return {"ensemble": sorted(ensemble), "modality": modality, "mc_samples": mc.pop(), "tta": ttas.pop(),
            "method": f"per structure and for the mean CV: max(mean + {n_sd:g} SD, max) of the CVs of "
                      f"{len(clean)} clean held-out OASIS-TRT-20 scans (cross-validation)",
            "study_method": method,
            "n_sd": n_sd, "source": "arborseg-train cv", "protocols": protocols, "study": study}


def write_calibration(parts: list[Path], manifests: list[Path], *, modality: str = "T1w",
                      n_sd: float = qc_calibration.DEFAULT_N_SD, method: str | None = None,
                      folds: list[int] | None = None) -> dict:
    """:func:`calibrate_qc` for the ensemble of ``manifests``, written into each of them (atomically)."""
    loaded = []
    for path in manifests:
        path = Path(path)
        if path.suffix != ".json" or not path.is_file():
            raise FileNotFoundError(f"{path}: not a model manifest (.json)")
        loaded.append((path, json.loads(path.read_text())))
    cal = calibrate_qc(parts, [m["name"] for _, m in loaded], modality=modality, n_sd=n_sd, method=method,
                       folds=folds)
    for path, manifest in loaded:
        with atomic_output(path) as tmp:
            Path(tmp).write_text(json.dumps(qc_calibration.with_calibration(manifest, cal), indent=2,
                                            allow_nan=False) + "\n")
    return cal
