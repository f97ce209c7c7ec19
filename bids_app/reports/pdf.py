"""PDF reports rendered with WeasyPrint (HTML + CSS for print -> PDF), as DeepCERES gives its users.

:func:`render_pdf_report` takes the same section dicts as the HTML subject report
(:func:`bids_app.reports.report.render_subject_report`), renders them with the print template
``templates/pdf_report.html.j2`` (A4, running footer with the subject, the ArborSeg version and the
page numbers) and writes the PDF atomically. SVG and PNG figures are read from the paths in the
sections, relative to the folder of the PDF; only ``file:`` and ``data:`` URLs are ever fetched.

WeasyPrint needs Pango (Debian: ``libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0`` and a font
such as ``fonts-dejavu-core``). When the package or those libraries are missing, the PDF is skipped
with a warning that says what to install, and callers carry on (the HTML report does not need it).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_output

LOGGER = logging.getLogger(__name__)

__all__ = ["pdf_unavailable_reason", "render_pdf_html", "render_pdf_report"]

PDF_TEMPLATE = "pdf_report.html.j2"
#: what to install when WeasyPrint cannot be imported
INSTALL_HINT = ("pip install weasyprint (a dependency of ArborSeg) and, on Debian/Ubuntu, apt-get install "
                "libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core")


def _import_weasyprint():
    """The ``weasyprint`` module (raises ImportError, or OSError when Pango & co cannot be loaded)."""
    import weasyprint

    return weasyprint


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def pdf_unavailable_reason() -> str | None:
    """None when PDFs can be written; otherwise why not (the import error)."""
    try:
        _import_weasyprint()
    except (ImportError, OSError) as exc:
        return _why(exc)
    return None


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _w3c_date(text: str) -> str | None:
    """``2026-01-02 03:04 UTC`` (the reports' format) -> ``2026-01-02T03:04Z`` (PDF metadata); None if unknown."""
    for fmt in ("%Y-%m-%d %H:%M UTC", "%Y-%m-%d %H:%M:%S UTC", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"):
        try:
            value = _dt.datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


def _pdf_view(context: Mapping[str, Any], out_dir: Path) -> dict:
    from bids_app import __version__

    from .report import _list, _status, section_view

    ctx = dict(context or {})
    subject, session = ctx.get("subject"), ctx.get("session")
    ident = " ".join(x for x in (f"sub-{subject}" if subject else "", f"ses-{session}" if session else "") if x)
    title = str(ctx.get("title") or ident or "ArborSeg report")
    used: set[str] = set()
    sections = [section_view(s, out_dir, used) for s in _list(ctx.get("sections")) if isinstance(s, Mapping)]
    version = str(ctx.get("version") or __version__)
    generated = str(ctx.get("generated") or _now_utc())
    return {
        "title": title,
        "ident": ident,
        "subject": subject,
        "session": session,
        "version": version,
        "generated": generated,
        "created": _w3c_date(generated),
        "status": _status(ctx.get("status")) if ctx.get("status") else "",
        "keywords": ", ".join(x for x in (ident, "ArborSeg", *(s["title"] for s in sections)) if x),
        "sections": sections,
        "running": f"{ident or title} \u00b7 ArborSeg {version}",
    }


def render_pdf_html(context: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    """The print HTML of :func:`render_pdf_report` (figure paths relative to ``out_dir``)."""
    from .report import _environment

    return _environment().get_template(PDF_TEMPLATE).render(**_pdf_view(context, Path(out_dir)))


def _fetcher(weasyprint):
    """A URL fetcher limited to local files and data URLs (None: WeasyPrint's default)."""
    cls = getattr(getattr(weasyprint, "urls", None), "URLFetcher", None)
    if cls is None:  # pragma: no cover - older WeasyPrint: default fetcher, our pages link nothing remote
        return None
    try:
        return cls(allowed_protocols={"file", "data"})
    except TypeError:  # pragma: no cover
        return None


def render_pdf_report(context: Mapping[str, Any], out_file: str | os.PathLike) -> Path | None:
    """Render ``context`` (``title``, ``subject``, ``session``, ``version``, ``generated``, ``status``,
    ``sections`` as in the HTML subject report) to the PDF ``out_file``, written atomically.

    Returns the path, or None (with a warning naming what to install) when WeasyPrint or its
    system libraries are missing. Figures that cannot be read are left out by WeasyPrint with a
    warning of its own; the page keeps their caption.
    """
    out_file = Path(out_file)
    try:
        weasyprint = _import_weasyprint()
    except (ImportError, OSError) as exc:
        LOGGER.warning("PDF report %s not written: WeasyPrint is not usable here (%s). Install it with: %s",
                       out_file.name, _why(exc), INSTALL_HINT)
        return None
    out_dir = out_file.parent
    html = render_pdf_html(context, out_dir)
    base_url = out_dir.resolve().as_uri() + "/"
    fetcher = _fetcher(weasyprint)
    kwargs = {"url_fetcher": fetcher} if fetcher is not None else {}
    document = weasyprint.HTML(string=html, base_url=base_url, **kwargs)
    payload = document.write_pdf()
    if not payload or not payload.startswith(b"%PDF"):
        raise RuntimeError(f"{out_file}: WeasyPrint returned no PDF")
    with atomic_output(out_file) as tmp:
        tmp.write_bytes(payload)
    LOGGER.info("wrote %s", out_file)
    return out_file
