"""Group level: gather every subject's record into ``group.tsv`` and ``group.html``, the whole-brain
segmentation tables into ``group_volumes_<seg>.tsv`` and ``group_seg_qc.tsv``, and the cortical
parcellation's into ``group_volumes_dkt.tsv`` and ``group_seg_qc_dkt.tsv``."""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from ..bids import atomic_write_text
from ..errors import EXIT_OK, DatasetError
from ..reports.build import METRIC_LABELS

LOGGER = logging.getLogger("arborseg")

#: Columns of ``group.tsv`` after label/subject/session/status.
METRICS = ("icv_ml", "brain_ml", "brain_icv_ratio", "registration_ncc", "runtime_s")


def collect_records(output_dir: Path, participant_label=(), session_label=()) -> list[dict]:
    records = []
    for path in sorted((Path(output_dir) / "logs").glob("sub-*_record.json")):
        record = json.loads(path.read_text())
        if participant_label and record.get("subject") not in participant_label:
            continue
        if session_label and record.get("session") not in session_label:
            continue
        records.append(record)
    return records


def group_rows(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        row = {"label": rec["label"], "subject": rec.get("subject"), "session": rec.get("session") or "",
               "status": rec.get("status"), "error": rec.get("error") or "", "report": f"{rec['label']}.html"}
        metrics = rec.get("metrics", {})
        for key in METRICS[:-1]:
            row[key] = metrics.get(key)
        row["runtime_s"] = round(sum(r["seconds"] for r in rec.get("runtimes", [])), 1) or None
        rows.append(row)
    return rows


def rows_to_tsv(rows: list[dict]) -> str:
    return _tsv(["label", "subject", "session", "status", *METRICS, "error"], rows)


SEG_QC_COLUMNS = ("label", "subject", "session", "qc_flag", "mean_cv_percent", "qc_threshold_percent",
                  "deep14_mean_cv_percent", "n_structures_warn", "label_protocol", "models", "mc_samples", "tta",
                  "refinement", "seed", "input_flag", "input_thickest_mm")


def _tsv(columns, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["n/a" if row.get(c) in (None, "") else row.get(c) for c in columns])
    return buf.getvalue()


#: the QC file (``seg-<x>_qc.json``) of the whole-brain branch; every other one is a parcellation's
WHOLEBRAIN_SEG = "wholebrain"


def qc_table_name(seg: str) -> str:
    """``group_seg_qc.tsv`` for the whole-brain segmentation, ``group_seg_qc_<seg>.tsv`` for a parcellation."""
    return "group_seg_qc.tsv" if seg == WHOLEBRAIN_SEG else f"group_seg_qc_{seg}.tsv"


def collect_segmentations(output_dir: Path, records: list[dict]) -> tuple[dict[str, list[dict]],
                                                                          dict[str, list[dict]]]:
    """Every subject's ``_morph.tsv`` and ``_qc.json``: ``({seg: [row per subject]}, {qc seg: [QC row per subject]})``.

    Volume rows hold ``label``, ``subject``, ``session``, ``report``, ``seg_qc_flag`` (the flag of
    the branch that wrote them: its own ``seg-<x>_qc.json``, else the whole-brain one) and one key
    per structure name (mm3); the QC rows (keyed ``wholebrain`` and e.g. ``dkt``) the
    :data:`SEG_QC_COLUMNS`.
    """
    from ..bids import derivative_path, source_entities
    from ..core.morphometry import read_morphometry_tsv

    volumes: dict[str, list[dict]] = {}
    qc_rows: dict[str, list[dict]] = {}
    for rec in records:
        source = rec.get("source_file")
        if not source or rec.get("status") != "success":
            continue
        ents = source_entities(source)
        base = {"label": rec["label"], "subject": rec.get("subject"), "session": rec.get("session") or "",
                "report": f"{rec['label']}.html"}

        def files(suffix: str, extension: str) -> dict[str, Path]:
            pattern = derivative_path(dict(ents, segmentation="SEGMENTATION", suffix=suffix, extension=extension))
            found = sorted(Path(output_dir).glob(pattern.replace("SEGMENTATION", "*")))
            return {p.name.split("_seg-", 1)[1].split("_", 1)[0]: p for p in found}

        qcs = {seg: json.loads(path.read_text()) for seg, path in files("qc", ".json").items()}
        if not qcs:
            continue
        for seg, path in files("morph", ".tsv").items():
            qc = qcs.get(seg) or qcs.get(WHOLEBRAIN_SEG)
            if qc is None:
                continue
            row = dict(base, seg_qc_flag=qc.get("QCFlag"))
            for item in read_morphometry_tsv(path):
                row[item["name"]] = item.get("volume_mm3")
            volumes.setdefault(seg, []).append(row)
        for seg, qc in qcs.items():
            protocol = "aseg" if seg == WHOLEBRAIN_SEG else qc.get("LabelProtocol")
            structures = ((qc.get("Protocols") or {}).get(protocol) or {}).get("Structures") or []
            geometry = qc.get("InputResolution") or {}
            qc_rows.setdefault(seg, []).append(dict(
                base, qc_flag=qc.get("QCFlag"), mean_cv_percent=qc.get("MeanCVPercent"),
                qc_threshold_percent=qc.get("QCThresholdPercent"),
                deep14_mean_cv_percent=qc.get("Deep14MeanCVPercent"),
                n_structures_warn=sum(s.get("qc_flag") == "warn" for s in structures),
                label_protocol=qc.get("LabelProtocol"),
                models="+".join(str(m.get("Name")) for m in qc.get("Models", [])),
                mc_samples=qc.get("MCSamples"), tta=qc.get("TestTimeAugmentation", "none"),
                refinement=qc.get("Refinement", "none"), seed=qc.get("Seed"),
                seg_mean_cv_percent=qc.get("MeanCVPercent"),
                input_flag=geometry.get("Flag"), input_thickest_mm=geometry.get("ThickestMM")))
    return volumes, qc_rows


def write_segmentation_tables(output_dir: Path, volumes: dict[str, list[dict]],
                              qc_rows: dict[str, list[dict]]) -> list[Path]:
    """``group_volumes_<seg>.tsv`` (one row per subject/session, one column per structure, mm3),
    ``group_seg_qc.tsv`` (whole-brain) and ``group_seg_qc_<seg>.tsv`` (parcellations); returns the paths."""
    written = []
    for seg, rows in sorted(volumes.items()):
        structures: list[str] = []
        for row in rows:
            for key in row:
                if key not in ("label", "subject", "session", "report", "seg_qc_flag") and key not in structures:
                    structures.append(key)
        path = Path(output_dir) / f"group_volumes_{seg}.tsv"
        atomic_write_text(path, _tsv(["label", "subject", "session", *structures], rows))
        written.append(path)
    for seg, rows in sorted(qc_rows.items()):
        path = Path(output_dir) / qc_table_name(seg)
        atomic_write_text(path, _tsv(SEG_QC_COLUMNS, rows))
        written.append(path)
    return written


def segmentation_figures(output_dir: Path, volumes: dict[str, list[dict]],
                         qc_rows: dict[str, list[dict]]) -> list[dict]:
    """The mean CV of every subject (per branch), and one strip plot per structure family of the aseg protocol."""
    from ..core.labels import load_protocol, protocol_families
    from ..reports.reportlets import plot_group_strip, plot_group_structures

    figures = []
    (Path(output_dir) / "figures").mkdir(parents=True, exist_ok=True)
    for seg, rows in sorted(qc_rows.items(), key=lambda item: item[0] != WHOLEBRAIN_SEG):
        if seg == WHOLEBRAIN_SEG:
            rel, what = "figures/group_desc-segmeancv_strip.svg", "Whole-brain segmentation"
            title = "Segmentation: mean volume CV over MC-dropout samples (%)"
        else:
            rel, what = f"figures/group_seg-{seg}_desc-meancv_strip.svg", f"Cortical parcellation (seg-{seg})"
            title = f"{what}: mean volume CV over MC-dropout samples (%)"
        plot_group_strip(rows, "seg_mean_cv_percent", Path(output_dir) / rel, label_key="label",
                         link_key="report", title=title)
        figures.append({"path": rel, "caption": f"{what}: mean volume CV over the Monte-Carlo dropout samples (%)"})
    rows = volumes.get(WHOLEBRAIN_SEG) or []
    if not rows:
        return figures
    protocol = load_protocol("aseg")
    for family, positions in protocol_families(protocol).items():
        structures = [(protocol.names[k], protocol.names[k]) for k in positions]
        rel = f"figures/group_seg-wholebrain_desc-{family.replace('-', '')}_strip.svg"
        plot_group_structures(rows, structures, Path(output_dir) / rel, label_key="label", link_key="report",
                              flag_key="seg_qc_flag", title=f"Whole-brain segmentation: {family.replace('-', ' ')}")
        figures.append({"path": rel, "caption": f"Volumes of the {family.replace('-', ' ')} structures (aseg), "
                                                "relative to the group median; outliers in orange, subjects whose "
                                                "segmentation QC says warn as red diamonds"})
    return figures


def run_group(config) -> int:
    from ..bids import write_dataset_description
    from ..reports.reportlets import plot_group_strip
    from ..reports.report import render_group_report

    output_dir = config.output_dir
    records = collect_records(output_dir, config.participant_label, config.session_label)
    if not records:
        raise DatasetError(f"{output_dir}: no participant results found (logs/sub-*_record.json); run the "
                           f"participant level first")
    write_dataset_description(output_dir, bids_dir=config.bids_dir, version=config.version)
    rows = group_rows(records)
    atomic_write_text(output_dir / "group.tsv", rows_to_tsv(rows))
    figures = []
    for metric in METRICS:
        if sum(r.get(metric) is not None for r in rows) == 0:
            continue
        rel = f"figures/group_desc-{metric.replace('_', '')}_strip.svg"
        (output_dir / "figures").mkdir(parents=True, exist_ok=True)
        plot_group_strip(rows, metric, output_dir / rel, label_key="label", link_key="report")
        name, unit = METRIC_LABELS.get(metric, (metric, ""))
        figures.append({"path": rel, "caption": f"{name} ({unit})" if unit else name})
    volumes, qc_rows = collect_segmentations(output_dir, records)
    tables = write_segmentation_tables(output_dir, volumes, qc_rows)
    figures += segmentation_figures(output_dir, volumes, qc_rows)
    failed = [r for r in rows if r["status"] != "success"]
    warnings = [f"{r['label']}: {r['status']} ({r['error']})" for r in failed]
    for seg, rows_qc in sorted(qc_rows.items(), key=lambda item: item[0] != WHOLEBRAIN_SEG):
        what = "whole-brain segmentation" if seg == WHOLEBRAIN_SEG else f"cortical parcellation (seg-{seg})"
        warnings += [f"{q['label']}: {what} QC warn (mean volume CV "
                     f"{'undefined' if q['mean_cv_percent'] is None else format(q['mean_cv_percent'], '.3g') + ' %'}"
                     f", threshold {q['qc_threshold_percent']} %)" for q in rows_qc if q.get("qc_flag") == "warn"]
    context = {
        "version": config.version, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": config.command, "n_subjects": len(rows), "n_failed": len(failed), "columns": list(METRICS),
        "rows": rows, "figures": figures, "warnings": warnings,
    }
    report = render_group_report(context, output_dir / "group.html")
    LOGGER.info("group: %d subject(s), %d failed | table: %s | report: %s", len(rows), len(failed),
                output_dir / "group.tsv", report)
    if tables:
        LOGGER.info("group: segmentation tables %s", ", ".join(p.name for p in tables))
    return EXIT_OK
