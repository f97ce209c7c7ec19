"""Group level: gather every subject's record into ``group.tsv`` and ``group.html``."""

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
    columns = ["label", "subject", "session", "status", *METRICS, "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["n/a" if row.get(c) in (None, "") else row.get(c) for c in columns])
    return buf.getvalue()


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
    failed = [r for r in rows if r["status"] != "success"]
    context = {
        "version": config.version, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": config.command, "n_subjects": len(rows), "n_failed": len(failed), "columns": list(METRICS),
        "rows": rows, "figures": figures,
        "warnings": [f"{r['label']}: {r['status']} ({r['error']})" for r in failed],
    }
    report = render_group_report(context, output_dir / "group.html")
    LOGGER.info("group: %d subject(s), %d failed | table: %s | report: %s", len(rows), len(failed),
                output_dir / "group.tsv", report)
    return EXIT_OK
