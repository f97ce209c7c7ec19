"""Run records (``logs/<label>_record.json``), the methods boilerplate and the subject reports."""

from __future__ import annotations

import json
import logging
import platform
from datetime import datetime, timezone
from importlib import metadata
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

from ..bids import atomic_write_json, atomic_write_text, derivative_path, source_entities
from ..core.crop import CEREBELLUM_BOX_MM
from ..core.qc_calibration import origin_text

LOGGER = logging.getLogger(__name__)

#: Order and captions of the subject report's reportlets: (section, entities, caption).
REPORTLETS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("Input", {"desc": "conform", "suffix": "T1w"},
     "The T1w after validation and conforming (RAS+, isotropic), before any correction."),
    ("Preprocessing", {"desc": "preproc", "suffix": "T1w"},
     "Before (conformed input) and after denoising, N4 (twice) and intensity normalisation: hover to flip."),
    ("Brain masks", {"desc": "brain", "suffix": "mask"},
     "Intracranial (red) and brain (yellow) masks on the preprocessed T1w."),
    ("Registration", {"space": "{template}", "suffix": "T1w"},
     "The subject in {template} space with the template's edges; hover to see the template."),
    ("Cerebellum crop", {"space": "{template}", "desc": "cerebellum", "suffix": "T1w"},
     "The box cut out for the cerebellum branch, on the subject in {template} space."),
)

#: Reportlets of the whole-brain segmentation section: (entities, caption).
SEGMENTATION_REPORTLETS: tuple[tuple[dict[str, Any], str], ...] = (
    ({"segmentation": "wholebrain", "suffix": "dseg"},
     "Outlines of the whole-brain structures (aseg protocol, FreeSurfer colours) on the preprocessed T1w, "
     "in the conformed T1w space."),
    ({"segmentation": "wholebrain", "desc": "entropy", "suffix": "uncertainty"},
     "Voxel-wise predictive entropy of the Monte-Carlo dropout ensemble (nats): bright where the networks are "
     "unsure, normally only along boundaries between structures."),
)
#: protocols whose volumes are copied into the record, in this order
RECORD_SEGMENTATIONS = ("wholebrain", "cerebrum7", "dkt")
#: caption of the cortical parcellation reportlet (``figures/<source>_seg-<x>_dseg.svg``)
PARCELLATION_CAPTION = ("Outlines of the cortical parcels ({protocol} protocol, coloured by its label table) on the "
                        "preprocessed T1w, in the conformed T1w space.")


def software_versions() -> list[dict[str, str]]:
    names = [("ArborSeg", "arborseg"), ("Nipype", "nipype"), ("ANTsPy", "antspyx"), ("PyBIDS", "pybids"),
             ("NiBabel", "nibabel"), ("NumPy", "numpy"), ("SciPy", "scipy"), ("TemplateFlow", "templateflow"),
             ("Matplotlib", "matplotlib"), ("Jinja2", "jinja2"), ("WeasyPrint", "weasyprint"), ("PyTorch", "torch")]
    out = [{"name": "Python", "version": platform.python_version()}]
    for label, dist in names:
        try:
            out.append({"name": label, "version": metadata.version(dist)})
        except metadata.PackageNotFoundError:
            out.append({"name": label, "version": "not installed"})
    return out


def _version_of(versions: list[dict[str, str]], name: str) -> str:
    return next((v["version"] for v in versions if v["name"] == name), "?")


def boilerplate(config, versions) -> str:
    template = package_files("bids_app").joinpath("data/boilerplate.md").read_text()
    p = config.preproc
    denoise = (f"Noise was reduced with adaptive non-local means (Manjon et al. 2010; Rician model, patch radius "
               f"{p.denoise_patch_radius}, search radius {p.denoise_search_radius} voxels) inside the head. "
               if p.denoise else "")
    box = ", ".join(f"{a:g} to {b:g} mm" for a, b in CEREBELLUM_BOX_MM)
    return template.format(
        version=config.version, nipype=_version_of(versions, "Nipype"), ants=_version_of(versions, "ANTsPy"),
        pybids=_version_of(versions, "PyBIDS"), templateflow=_version_of(versions, "TemplateFlow"),
        voxel_size=p.voxel_size, denoise_sentence=denoise, n4_shrink=p.n4_shrink_factor,
        n4_iterations="x".join(str(i) for i in p.n4_iterations), n4_spline=p.n4_spline_distance_mm,
        template=config.template, percentile=p.normalise_percentile, box=f"x, y, z: {box}"
    ) + _segmentation_methods(config) + _parcellation_methods(config)


SEGMENTATION_REFERENCES = (
    "- Gal Y, Ghahramani Z (2016) Dropout as a Bayesian approximation: representing model uncertainty in deep "
    "learning. Proc ICML, PMLR 48:1050-1059.\n"
    "- Roy AG, Conjeti S, Navab N, Wachinger C (2019) Bayesian QuickNAT: model uncertainty in deep whole-brain "
    "segmentation for structure-wise quality control. NeuroImage 195:11-22.\n"
    "- Zopes J, Platscher M, Paganucci S, Federau C (2021) Multi-modal segmentation of 3D brain scans using neural "
    "networks. Front Neurol 12:653375.\n"
)


def _segmentation_methods(config) -> str:
    """The whole-brain segmentation paragraph of the methods (empty when the branch does not run)."""
    seg = getattr(config, "segmentation", None)
    if seg is None or not seg.active:
        return ""
    from ..models.segment import read_manifests

    manifests = read_manifests(seg.checkpoints)
    names = ", ".join(f"{m['name']} {m['version']} ({m['architecture']})" for m in manifests)
    voxels = sorted({str(m["voxel_size_mm"]) for m in manifests})
    return (
        f"\nWhole-brain structures were segmented with an ensemble of {len(manifests)} 3D convolutional network(s) "
        f"({names}; {seg.protocol} label protocol) applied to the preprocessed T1w restricted to the intracranial "
        f"mask and resampled to the networks' {' and '.join(voxels)} mm grid (block mean). Uncertainty was "
        f"estimated with Monte-Carlo dropout (Gal and Ghahramani 2016; {seg.mc_samples} samples, seed "
        f"{config.random_seed}), following Zopes et al. (2021) and Bayesian QuickNAT (Roy et al. 2019): the labels "
        "are the argmax of the mean softmax, brought back to the T1w grid with trilinear interpolation; the "
        "voxel-wise predictive entropy maps the uncertainty; and the coefficient of variation (CV) of each "
        "structure's volume over the samples was computed, with a segmentation flagged when the mean CV over the "
        "structures exceeds the ensemble's threshold (calibrated on held-out scans of its cross-validation, else "
        f"1 % for T1w).{_tta_sentence(seg.tta)}{_refinement_sentence(seg)} Labels were merged into the aseg and CEREBRUM 7-class protocols and "
        "resampled to the grid of the raw T1w with nearest-neighbour interpolation; volumes were counted on the "
        "T1w grid.\n\nSegmentation references\n" + SEGMENTATION_REFERENCES
    )


def _tta_sentence(tta: str) -> str:
    """The methods' sentence on the test-time augmentation ("" without one)."""
    views = {"flip": "the image and its left-right mirror (labels swapped back)",
             "shift": "the image on the model grid and on one shifted by half a model voxel",
             "flip-shift": "four views: the image, its left-right mirror (labels swapped back), and both on a "
                           "model grid shifted by half a model voxel"}
    if tta not in views:
        return ""
    return f" The samples were spread evenly over {views[tta]}, and averaged back on the T1w grid."


def _refinement_sentence(branch) -> str:
    """The methods' sentence on the intensity refinement ("" without one)."""
    if getattr(branch, "refinement", "none") != "intensity":
        return ""
    from ..core.refinement import DEFAULT_BETA, DEFAULT_CONFIDENCE, DEFAULT_ITERATIONS

    return (" The probabilities on the T1w grid were then refined with the subject's own intensities: each "
            "structure's intensity histogram, taken where the networks were confident (probability above "
            f"{DEFAULT_CONFIDENCE:g}), was combined with the network probabilities as a likelihood tempered by an "
            f"exponent of {DEFAULT_BETA:g} ({DEFAULT_ITERATIONS} EM re-estimation of the histograms), and the labels "
            "are the argmax of the refined probabilities (skipped for scans with voxels coarser than the networks' "
            "grid).")


def _parcellation_methods(config) -> str:
    """The cortical parcellation paragraph of the methods (empty when the branch does not run)."""
    parc = getattr(config, "parcellation", None)
    if parc is None or not parc.active:
        return ""
    from ..models.segment import read_manifests

    manifests = read_manifests(parc.checkpoints)
    names = ", ".join(f"{m['name']} {m['version']} ({m['architecture']})" for m in manifests)
    seg = getattr(config, "segmentation", None)
    refs = "" if seg is not None and seg.active else "\n\nSegmentation references\n" + SEGMENTATION_REFERENCES
    return (
        f"\nThe cortex was parcellated with a second ensemble of {len(manifests)} network(s) ({names}; "
        f"{parc.protocol} label protocol) on the same input, with the same Monte-Carlo dropout estimate "
        f"({parc.mc_samples} samples, seed {config.random_seed}) and volume-CV quality control; voxels outside the "
        "intracranial mask were set to background, and the labels were resampled to the grid of the raw T1w with "
        "nearest-neighbour interpolation." + _tta_sentence(parc.tta) + _refinement_sentence(parc)
        + _fusion_sentence(seg, len(manifests)) + refs
    )


def _fusion_sentence(seg, n_parc: int) -> str:
    """The methods' sentence on the fusion of the two ensembles ("" when the whole-brain branch does not run)."""
    if seg is None or not seg.active:
        return ""
    n_seg = len(seg.checkpoints)
    return (f" The two ensembles were fused before any refinement and labelling: the probability of every "
            f"whole-brain structure was the mean over all {n_seg + n_parc} networks (the parcellation's summed "
            "into the structures they subdivide), and every parcel received its structure's fused probability in "
            "the parcellation ensemble's proportions; the parcellation labels were taken top-down (the structure, "
            "then its most probable parcel), so that the two label maps agree. The QC stayed each ensemble's own.")


def write_citation(config, versions) -> Path:
    return atomic_write_text(config.output_dir / "logs" / "CITATION.md", boilerplate(config, versions))


def _record_path(output_dir: Path, label: str) -> Path:
    return Path(output_dir) / "logs" / f"{label}_record.json"


def read_record(output_dir: Path, label: str) -> dict | None:
    path = _record_path(output_dir, label)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _sidecar(output_dir: Path, source_file: str, **entities) -> dict:
    ents = source_entities(source_file)
    ents.update(entities, extension=".json")
    path = Path(output_dir) / derivative_path(ents)
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics(output_dir: Path, source_file: str, template: str) -> dict[str, float]:
    icv = _sidecar(output_dir, source_file, label="ICV", suffix="mask").get("VolumeML")
    brain = _sidecar(output_dir, source_file, desc="brain", suffix="mask").get("VolumeML")
    ncc = _sidecar(output_dir, source_file, space=template, desc="preproc", suffix="T1w").get("RegistrationNCC")
    out: dict[str, float] = {}
    if icv is not None:
        out["icv_ml"] = icv
    if brain is not None:
        out["brain_ml"] = brain
    if icv and brain:
        out["brain_icv_ratio"] = round(brain / icv, 4)
    if ncc is not None:
        out["registration_ncc"] = ncc
    return out


def write_record(config, run, *, versions, template: str) -> dict:
    """Write what happened to one subject; the group level and ``--reports-only`` read it back."""
    inputs = run.inputs
    record = {
        "label": inputs.label, "subject": inputs.subject, "session": inputs.session, "status": run.status,
        "error": run.error, "warnings": run.warnings, "inputs": run.input_summary,
        "source_file": str(inputs.t1w) if inputs.t1w else None, "template": template,
        "runtimes": [{"stage": k, "seconds": round(v, 2)} for k, v in run.stage_seconds.items()],
        "metrics": _metrics(config.output_dir, str(inputs.t1w), template) if run.status == "success" else {},
        "segmentation": _segmentation_record(config, str(inputs.t1w) if inputs.t1w else None, run.status),
        "parcellation": _parcellation_record(config, str(inputs.t1w) if inputs.t1w else None, run.status),
        "version": config.version, "command": config.command, "run_uuid": config.run_uuid,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "software": versions,
        "bids_dir": str(config.bids_dir),
    }
    seg = record["segmentation"]
    if seg.get("mean_cv_percent") is not None:
        record["metrics"]["seg_mean_cv_percent"] = round(float(seg["mean_cv_percent"]), 4)
    parc = record["parcellation"]
    if parc.get("mean_cv_percent") is not None:
        record["metrics"]["parc_mean_cv_percent"] = round(float(parc["mean_cv_percent"]), 4)
    atomic_write_json(_record_path(config.output_dir, inputs.label), record)
    return record


def _derivative(output_dir: Path, source_file: str, **entities) -> Path:
    ents = source_entities(source_file)
    ents.update(entities)
    return Path(output_dir) / derivative_path(ents)


def _segmentation_record(config, source_file: str | None, status: str) -> dict:
    """What the whole-brain branch did for one subject: QC summary and volumes (from the derivatives)."""
    from ..bids import seg_entity

    seg = getattr(config, "segmentation", None)
    own = {"wholebrain", "cerebrum7", seg_entity(seg.protocol) if seg is not None and seg.protocol else "wholebrain"}
    return _branch_record(seg, config.output_dir, source_file, status, "wholebrain",
                          tuple(n for n in RECORD_SEGMENTATIONS if n in own))


def _parcellation_record(config, source_file: str | None, status: str) -> dict:
    """What the cortical parcellation branch did for one subject (``seg-<x>_qc.json`` and its volumes)."""
    from ..bids import seg_entity

    parc = getattr(config, "parcellation", None)
    name = seg_entity(parc.protocol) if parc is not None and parc.protocol else "dkt"
    return _branch_record(parc, config.output_dir, source_file, status, name, (name,))


def _branch_record(seg, output_dir: Path, source_file: str | None, status: str, qc_seg: str,
                   volume_segs: tuple[str, ...]) -> dict:
    from ..core.morphometry import read_morphometry_tsv

    if seg is None:
        return {"status": "off", "reason": "not configured"}
    if not seg.enabled:
        return {"status": "off", "reason": seg.reason}
    if not seg.active:
        return {"status": "skipped", "reason": seg.reason}
    qc_path = _derivative(output_dir, source_file, segmentation=qc_seg, suffix="qc",
                          extension=".json") if source_file else None
    if status != "success" or qc_path is None or not qc_path.is_file():
        return {"status": "failed" if status != "success" else "missing", "reason": "no segmentation outputs"}
    qc = json.loads(qc_path.read_text())
    volumes = {}
    for name in volume_segs:
        path = _derivative(output_dir, source_file, segmentation=name, suffix="morph", extension=".tsv")
        if path.is_file():
            volumes[name] = read_morphometry_tsv(path)
    return {
        "status": "done", "segmentation": qc_seg, "models": [m.get("Name") for m in qc.get("Models", [])],
        "label_protocol": qc.get("LabelProtocol"), "mc_samples": qc.get("MCSamples"), "seed": qc.get("Seed"),
        "mean_cv_percent": qc.get("MeanCVPercent"), "qc_threshold_percent": qc.get("QCThresholdPercent"),
        "qc_flag": qc.get("QCFlag"), "deep14_mean_cv_percent": qc.get("Deep14MeanCVPercent"),
        "qc_calibrated": bool((qc.get("QCCalibration") or {}).get("Calibrated")),
        "icv_ml": qc.get("ICVML"), "qc_file": str(qc_path.relative_to(output_dir)), "volumes": volumes,
        "input_resolution": qc.get("InputResolution") or {},
    }


METRIC_LABELS = {
    "icv_ml": ("Intracranial volume", "mL"),
    "brain_ml": ("Brain volume", "mL"),
    "brain_icv_ratio": ("Brain / intracranial volume", ""),
    "registration_ncc": ("Correlation with the template after registration", ""),
    "runtime_s": ("Run time", "s"),
    "seg_mean_cv_percent": ("Segmentation: mean volume CV over MC-dropout samples", "%"),
    "parc_mean_cv_percent": ("Cortical parcellation: mean volume CV over MC-dropout samples", "%"),
}


def _fmt(value, digits: int = 2, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    try:
        return f"{float(value) * scale:.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def segmentation_section(output_dir: Path, record: dict) -> dict | None:
    """The "Whole-brain segmentation" section: outlines, entropy, volume/QC table; None when switched off."""
    seg = record.get("segmentation") or {}
    status = seg.get("status")
    if status in (None, "off"):
        return None
    section: dict[str, Any] = {"title": "Whole-brain segmentation", "reportlets": []}
    if status == "skipped":
        section["description"] = f"Not run: {seg.get('reason') or 'no models'}."
        return section
    if status != "done":
        section["description"] = "The segmentation did not finish (see the errors)."
        return section
    flag = str(seg.get("qc_flag") or "n/a")

    def percent(value) -> str:
        return "undefined" if value is None else f"{_fmt(value, 3)} %"

    section["description"] = (
        f"Ensemble of {len(seg.get('models') or [])} model(s) ({', '.join(map(str, seg.get('models') or []))}), "
        f"{seg.get('label_protocol')} protocol, {seg.get('mc_samples')} Monte-Carlo dropout samples (seed "
        f"{seg.get('seed')}). Mean volume CV {percent(seg.get('mean_cv_percent'))} against a threshold of "
        f"{_fmt(seg.get('qc_threshold_percent'))} % ({origin_text(bool(seg.get('qc_calibrated')))}): QC {flag.upper()}. Deep grey matter "
        "(14 structures): mean CV "
        f"{percent(seg.get('deep14_mean_cv_percent'))}.")
    geometry = seg.get("input_resolution") or {}
    if geometry.get("Flag") == "warn":
        section["description"] += f" Input resolution WARN: {geometry.get('Reason')}."
        if flag == "pass":
            flag = "warn"
    section["qc_flag"] = flag
    source = record.get("source_file")
    if source:
        for ents, caption in SEGMENTATION_REPORTLETS:
            ents = dict(ents)
            ents.update(source_entities(source), datatype="figures", extension=".svg")
            rel = derivative_path(ents)
            if (Path(output_dir) / rel).is_file():
                section["reportlets"].append({"path": rel, "caption": caption})
    rows = []
    for row in (seg.get("volumes") or {}).get("wholebrain", []):
        rows.append({
            "cells": [row.get("name"), _fmt(row.get("volume_mm3"), 2, 1e-3),
                      _fmt(row.get("volume_icv_fraction"), 3, 100), _fmt(row.get("asymmetry_index"), 3),
                      _fmt(row.get("mc_cv_percent"), 2), row.get("qc_flag") or "n/a"],
            "flagged": row.get("qc_flag") == "warn",
        })
    section["table"] = {
        "caption": "Volumes of the aseg structures (counted on the conformed T1w grid) with their MC-dropout QC. "
                   "AI: asymmetry index (L - R) / mean, on both rows of a pair. Rows whose volume CV exceeds the "
                   "threshold (or that are absent from every sample) are highlighted.",
        "columns": ["Structure", "Volume (mL)", "% ICV", "AI", "CV (%)", "QC"],
        "numeric": [False, True, True, True, True, False],
        "rows": rows,
    }
    return section


def parcellation_section(output_dir: Path, record: dict) -> dict | None:
    """The "Cortical parcellation" section: parcel outlines and the QC line; None when switched off.

    No volume table (the parcels' volumes and QC flags are in ``_seg-<x>_morph.tsv``).
    """
    parc = record.get("parcellation") or {}
    status = parc.get("status")
    if status in (None, "off"):
        return None
    section: dict[str, Any] = {"title": "Cortical parcellation", "reportlets": []}
    if status == "skipped":
        section["description"] = f"Not run: {parc.get('reason') or 'no models'}."
        return section
    if status != "done":
        section["description"] = "The parcellation did not finish (see the errors)."
        return section
    flag = str(parc.get("qc_flag") or "n/a")
    mean_cv = parc.get("mean_cv_percent")
    rows = next(iter((parc.get("volumes") or {}).values()), [])
    n_warn = sum(r.get("qc_flag") == "warn" for r in rows)
    seg = parc.get("segmentation") or "dkt"
    section["description"] = (
        f"Ensemble of {len(parc.get('models') or [])} model(s) ({', '.join(map(str, parc.get('models') or []))}), "
        f"{parc.get('label_protocol')} protocol, {parc.get('mc_samples')} Monte-Carlo dropout samples (seed "
        f"{parc.get('seed')}). Mean volume CV {'undefined' if mean_cv is None else _fmt(mean_cv, 3) + ' %'} "
        f"against a threshold of {_fmt(parc.get('qc_threshold_percent'))} % "
        f"({origin_text(bool(parc.get('qc_calibrated')))}): QC {flag.upper()}; {n_warn} of "
        f"{len(rows)} structures flagged (volumes and flags: _seg-{seg}_morph.tsv).")
    section["qc_flag"] = flag
    source = record.get("source_file")
    if source:
        ents = dict(source_entities(source), segmentation=seg, suffix="dseg", datatype="figures", extension=".svg")
        rel = derivative_path(ents)
        if (Path(output_dir) / rel).is_file():
            section["reportlets"].append({"path": rel, "caption": PARCELLATION_CAPTION.format(
                protocol=parc.get("label_protocol"))})
    return section


def subject_context(output_dir: Path, record: dict) -> dict:
    """The template context of one subject report (schema in ``reports/report.py``)."""
    output_dir = Path(output_dir)
    template = record.get("template", "MNI152NLin6Asym")
    sections: list[dict] = []
    source = record.get("source_file")
    if source:
        for title, ents, caption in REPORTLETS:
            ents = {k: v.format(template=template) for k, v in ents.items()}
            ents.update(source_entities(source), datatype="figures", extension=".svg")
            rel = derivative_path(ents)
            if (output_dir / rel).is_file():
                sections.append({"title": title, "reportlets": [{"path": rel,
                                                                  "caption": caption.format(template=template)}]})
    seg_section = segmentation_section(output_dir, record)
    if seg_section is not None:
        sections.append(seg_section)
    parc_section = parcellation_section(output_dir, record)
    if parc_section is not None:
        sections.append(parc_section)
    lobules = cerebellum_section(output_dir, record)
    if lobules is not None:
        sections.append(lobules)
    citation = output_dir / "logs" / "CITATION.md"
    inputs = []
    for item in record.get("inputs", []):
        item = dict(item)
        try:
            item["path"] = str(Path(item["path"]).relative_to(record.get("bids_dir", "")))
        except ValueError:
            pass
        inputs.append(item)
    return {
        "title": record["label"].replace("_", " "), "subject": record.get("subject"),
        "session": record.get("session"), "version": record.get("version"), "generated": record.get("finished"),
        "command": record.get("command"), "status": record.get("status"), "error": record.get("error"),
        "inputs": inputs, "sections": sections,
        "metrics": [{"name": METRIC_LABELS.get(k, (k, ""))[0], "value": v, "unit": METRIC_LABELS.get(k, (k, ""))[1]}
                    for k, v in record.get("metrics", {}).items()],
        "runtimes": record.get("runtimes", []), "software": record.get("software", []),
        "warnings": record.get("warnings", []), "errors": [record["error"]] if record.get("error") else [],
        "boilerplate": citation.read_text() if citation.is_file() else "",
    }


def cerebellum_section(output_dir: Path, record: dict) -> dict | None:
    """The "Cerebellar lobules" section (figures, volume table, prior/T2 lines); None when the subject has
    no cerebellum derivatives (``_seg-cerebellum_dseg``/``_morph.tsv``/``_qc.json``)."""
    from .lobules import lobule_section

    source = record.get("source_file")
    if not source:
        return None
    try:
        return lobule_section(output_dir, source, record.get("template") or "MNI152NLin6Asym")
    except Exception as exc:  # a broken derivative must not cost the user the whole report
        LOGGER.warning("%s: cerebellar-lobule section left out of the report: %s", record.get("label"), exc)
        return None


def write_cerebellum_pdf(output_dir: Path, record: dict, section: dict) -> Path | None:
    """The lobule section as ``<label>_seg-cerebellum_report.pdf`` next to the HTML report (None when
    WeasyPrint is unusable here or the rendering fails: both are logged, the HTML report goes on)."""
    from .lobules import lobule_pdf_path
    from .pdf import render_pdf_report

    label = record["label"]
    context = {
        "title": f"{label.replace('_', ' ')}: cerebellar lobules", "subject": record.get("subject"),
        "session": record.get("session"), "version": record.get("version"), "generated": record.get("finished"),
        "status": record.get("status"), "sections": [section],
    }
    try:
        return render_pdf_report(context, lobule_pdf_path(output_dir, label))
    except Exception as exc:
        LOGGER.warning("%s: the cerebellum PDF report could not be written: %s", label, exc)
        return None


def write_subject_report(output_dir: Path, record: dict) -> Path:
    """``<label>.html`` and, when the subject has cerebellum derivatives, ``<label>_seg-cerebellum_report.pdf``
    (linked from the lobule section)."""
    from .report import render_subject_report

    output_dir = Path(output_dir)
    context = subject_context(output_dir, record)
    for section in context["sections"]:
        if section.get("kind") == "lobules":
            pdf = write_cerebellum_pdf(output_dir, record, section)
            if pdf is not None:
                section["downloads"] = [{"path": pdf.name, "label": f"PDF version of this section ({pdf.name})"}]
    return render_subject_report(context, output_dir / f"{record['label']}.html")
