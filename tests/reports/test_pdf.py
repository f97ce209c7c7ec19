"""The PDF reports (bids_app.reports.pdf, WeasyPrint): a real PDF with the lobule section, SVG and PNG figures
inside, atomic writing, and a clear skip (HTML still written) when WeasyPrint cannot be loaded.

WeasyPrint is a dependency and CI installs its system libraries (.ci/run), where ARBORSEG_REQUIRE_PDF=1 turns
a missing WeasyPrint into failures instead of skips."""

from __future__ import annotations

import logging
import os
import re
import zlib

import pytest

from bids_app.reports import pdf as pdf_mod
from bids_app.reports.build import write_subject_report
from bids_app.reports.pdf import pdf_unavailable_reason, render_pdf_report
from tests.reports.test_lobule_report import SOURCE, TEMPLATE, _record, write_derivatives

REASON = pdf_unavailable_reason()
REQUIRED = os.environ.get("ARBORSEG_REQUIRE_PDF", "") not in ("", "0")
needs_pdf = pytest.mark.skipif(REASON is not None and not REQUIRED, reason=f"WeasyPrint not usable here: {REASON}")


@pytest.fixture(scope="module")
def lobule_figures(tmp_path_factory):
    """The lobule figures of sub-01, drawn once for this module."""
    root = tmp_path_factory.mktemp("pdf_figures")
    write_derivatives(root)
    return root / "sub-01" / "figures"


def _inflate(payload: bytes) -> bytes:
    """The PDF with every Flate stream decompressed (objects streams hold the page tree and metadata)."""
    out = [payload]
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", payload, re.S):
        try:
            out.append(zlib.decompress(m.group(1)))
        except zlib.error:
            pass
    return b"\n".join(out)


def _pages(inflated: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page\b", inflated))


def test_weasyprint_is_usable():
    if REASON is not None:
        if REQUIRED:
            pytest.fail(f"ARBORSEG_REQUIRE_PDF is set but WeasyPrint cannot be loaded: {REASON}")
        pytest.skip(f"WeasyPrint not usable here: {REASON}")


@needs_pdf
def test_lobule_pdf_next_to_the_html(tmp_path, lobule_figures, caplog):
    write_derivatives(tmp_path, figures=lobule_figures)
    caplog.set_level(logging.WARNING)
    html = write_subject_report(tmp_path, _record())
    pdf = tmp_path / "sub-01_seg-cerebellum_report.pdf"
    assert html.is_file() and pdf.parent == html.parent
    payload = pdf.read_bytes()
    assert payload.startswith(b"%PDF-") and payload.rstrip().endswith(b"%%EOF")
    inflated = _inflate(payload)
    assert _pages(inflated) >= 2
    # subject id and title in the document metadata and outline; version and date in the running footer
    assert re.search(rb"/Title \(sub-01: cerebellar lobules \| ArborSeg\)", inflated)
    assert b"sub-01" in re.search(rb"/Keywords \(([^)]*)\)", inflated).group(1)
    assert re.search(rb"/CreationDate \(D:20260102030400", inflated)
    # the overview PNG, the rasters inside the SVG mosaics, and vector drawing from the SVGs
    assert len(re.findall(rb"/Subtype\s*/Image", inflated)) >= 3
    assert b"0.8 0 1 rg" in inflated  # Crus I (#cc00ff) swatch/legend drawn as a vector fill
    # every figure was found and drawn (WeasyPrint warns about images it cannot load)
    assert not [r for r in caplog.records if r.name.startswith("weasyprint")], caplog.text
    assert not list(tmp_path.glob(".*.part*"))


@needs_pdf
def test_svg_figures_render_as_vectors(tmp_path):
    fig = tmp_path / "sub-01" / "figures" / "red.svg"
    fig.parent.mkdir(parents=True)
    fig.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100" viewBox="0 0 200 100">'
                   '<rect width="200" height="100" fill="#00ff00"/><circle cx="50" cy="50" r="30" fill="#0000ff"/>'
                   "</svg>")
    section = {"title": "Figure check", "notes": ["a note"], "reportlets": [{"path": "sub-01/figures/red.svg",
                                                                           "caption": "green box, blue disc"}],
               "table": {"columns": ["a", "b"], "numeric": [False, True],
                         "rows": [{"cells": ["x", 1], "flagged": True}, {"cells": ["y", 2]}]}}
    out = render_pdf_report({"subject": "07", "session": "B", "sections": [section]}, tmp_path / "r.pdf")
    inflated = _inflate(out.read_bytes())
    assert _pages(inflated) == 1
    assert b"0 1 0 rg" in inflated and b"0 0 1 rg" in inflated
    assert re.search(rb"/Title \(sub-07 ses-B \| ArborSeg\)", inflated)


def test_missing_weasyprint_skips_the_pdf_but_not_the_html(tmp_path, monkeypatch, caplog):
    def broken():
        raise OSError("cannot load library 'libpango-1.0-0': libpango-1.0-0: cannot open shared object file")

    monkeypatch.setattr(pdf_mod, "_import_weasyprint", broken)
    write_derivatives(tmp_path, figures=False)
    caplog.set_level(logging.WARNING)
    html = write_subject_report(tmp_path, _record())
    assert html.is_file() and "Cerebellar lobules" in html.read_text()
    assert "seg-cerebellum_report.pdf" not in html.read_text()
    assert not (tmp_path / "sub-01_seg-cerebellum_report.pdf").exists()
    assert "sub-01_seg-cerebellum_report.pdf not written" in caplog.text
    assert "libpango-1.0-0" in caplog.text and "libpangoft2-1.0-0" in caplog.text
    assert pdf_mod.pdf_unavailable_reason().startswith("OSError: cannot load library")


@needs_pdf
def test_a_failing_render_leaves_no_file_and_the_html_goes_on(tmp_path, monkeypatch, caplog):
    weasyprint = pdf_mod._import_weasyprint()

    def boom(self, *args, **kwargs):
        raise RuntimeError("layout exploded")

    monkeypatch.setattr(weasyprint.HTML, "write_pdf", boom)
    write_derivatives(tmp_path, figures=False)
    with pytest.raises(RuntimeError, match="layout exploded"):
        render_pdf_report({"subject": "01", "sections": []}, tmp_path / "x.pdf")
    html = write_subject_report(tmp_path, _record())
    assert html.is_file()
    assert "the cerebellum PDF report could not be written: layout exploded" in caplog.text
    assert not list(tmp_path.glob("*.pdf")) and not list(tmp_path.glob(".*.part*"))


def test_pdf_html_escapes_and_dates(tmp_path):
    html = pdf_mod.render_pdf_html({"title": "<b>sub-01</b>", "subject": "01", "generated": "2026-01-02 03:04 UTC",
                                    "sections": [{"title": "S", "notes": ["1 < 2"]}]}, tmp_path)
    assert "&lt;b&gt;sub-01&lt;/b&gt;" in html and "<li>1 &lt; 2</li>" in html
    assert '<meta name="dcterms.created" content="2026-01-02T03:04:00Z">' in html
    assert pdf_mod._w3c_date("yesterday") is None


def test_section_source_paths_resolve_against_the_pdf_folder(tmp_path, lobule_figures):
    write_derivatives(tmp_path, figures=lobule_figures)
    from bids_app.reports.lobules import lobule_section

    section = lobule_section(tmp_path, SOURCE, TEMPLATE)
    html = pdf_mod.render_pdf_html({"subject": "01", "sections": [section]}, tmp_path)
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 4 and all((tmp_path / s).is_file() for s in srcs)
