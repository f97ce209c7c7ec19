"""Tests for the HTML reports (bids_app.reports.report)."""

from __future__ import annotations

import copy
import os
import stat
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.reports import report as rp
from bids_app.reports import reportlets as rl

FIG = "sub-01/figures/sub-01_desc-denoise_T1w.svg"
FLICKER = "sub-01/figures/sub-01_desc-flicker_T1w.svg"


def _subject_context() -> dict:
    return {
        "title": "sub-01 ses-A",
        "subject": "01",
        "session": "A",
        "version": "0.1.0",
        "generated": "2026-11-21 20:00 UTC",
        "command": "arborseg /data /out participant --participant-label 01",
        "status": "success",
        "error": None,
        "inputs": [
            {"path": "sub-01/anat/sub-01_T1w.nii.gz", "suffix": "T1w", "shape": [188, 256, 190],
             "voxel_size": [0.88, 0.88, 0.88], "orientation": "RAS", "datatype": "uint8", "used": True, "note": ""},
            {"path": "sub-01/anat/sub-01_T2w.nii.gz", "suffix": "T2w", "shape": [256, 256, 40],
             "voxel_size": [0.9, 0.9, 4.0], "orientation": "LPS", "datatype": "int16", "used": False,
             "note": "too thick"},
        ],
        "sections": [
            {"title": "Preprocessing", "reportlets": [
                {"path": FIG, "caption": "Denoising result"},
                {"path": FLICKER, "caption": "Before and after"},
            ]},
            {"title": "Segmentation", "reportlets": []},
        ],
        "metrics": [{"name": "Intracranial volume", "value": 1450.2, "unit": "mL"},
                    {"name": "Dice", "value": np.float32(0.87312), "unit": ""}],
        "runtimes": [{"stage": "denoise", "seconds": 21.0}, {"stage": "registration", "seconds": 300.0}],
        "software": [{"name": "ANTsPy", "version": "0.6.3"}],
        "warnings": ["T2w ignored", "odd <script>alert('x')</script> value"],
        "boilerplate": "Methods text line 1.\nLine 2 with <b>markup</b>.",
        "errors": [],
    }


def _blob_image():
    data = np.zeros((20, 24, 18), np.float32)
    data[5:15, 6:18, 4:14] = np.linspace(50, 150, 1200).reshape(10, 12, 10)
    return nb.Nifti1Image(data, np.diag([-1.0, 1.2, 2.0, 1.0]))


def _make_figures(root: Path) -> None:
    img = _blob_image()
    rl.plot_mosaic(img, root / FIG, n_cuts=2, views=("axial",))
    smooth = nb.Nifti1Image(img.get_fdata().astype(np.float32) * 0.9, img.affine)
    rl.plot_before_after(img, smooth, root / FLICKER, n_cuts=2, views=("axial",))


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    parser = _Collector()
    parser.feed(html)
    return parser.tags


def _only_file(folder: Path, name: str) -> None:
    leftovers = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != name)
    assert leftovers == [], leftovers


# -------------------------------------------------------------------- subject
def test_subject_report_content(tmp_path):
    _make_figures(tmp_path)
    out = rp.render_subject_report(_subject_context(), tmp_path / "sub-01_ses-A.html")
    assert out == tmp_path / "sub-01_ses-A.html"
    html = out.read_text(encoding="utf-8")
    # inputs table
    for value in ("sub-01/anat/sub-01_T1w.nii.gz", "188 \u00d7 256 \u00d7 190", "0.88 \u00d7 0.88 \u00d7 0.88",
                  "0.9 \u00d7 0.9 \u00d7 4", "RAS", "LPS", "uint8", "too thick", "anisotropic"):
        assert value in html, value
    # status, summary, metrics, run times, software, boilerplate
    assert 'class="badge success"' in html
    assert "sub-01 ses-A" in html and "Intracranial volume" in html and "1450.2" in html and "0.873" in html
    assert "5 min 21 s" in html  # total run time
    assert "ANTsPy" in html and "0.6.3" in html
    assert "Methods text line 1.\nLine 2 with &lt;b&gt;markup&lt;/b&gt;." in html
    # warnings, escaped
    assert "T2w ignored" in html
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    # figures
    tags = _tags(html)
    img_src = [a.get("src") for t, a in tags if t == "img"]
    assert FIG in img_src
    objects = [a.get("data") for t, a in tags if t == "object"]
    assert objects == [FLICKER]  # interactive flicker gets <object>, static SVG stays <img>
    assert "Denoising result" in html and "Before and after" in html
    # navigation
    hrefs = [a.get("href") for t, a in tags if t == "a"]
    for anchor in ("#summary", "#sec-preprocessing", "#sec-segmentation", "#runtimes", "#about"):
        assert anchor in hrefs
    ids = {a.get("id") for _, a in tags}
    assert {"summary", "sec-preprocessing", "runtimes", "about"} <= ids
    assert "#errors" not in hrefs
    # self-contained
    assert "http://" not in html and "https://" not in html and "<link" not in html
    _only_file(tmp_path, out.name)


def test_subject_report_failed_with_errors(tmp_path):
    ctx = _subject_context()
    ctx.update(status="failed", error="RuntimeError: boom <x>",
               errors=["Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: boom <x>"])
    html = rp.render_subject_report(ctx, tmp_path / "r.html").read_text()
    assert 'class="badge failed"' in html
    assert 'href="#errors"' in html and 'id="errors"' in html
    assert "RuntimeError: boom &lt;x&gt;" in html
    assert 'class="callout error"' in html
    assert "(1 error)" in html  # error message already part of the traceback


def test_subject_report_copes_with_missing_keys(tmp_path):
    out = rp.render_subject_report({}, tmp_path / "empty.html")
    html = out.read_text()
    assert "badge unknown" in html and "No input files" in html
    out = rp.render_subject_report({"subject": "02", "sections": [{"reportlets": [{"path": "x.png"}]}],
                                    "runtimes": [{"stage": "a", "seconds": None}],
                                    "inputs": [{"path": "a.nii"}], "metrics": [{"name": "m", "value": float("nan")}]},
                                   tmp_path / "partial.html")
    html = out.read_text()
    assert "sub-02" in html and 'src="x.png"' in html and "not found" in html and "n/a" in html


def test_report_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")
    rp.render_subject_report(_subject_context(), out)
    assert "sub-01 ses-A" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    _only_file(tmp_path, out.name)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rp.os, "replace", broken_replace)
    previous = out.read_text()
    with pytest.raises(OSError):
        rp.render_subject_report(copy.deepcopy(_subject_context()) | {"title": "new"}, out)
    assert out.read_text() == previous  # untouched
    _only_file(tmp_path, out.name)  # temp file cleaned up


def test_formatters():
    assert rp.format_duration(21) == "21.0 s"
    assert rp.format_duration(3725) == "1 h 02 min"
    assert rp.format_value(None) == "" and rp.format_value(3) == "3" and rp.format_value(0.000123) == "0.000123"
    assert rp.format_dims([1, 2.5, 3.0]) == "1 \u00d7 2.5 \u00d7 3"


# ---------------------------------------------------------------------- group
def _group_context(tmp_path: Path) -> dict:
    rows = [
        {"label": "sub-01 ses-A", "subject": "01", "session": "A", "status": "success", "error": None,
         "report": "sub-01_ses-A.html", "ICV_mL": 1450.0},
        {"label": "sub-02", "subject": "02", "session": None, "status": "failed", "error": "crash <here>",
         "report": "sub-02.html", "ICV_mL": None},
        {"label": "sub-03", "subject": "03", "session": None, "status": "success", "error": None,
         "report": "sub-03.html", "ICV_mL": 1390.5},
    ]
    (tmp_path / "figures").mkdir()
    rl.plot_group_strip(rows, "ICV_mL", tmp_path / "figures/group_desc-ICV_mL_strip.svg")
    return {
        "version": "0.1.0", "generated": "2026-11-21 20:00 UTC", "command": "arborseg /data /out group",
        "n_subjects": 3, "n_failed": 1, "columns": ["ICV_mL"], "rows": rows,
        "figures": [{"path": "figures/group_desc-ICV_mL_strip.svg", "caption": "ICV strip"},
                    {"path": "figures/missing.svg", "caption": "gone"}],
        "warnings": ["sub-02 failed <script>bad()</script>"],
    }


def test_group_report(tmp_path):
    out = rp.render_group_report(_group_context(tmp_path), tmp_path / "group.html")
    html = out.read_text()
    tags = _tags(html)
    links = [a.get("href") for t, a in tags if t == "a"]
    assert {"sub-01_ses-A.html", "sub-02.html", "sub-03.html"} <= set(links)
    failed_rows = [a for t, a in tags if t == "tr" and "failed" in (a.get("class") or "")]
    assert len(failed_rows) == 1
    assert "crash &lt;here&gt;" in html and "1450.0" in html and "1390.5" in html
    # strip plot inlined: its point links are in the page itself
    assert '<svg class="inline-figure"' in html
    assert 'xlink:href="sub-03.html"' in html
    assert "<title>sub-03: 1390.5</title>" in html
    assert "ICV strip" in html
    # missing figure falls back to an <img> with a note
    assert 'src="figures/missing.svg"' in html and "not found" in html
    # warnings escaped
    assert "<script>" not in html and "&lt;script&gt;bad()&lt;/script&gt;" in html
    assert "group.html" in os.listdir(tmp_path)
    _only_file(tmp_path, out.name)


def test_group_report_ids_do_not_clash(tmp_path):
    ctx = _group_context(tmp_path)
    ctx["figures"] = [ctx["figures"][0], dict(ctx["figures"][0], caption="again")]
    html = rp.render_group_report(ctx, tmp_path / "group.html").read_text()
    ids = [a["id"] for _, a in _tags(html) if "id" in a]
    assert len(ids) == len(set(ids))


def test_group_report_minimal(tmp_path):
    html = rp.render_group_report({"rows": [{"subject": "01", "status": "failed"}]}, tmp_path / "g.html").read_text()
    assert "sub-01" in html and 'class="failed"' in html


# ---------------------------------------------------------------- segmentation
def _seg_record(status="done"):
    rows = [{"index": 17, "name": "Left-Hippocampus", "volume_mm3": 4012.0, "volume_icv_fraction": 0.0027,
             "asymmetry_index": 0.031, "mc_cv_percent": 0.4, "qc_flag": "pass"},
            {"index": 53, "name": "Right-Hippocampus", "volume_mm3": 3890.0, "volume_icv_fraction": 0.0026,
             "asymmetry_index": 0.031, "mc_cv_percent": 1.7, "qc_flag": "warn"},
            {"index": 16, "name": "Brain-Stem <b>", "volume_mm3": 21000.0, "volume_icv_fraction": 0.014,
             "asymmetry_index": None, "mc_cv_percent": None, "qc_flag": "warn"}]
    seg = {"status": status, "models": ["unet-a", "unet-b"], "label_protocol": "aseg", "mc_samples": 15, "seed": 42,
           "mean_cv_percent": 0.83, "qc_threshold_percent": 1.0, "qc_flag": "pass",
           "deep14_mean_cv_percent": 0.91, "volumes": {"wholebrain": rows}}
    if status == "skipped":
        seg = {"status": "skipped", "reason": "no whole-brain segmentation models are installed"}
    return {"label": "sub-01", "subject": "01", "status": "success", "segmentation": seg}


def test_segmentation_section_table(tmp_path):
    from bids_app.reports.build import segmentation_section

    section = segmentation_section(tmp_path, _seg_record())
    assert section["title"] == "Whole-brain segmentation"
    assert "unet-a, unet-b" in section["description"] and "QC PASS" in section["description"]
    table = section["table"]
    assert table["columns"] == ["Structure", "Volume (mL)", "% ICV", "AI", "CV (%)", "QC"]
    assert table["rows"][0]["cells"] == ["Left-Hippocampus", "4.01", "0.270", "0.031", "0.40", "pass"]
    assert [r["flagged"] for r in table["rows"]] == [False, True, True]
    assert table["rows"][2]["cells"][3:5] == ["n/a", "n/a"]
    ctx = _subject_context()
    ctx["sections"] = [section]
    html = rp.render_subject_report(ctx, tmp_path / "sub-01.html").read_text()
    assert 'class="seg-table"' in html and html.count('<tr class="flagged">') == 2
    assert "Brain-Stem &lt;b&gt;" in html and "2 of 3 rows flagged" in html


def test_segmentation_section_warns_on_a_coarse_input(tmp_path):
    from bids_app.core.conform import input_resolution
    from bids_app.reports.build import segmentation_section

    record = _seg_record()
    record["segmentation"]["input_resolution"] = input_resolution((0.5, 0.5, 5.5), 2.0)
    section = segmentation_section(tmp_path, record)
    assert "QC PASS" in section["description"]  # the MC-dropout verdict itself is unchanged
    assert "Input resolution WARN: voxels are 5.50 mm along the third voxel axis" in section["description"]
    assert section["qc_flag"] == "warn"  # but the section's badge warns
    record["segmentation"]["input_resolution"] = input_resolution((1.0, 1.0, 1.0), 2.0)
    fine = segmentation_section(tmp_path, record)
    assert "Input resolution" not in fine["description"] and fine["qc_flag"] == "pass"


def test_segmentation_section_skipped_and_off(tmp_path):
    from bids_app.reports.build import segmentation_section

    skipped = segmentation_section(tmp_path, _seg_record("skipped"))
    assert skipped["description"].startswith("Not run: no whole-brain") and "table" not in skipped
    ctx = _subject_context()
    ctx["sections"] = [skipped]
    html = rp.render_subject_report(ctx, tmp_path / "sub-01.html").read_text()
    assert "Not run: no whole-brain segmentation models are installed" in html
    assert "No figures in this section" not in html
    assert segmentation_section(tmp_path, {"segmentation": {"status": "off", "reason": "--no-seg"}}) is None
    assert segmentation_section(tmp_path, {}) is None


def test_parcellation_section(tmp_path):
    from bids_app.reports.build import parcellation_section

    rows = [{"index": 1002, "name": "ctx-lh-caudalanteriorcingulate", "qc_flag": "pass"},
            {"index": 2002, "name": "ctx-rh-caudalanteriorcingulate", "qc_flag": "warn"}]
    parc = {"status": "done", "segmentation": "dkt", "models": ["cerebrum-a"], "label_protocol": "dkt-aseg",
            "mc_samples": 2, "seed": 42, "mean_cv_percent": 0.5, "qc_threshold_percent": 1.0, "qc_flag": "pass",
            "volumes": {"dkt": rows}}
    fig = tmp_path / "sub-01" / "figures" / "sub-01_seg-dkt_dseg.svg"
    fig.parent.mkdir(parents=True)
    fig.write_text("<svg/>")
    record = {"label": "sub-01", "subject": "01", "status": "success", "parcellation": parc,
              "source_file": "/data/sub-01/anat/sub-01_T1w.nii.gz"}
    section = parcellation_section(tmp_path, record)
    assert section["title"] == "Cortical parcellation" and "QC PASS" in section["description"]
    assert "1 of 2 structures flagged" in section["description"] and "table" not in section
    assert section["reportlets"][0]["path"] == "sub-01/figures/sub-01_seg-dkt_dseg.svg"
    assert "dkt-aseg protocol" in section["reportlets"][0]["caption"]
    skipped = parcellation_section(tmp_path, {"parcellation": {
        "status": "skipped", "reason": "no cortical parcellation models are installed"}})
    assert skipped["description"] == "Not run: no cortical parcellation models are installed."
    assert parcellation_section(tmp_path, {"parcellation": {"status": "off", "reason": "--no-parc"}}) is None
    assert parcellation_section(tmp_path, {}) is None


def test_methods_text_says_the_two_ensembles_were_fused(tmp_path):
    from types import SimpleNamespace

    from bids_app.config import SegmentationConfig
    from bids_app.reports.build import _parcellation_methods
    from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint

    seg = SegmentationConfig(checkpoints=(tiny_wholebrain_checkpoint(tmp_path / "seg"),), protocol="aseg")
    parc = SegmentationConfig(checkpoints=(tiny_parcellation_checkpoint(tmp_path / "parc"),), protocol="dkt-aseg",
                              task="parcellation")
    fused = _parcellation_methods(SimpleNamespace(segmentation=seg, parcellation=parc, random_seed=3))
    assert "mean over all 2 networks" in fused and "top-down" in fused
    alone = _parcellation_methods(SimpleNamespace(segmentation=SegmentationConfig(enabled=False), parcellation=parc,
                                                  random_seed=3))
    assert "fused" not in alone and "Segmentation references" in alone
