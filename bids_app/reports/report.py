"""HTML reports: one page per subject (and session) and one group page.

Both pages are rendered from the jinja2 templates in ``bids_app/reports/templates``
with autoescaping on, are self-contained (inline CSS, no JavaScript, nothing fetched
from the network) and are written atomically (temporary file in the same directory,
then :func:`os.replace`).

Figures are referenced by the relative paths given in the context, which are taken
relative to the directory of the HTML file (the output root; reportlets live under
``sub-XX/figures/``). Static SVG/PNG reportlets are embedded with ``<img>``;
interactive SVGs (the hover "flicker" figures from
:func:`bids_app.reports.reportlets.plot_before_after` and
``plot_registration(..., flicker=True)``, detected from the file or flagged with
``"interactive": True`` in the reportlet dict) use ``<object>`` because browsers do not
deliver mouse events to SVGs shown through ``<img>``. Group strip plots are inlined
in the page so that their point links are clickable and resolve against the page.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from ..atomic import atomic_output

LOGGER = logging.getLogger(__name__)

__all__ = ["TEMPLATES_DIR", "render_group_report", "render_subject_report", "section_view"]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

_FLICKER_MARKER = "arborseg-flicker"
_INLINE_SVG_MAX_BYTES = 3_000_000


# ----------------------------------------------------------------------- formatting
def _as_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_value(value: Any) -> str:
    """Human-friendly rendering of a metric value ("" for missing, "n/a" for NaN)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if not isinstance(value, numbers.Real):
        return str(value)
    num = float(value)
    if not math.isfinite(num):
        return "n/a"
    mag = abs(num)
    if mag >= 100:
        return f"{num:.1f}"
    if mag >= 1:
        return f"{num:.2f}"
    if mag == 0:
        return "0"
    return f"{num:.3g}"


def format_duration(seconds: Any) -> str:
    sec = _as_number(seconds)
    if sec is None or not math.isfinite(sec):
        return ""
    if sec < 60:
        return f"{sec:.1f} s"
    minutes, s = divmod(int(round(sec)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_dims(values: Any) -> str:
    """``[188, 256, 190]`` -> ``188 × 256 × 190``; floats get up to 3 decimals."""
    if values is None:
        return ""
    if isinstance(values, str):
        return values
    try:
        items = list(values)
    except TypeError:
        return str(values)
    parts = []
    for v in items:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            parts.append(str(int(v)))
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            parts.append(f"{float(v):.3f}".rstrip("0").rstrip("."))
        else:
            parts.append(str(v))
    return " \u00d7 ".join(parts)


def _url(path: Any) -> str:
    """Relative path -> URL path (forward slashes, percent-encoded where needed)."""
    text = str(path).replace("\\", "/")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", text) and not re.match(r"^[a-zA-Z]:/", text):
        return text  # already a URL (http:, file:, data: ...)
    return quote(text, safe="/#?=&;:@!$'()*+,~%")


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "section"
    slug, n = f"sec-{base}", 2
    while slug in used:
        slug = f"sec-{base}-{n}"
        n += 1
    used.add(slug)
    return slug


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _status(value: Any) -> str:
    text = str(value or "").strip().lower()
    if text in ("success", "succeeded", "ok", "passed", "done"):
        return "success"
    if text in ("failed", "failure", "error", "crashed"):
        return "failed"
    return text or "unknown"


def _list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)):
        return [value]
    return list(value)


# ---------------------------------------------------------------------- environment
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["value"] = format_value
    env.filters["duration"] = format_duration
    env.filters["dims"] = format_dims
    env.filters["url"] = _url
    return env


def _atomic_write_text(out_file: Path, text: str) -> Path:
    with atomic_output(out_file) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out_file


def _resolve(out_dir: Path, path: Any) -> Path | None:
    if not path:
        return None
    candidate = Path(str(path))
    return candidate if candidate.is_absolute() else out_dir / candidate


def _is_flicker(file: Path | None) -> bool:
    if file is None or file.suffix.lower() != ".svg":
        return False
    try:
        with open(file, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return _FLICKER_MARKER in head


def _rel(out_dir: Path, path: Any) -> str:
    """Paths are kept as given when relative; absolute ones under ``out_dir`` are made relative."""
    text = str(path)
    candidate = Path(text)
    if candidate.is_absolute():
        try:
            return candidate.relative_to(out_dir).as_posix()
        except ValueError:
            return candidate.as_uri()
    return text.replace("\\", "/")


def _figure(out_dir: Path, fig: Mapping | str) -> dict:
    if isinstance(fig, str):
        fig = {"path": fig}
    path = fig.get("path") or ""
    file = _resolve(out_dir, path)
    exists = bool(file and file.is_file())
    if path and not exists:
        LOGGER.warning("report figure not found: %s", file)
    interactive = fig.get("interactive")
    if interactive is None:
        interactive = _is_flicker(file) if exists else False
    return {
        "path": _rel(out_dir, path) if path else "",
        "caption": fig.get("caption") or "",
        "title": fig.get("title") or "",
        "interactive": bool(interactive),
        "missing": bool(path) and not exists,
        "is_svg": str(path).lower().endswith(".svg"),
    }


# ----------------------------------------------------------------- subject context
_CSS_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$")


def _css_color(value: Any) -> str | None:
    """A ``#rgb``/``#rrggbb``/``#rrggbbaa`` colour, or None (nothing else reaches a style attribute)."""
    text = str(value or "").strip()
    return text if _CSS_COLOR.match(text) else None


def section_view(sec: Mapping[str, Any], out_dir: Path, used_ids: set[str]) -> dict:
    """One report section ready for the templates (figures resolved against ``out_dir``).

    Keys: ``title``, ``description``, ``notes`` (sentences shown as a list), ``reportlets``,
    ``table``, ``downloads`` (``[{path, label}]`` links, e.g. the section's PDF), ``kind`` and
    ``qc_flag`` (passed through).
    """
    sec_title = str(sec.get("title") or "Figures")
    downloads = []
    for item in _list(sec.get("downloads")):
        if isinstance(item, Mapping) and item.get("path"):
            downloads.append({"path": _rel(out_dir, item["path"]), "label": str(item.get("label") or item["path"])})
    return {
        "id": _slug(sec_title, used_ids),
        "title": sec_title,
        "kind": str(sec.get("kind") or ""),
        "description": sec.get("description") or "",
        "notes": [str(n) for n in _list(sec.get("notes")) if n],
        "reportlets": [_figure(out_dir, r) for r in _list(sec.get("reportlets")) if r],
        "table": _table(sec.get("table")),
        "downloads": downloads,
        "qc_flag": str(sec.get("qc_flag") or ""),
    }


def _table(table: Any) -> dict | None:
    """A section table: ``{caption, columns, numeric: [bool], rows: [{cells, flagged}]}`` (cells as text)."""
    if not isinstance(table, Mapping) or not table.get("columns"):
        return None
    columns = [str(c) for c in _list(table.get("columns"))]
    numeric = [bool(x) for x in _list(table.get("numeric"))] + [False] * len(columns)
    rows = []
    for row in _list(table.get("rows")):
        if isinstance(row, Mapping):
            cells, flagged = _list(row.get("cells")), bool(row.get("flagged"))
        else:
            cells, flagged = _list(row), False
        color = row.get("color") if isinstance(row, Mapping) else None
        rows.append({"cells": [("" if c is None else (c if isinstance(c, str) else format_value(c))) for c in cells],
                     "flagged": flagged, "color": _css_color(color)})
    return {"caption": str(table.get("caption") or ""), "columns": columns, "numeric": numeric[: len(columns)],
            "rows": rows, "n_flagged": sum(r["flagged"] for r in rows)}


def _subject_view(context: Mapping[str, Any], out_dir: Path) -> dict:
    from bids_app import __version__

    ctx = dict(context or {})
    subject = ctx.get("subject")
    session = ctx.get("session")
    title = ctx.get("title")
    if not title:
        title = " ".join(x for x in (f"sub-{subject}" if subject else "", f"ses-{session}" if session else "") if x)
        title = title or "ArborSeg report"

    inputs = []
    for item in _list(ctx.get("inputs")):
        if not isinstance(item, Mapping):
            item = {"path": str(item)}
        vox = item.get("voxel_size")
        nums = [n for n in (_as_number(v) for v in _list(vox)) if n] if vox is not None and not isinstance(vox, str) else []
        inputs.append(
            {
                "path": item.get("path") or "",
                "suffix": item.get("suffix") or "",
                "shape": format_dims(item.get("shape")),
                "voxel_size": format_dims(vox),
                "anisotropic": bool(nums) and max(nums) / min(nums) > 1.5,
                "orientation": item.get("orientation") or "",
                "datatype": item.get("datatype") or "",
                "used": item.get("used"),
                "note": item.get("note") or "",
            }
        )

    used_ids: set[str] = {"summary", "runtimes", "about", "errors"}
    sections = []
    for sec in _list(ctx.get("sections")):
        if not isinstance(sec, Mapping):
            continue
        sections.append(section_view(sec, out_dir, used_ids))

    runtimes = []
    for item in _list(ctx.get("runtimes")):
        if not isinstance(item, Mapping):
            continue
        sec = _as_number(item.get("seconds"))
        runtimes.append({"stage": str(item.get("stage") or ""), "seconds": sec if sec is not None and math.isfinite(sec) else None})
    longest = max((r["seconds"] for r in runtimes if r["seconds"]), default=0.0)
    total = sum(r["seconds"] for r in runtimes if r["seconds"])
    for r in runtimes:
        r["text"] = format_duration(r["seconds"]) if r["seconds"] is not None else "\u2014"
        r["pct"] = round(100.0 * r["seconds"] / longest, 1) if longest and r["seconds"] else 0.0
        share = 100.0 * r["seconds"] / total if total and r["seconds"] else None
        r["share"] = "" if share is None else ("<1%" if share < 1 else f"{share:.0f}%")

    metrics = []
    for item in _list(ctx.get("metrics")):
        if isinstance(item, Mapping):
            metrics.append({"name": item.get("name") or "", "value": format_value(item.get("value")), "unit": item.get("unit") or ""})

    software = []
    for item in _list(ctx.get("software")):
        if isinstance(item, Mapping):
            software.append({"name": item.get("name") or "", "version": str(item.get("version") or "")})

    errors = [str(e) for e in _list(ctx.get("errors")) if e]
    headline = str(ctx.get("error") or "").strip()
    if headline and not any(headline in e for e in errors):
        errors.insert(0, headline)
    status = _status(ctx.get("status") or ("failed" if errors else ""))

    nav = [{"id": "summary", "label": "Summary"}]
    nav += [{"id": s["id"], "label": s["title"]} for s in sections]
    if runtimes:
        nav.append({"id": "runtimes", "label": "Run times"})
    nav.append({"id": "about", "label": "About / Methods"})
    if errors:
        nav.append({"id": "errors", "label": "Errors", "error": True})

    return {
        "title": str(title),
        "subject": subject,
        "session": session,
        "version": ctx.get("version") or __version__,
        "generated": ctx.get("generated") or _now_utc(),
        "command": ctx.get("command") or "",
        "status": status,
        "error": ctx.get("error"),
        "errors": errors,
        "error_headline": (headline or (errors[0].strip().splitlines() or [""])[-1]) if errors else "",
        "inputs": inputs,
        "sections": sections,
        "metrics": metrics,
        "runtimes": runtimes,
        "runtime_total": format_duration(total) if runtimes else "",
        "software": software,
        "warnings": [str(w) for w in _list(ctx.get("warnings")) if w],
        "boilerplate": str(ctx.get("boilerplate") or ""),
        "nav": nav,
    }


# ------------------------------------------------------------------- group context
_SVG_PROLOG = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.IGNORECASE)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_SVG_ID = re.compile(r'\bid="([^"]+)"')
_SVG_REF = re.compile(r'(url\(#|href="#)([^")]+)')


def _inline_svg(file: Path, prefix: str) -> Markup | None:
    """SVG text ready to be placed in the page, ids prefixed so figures cannot clash."""
    try:
        if file.stat().st_size > _INLINE_SVG_MAX_BYTES:
            return None
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "<svg" not in text or re.search(r"<script|<foreignObject|\son[a-z]+\s*=", text, re.IGNORECASE):
        LOGGER.info("not inlining %s (scripted or not SVG); using <object>", file)
        return None
    text = _SVG_METADATA.sub("", _SVG_PROLOG.sub("", text, count=1))
    text = _SVG_ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = _SVG_REF.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", text)
    # matplotlib's document-wide "*{stroke-...}" rule must not leak into the page
    text = re.sub(r"(<style[^>]*>\s*(?:<!\[CDATA\[)?\s*)\*\s*\{", r"\1svg.inline-figure *{", text)
    text = text.replace("<svg", '<svg class="inline-figure" role="img"', 1)
    return Markup(text)


def _group_view(context: Mapping[str, Any], out_dir: Path) -> dict:
    from bids_app import __version__

    ctx = dict(context or {})
    rows_in = [r for r in _list(ctx.get("rows")) if isinstance(r, Mapping)]
    columns = [str(c) for c in _list(ctx.get("columns"))]
    rows = []
    for r in rows_in:
        status = _status(r.get("status") or ("failed" if r.get("error") else ""))
        label = r.get("label") or " ".join(
            x for x in (f"sub-{r['subject']}" if r.get("subject") else "", f"ses-{r['session']}" if r.get("session") else "") if x
        )
        rows.append(
            {
                "label": label or "?",
                "subject": r.get("subject") or "",
                "session": r.get("session") or "",
                "status": status,
                "failed": status == "failed",
                "error": r.get("error") or "",
                "report": _rel(out_dir, r["report"]) if r.get("report") else "",
                "values": [format_value(r.get(c)) for c in columns],
            }
        )
    n_failed = ctx.get("n_failed")
    if n_failed is None:
        n_failed = sum(r["failed"] for r in rows)
    n_subjects = ctx.get("n_subjects")
    if n_subjects is None:
        n_subjects = len({r["subject"] or r["label"] for r in rows})

    figures = []
    for i, fig in enumerate(_list(ctx.get("figures"))):
        if not fig:
            continue
        item = _figure(out_dir, fig)
        file = _resolve(out_dir, fig.get("path") if isinstance(fig, Mapping) else fig)
        item["inline"] = _inline_svg(file, f"g{i}-") if (file and item["is_svg"] and not item["missing"]) else None
        figures.append(item)

    nav = [{"id": "summary", "label": "Summary"}, {"id": "subjects", "label": "Subjects"}]
    if figures:
        nav.append({"id": "figures", "label": "Figures"})
    warnings = [str(w) for w in _list(ctx.get("warnings")) if w]
    if warnings:
        nav.append({"id": "warnings", "label": "Warnings"})
    return {
        "title": ctx.get("title") or "ArborSeg group report",
        "version": ctx.get("version") or __version__,
        "generated": ctx.get("generated") or _now_utc(),
        "command": ctx.get("command") or "",
        "n_subjects": n_subjects,
        "n_runs": len(rows),
        "n_failed": n_failed,
        "columns": columns,
        "rows": rows,
        "figures": figures,
        "warnings": warnings,
        "nav": nav,
    }


# ------------------------------------------------------------------------ public API
def _render(template: str, view: dict, out_file: Path) -> Path:
    html = _environment().get_template(template).render(**view)
    _atomic_write_text(out_file, html)
    LOGGER.info("wrote %s", out_file)
    return out_file


def render_subject_report(context: Mapping[str, Any], out_file: str | os.PathLike) -> Path:
    """Render the subject (or subject-session) report to ``out_file`` and return its path.

    ``context`` keys (every one may be missing)::

        title: str                      e.g. "sub-01 ses-A" (default from subject/session)
        subject, session: str | None
        version, generated, command: str
        status: "success" | "failed"    (anything else shows as a grey badge)
        error: str | None               headline of the failure
        errors: [str]                   crash texts, shown in the Errors section
        inputs: [{path, suffix, shape, voxel_size, orientation, datatype, used, note}]
        sections: [{title, description?, notes?: [str], downloads?: [{path, label}],
                    reportlets: [{path, caption, title?, interactive?}],
                    table?: {caption, columns, numeric: [bool], rows: [{cells, flagged, color?}]}}]
        metrics: [{name, value, unit}]
        runtimes: [{stage, seconds}]
        software: [{name, version}]
        warnings: [str]
        boilerplate: str                methods text (newlines kept)

    Figure paths are relative to the directory of ``out_file``. A reportlet is embedded
    with ``<object>`` when ``interactive`` is true or, if unset, when the file is one of
    the hover "flicker" SVGs; otherwise with ``<img>``.
    """
    out_file = Path(out_file)
    return _render("subject.html.j2", _subject_view(context, out_file.parent), out_file)


def render_group_report(context: Mapping[str, Any], out_file: str | os.PathLike) -> Path:
    """Render the group report (status table, strip plots, warnings) to ``out_file``.

    ``context`` keys: ``version``, ``generated``, ``command``, ``n_subjects``,
    ``n_failed`` (both computed from ``rows`` when missing), ``columns`` (metric keys
    shown as table columns), ``rows`` (``[{label, subject, session, status, error,
    report, <column>: value}]``), ``figures`` (``[{path, caption}]``; SVGs are inlined so
    their links work) and ``warnings``.
    """
    out_file = Path(out_file)
    return _render("group.html.j2", _group_view(context, out_file.parent), out_file)

