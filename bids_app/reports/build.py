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


def software_versions() -> list[dict[str, str]]:
    names = [("ArborSeg", "arborseg"), ("Nipype", "nipype"), ("ANTsPy", "antspyx"), ("PyBIDS", "pybids"),
             ("NiBabel", "nibabel"), ("NumPy", "numpy"), ("SciPy", "scipy"), ("TemplateFlow", "templateflow"),
             ("Matplotlib", "matplotlib"), ("Jinja2", "jinja2")]
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
        template=config.template, percentile=p.normalise_percentile, box=f"x, y, z: {box}")


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
        "version": config.version, "command": config.command, "run_uuid": config.run_uuid,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "software": versions,
        "bids_dir": str(config.bids_dir),
    }
    atomic_write_json(_record_path(config.output_dir, inputs.label), record)
    return record


METRIC_LABELS = {
    "icv_ml": ("Intracranial volume", "mL"),
    "brain_ml": ("Brain volume", "mL"),
    "brain_icv_ratio": ("Brain / intracranial volume", ""),
    "registration_ncc": ("Correlation with the template after registration", ""),
    "runtime_s": ("Run time", "s"),
}


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


def write_subject_report(output_dir: Path, record: dict) -> Path:
    from .report import render_subject_report

    return render_subject_report(subject_context(output_dir, record), Path(output_dir) / f"{record['label']}.html")
