"""The cerebellar-lobule reportlets, the lobule section of the subject report and its reportlet workflow,
on a tiny synthetic crop (32 x 24 x 24 voxels of 1 mm, a few fake lobule blocks per side)."""

from __future__ import annotations

import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.core.labels import load_protocol
from bids_app.core.morphometry import morphometry_rows, write_morphometry_tsv
from bids_app.reports import lobules as lob
from bids_app.reports import reportlets as rl
from bids_app.reports.build import subject_context, write_subject_report
from bids_app.reports.pdf import pdf_unavailable_reason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NS = "{http://www.w3.org/2000/svg}"
SHAPE = (32, 24, 24)
TEMPLATE = "MNI152NLin6Asym"
SOURCE = "/bids/sub-01/anat/sub-01_T1w.nii.gz"
FLAGGED = (5, 106)  # label values whose QC flag is "warn"


# ---------------------------------------------------------------- synthetic data
def _affine() -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 3] = (-16.0, -60.0, -40.0)  # MNI-like mm, x = 0 between the two halves
    return aff


def crop_labels() -> np.ndarray:
    """An ellipsoid cut into 6 slabs per side (lobules 1, 3, 5, 6, 7, 10 / 101...) around a WM core (13/113)."""
    i, j, k = np.indices(SHAPE).astype(float)
    c = (np.asarray(SHAPE) - 1) / 2
    r = ((i - c[0]) / 15) ** 2 + ((j - c[1]) / 11) ** 2 + ((k - c[2]) / 11) ** 2
    inside = r < 1
    slab = np.clip(((k - c[2]) - 0.6 * (j - c[1]) + 14) // 5, 0, 5).astype(int)
    lobe = np.array([1, 3, 5, 6, 7, 10])[slab]
    lobe = np.where(r < 0.2, 13, lobe)
    left = i < SHAPE[0] / 2  # RAS voxel order: low x is the subject's left
    labels = np.where(inside, np.where(left, lobe, lobe + 100), 0)
    return labels.astype(np.int16)


def write_crop(folder: Path) -> tuple[Path, Path, Path]:
    """(T1w, dseg, uncertainty) NIfTIs of the crop."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = crop_labels()
    rng = np.random.default_rng(0)
    t1 = np.where(labels > 0, 0.7, 0.08) + np.where(np.isin(labels, (13, 113)), 0.25, 0.0)
    t1 = (t1 + rng.normal(0, 0.02, SHAPE)).astype(np.float32)
    edges = np.zeros(SHAPE, np.float32)
    for axis in range(3):
        edges += np.abs(np.diff(labels, axis=axis, append=0)) > 0
    paths = (folder / "t1w.nii.gz", folder / "dseg.nii.gz", folder / "entropy.nii.gz")
    nb.save(nb.Nifti1Image(t1, _affine()), str(paths[0]))
    nb.save(nb.Nifti1Image(labels, _affine()), str(paths[1]))
    nb.save(nb.Nifti1Image(np.clip(edges, 0, 1) * 0.6, _affine()), str(paths[2]))
    return paths


def write_morph(path: Path) -> Path:
    prot = load_protocol("lobules")
    flags = ["n/a"] + ["warn" if v in FLAGGED else "pass" for v in prot.indices[1:]]
    cv = [0.0] + [4.0 if v in FLAGGED else 0.5 for v in prot.indices[1:]]
    rows = morphometry_rows(crop_labels(), 1.0, 1500.0, prot, cv_percent=cv, qc_flags=flags)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_morphometry_tsv(rows, path)
    return path


QC = {"Models": [{"Name": "lobules-a"}, {"Name": "lobules-b"}], "LabelProtocol": "lobules", "MCSamples": 10,
      "Seed": 42, "MeanCVPercent": 1.2, "QCThresholdPercent": 2.0, "QCFlag": "pass",
      "atlas_prior": {"used": False, "reason": "no library"},
      "t2": {"source": "synthetic"}}


def write_derivatives(out: Path, *, qc: dict | None = QC, figures: bool | Path = True) -> dict[str, Path]:
    """Cerebellum derivatives (+ figures: drawn, or copied from a folder) of sub-01 as the pipeline names them."""
    files = lob.cerebellum_files(out, SOURCE, TEMPLATE)
    t1w, dseg, unc = write_crop(out / "work")
    files["dseg"].parent.mkdir(parents=True, exist_ok=True)
    files["dseg"].write_bytes(dseg.read_bytes())
    write_morph(files["morph"])
    if qc is not None:
        files["qc"].write_text(json.dumps(qc))
    if isinstance(figures, Path):
        shutil.copytree(figures, out / "sub-01" / "figures")
    elif figures:
        fig = out / "sub-01" / "figures"
        lob.plot_lobule_mosaic(t1w, dseg, fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_dseg.svg")
        lob.plot_lobule_overview(dseg, fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-render_dseg.png")
        lob.plot_lobule_volumes(files["morph"], fig / "sub-01_seg-cerebellum_desc-volumes_dseg.svg",
                                qc_json=files["qc"] if qc is not None else None)
        rl.plot_map(unc, fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-entropy_uncertainty.svg",
                    bbox_from=dseg)
    return files


@pytest.fixture(scope="session")
def lobule_figures(tmp_path_factory) -> Path:
    """The four lobule figures of sub-01, drawn once per session (copied into each test's output)."""
    root = tmp_path_factory.mktemp("lobule_figures")
    write_derivatives(root)
    return root / "sub-01" / "figures"


def _record(**extra) -> dict:
    return {"label": "sub-01", "subject": "01", "session": None, "status": "success", "source_file": SOURCE,
            "template": TEMPLATE, "version": "0.1.0", "finished": "2026-01-02 03:04 UTC", **extra}


def _svg_root(path: Path):
    root = ET.fromstring(path.read_bytes())
    assert root.tag == f"{SVG_NS}svg"
    return root


# ---------------------------------------------------------------------- names, legend
def test_names_follow_the_whole_brain_conventions(tmp_path):
    files = lob.cerebellum_files(tmp_path, "/bids/sub-01/ses-A/anat/sub-01_ses-A_T1w.nii.gz", TEMPLATE)
    rel = {k: p.relative_to(tmp_path).as_posix() for k, p in files.items()}
    assert rel == {"dseg": "sub-01/ses-A/anat/sub-01_ses-A_space-MNI152NLin6Asym_seg-cerebellum_dseg.nii.gz",
                   "morph": "sub-01/ses-A/anat/sub-01_ses-A_seg-cerebellum_morph.tsv",
                   "qc": "sub-01/ses-A/anat/sub-01_ses-A_seg-cerebellum_qc.json"}
    assert lob.lobule_pdf_path(tmp_path, "sub-01_ses-A").name == "sub-01_ses-A_seg-cerebellum_report.pdf"


def test_legend_merges_sides_that_share_a_colour():
    legend = lob.lobule_legend()
    names = [n for n, _ in legend]
    assert names[:3] == ["I-II", "III", "IV"] and "Crus I" in names and "white matter" in names
    assert len(legend) == 13
    assert dict(legend)["Crus II"] == "#ff0000"
    assert lob.split_name("Right-Cerebellum-Lobule-Crus-II") == ("Right", "Crus II")
    assert lob.display_name("Left-Cerebellum-White-Matter") == "Left white matter"


# --------------------------------------------------------------------------- figures
def test_mosaic_svg_has_fills_outlines_and_legend(tmp_path):
    t1w, dseg, _ = write_crop(tmp_path)
    out = lob.plot_lobule_mosaic(t1w, dseg, tmp_path / "mosaic.svg")
    root = _svg_root(out)
    text = out.read_text()
    assert "data:image/png;base64," in text  # anatomy + fills
    assert "#ff0000" not in text or "Crus II" in text
    for name in ("I-II", "Crus I", "white matter"):
        assert f">{name}<" in text
    # outlines drawn per label in the protocol's colours (6 lobules x 2 sides + WM share 7 colours)
    colours = set(re.findall(r"stroke: ?(#[0-9a-f]{6})", text))
    assert {"#ccff00", "#0066ff", "#cc00ff", "#f0f0dc"} <= colours
    assert root.find(f".//{SVG_NS}g[@id='overlay-legend']") is not None
    assert out.stat().st_size < rl.MAX_SVG_BYTES


def test_fill_paint_uses_the_label_colours():
    vals, rgba = rl._label_lut({1: "#ff0000", 2: "#00ff00"}, [0, 1, 2, 7], "#0000ff", alpha=0.5)
    assert vals.tolist() == [1, 2, 7]
    plane = np.array([[0, 1], [2, 7]])
    out = rl._paint_labels(plane, vals, rgba)
    assert out[0, 0].tolist() == [0, 0, 0, 0]
    assert out[0, 1].tolist() == [1, 0, 0, 0.5] and out[1, 0].tolist() == [0, 1, 0, 0.5]
    assert out[1, 1].tolist() == [0, 0, 1, 0.5]


def test_overview_png_is_fast_and_shows_the_lobules(tmp_path):
    _, dseg, _ = write_crop(tmp_path)
    start = time.perf_counter()
    out = lob.plot_lobule_overview(dseg, tmp_path / "render.png")
    assert time.perf_counter() - start < 10.0
    assert out.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    im = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # lobule colours appear (shaded): strongly blue pixels for lobule VI (#0066ff), purple for Crus I (#cc00ff)
    blue = (im[..., 2] > 120) & (im[..., 0] < 60) & (im[..., 1] < im[..., 2])
    purple = (im[..., 0] > 90) & (im[..., 2] > 90) & (im[..., 1] < 50)
    assert blue.sum() > 200 and purple.sum() > 200


def test_render_views_see_the_right_side():
    labels = np.zeros((10, 8, 6), np.int16)
    labels[2:5, 2:6, 1:5] = 1  # subject's left (low x)
    labels[5:8, 2:6, 1:5] = 101
    colors = {1: "#ff0000", 101: "#0000ff"}
    img, (w, h) = rl.render_labels(labels, (1.0, 1.0, 1.0), "posterior", colors)
    assert (w, h) == (10.0, 6.0) and img.shape == (6, 10, 4)
    row = img[3]
    # posterior view: the subject's left is on the left of the picture
    assert row[3, 0] > row[3, 2] and row[6, 2] > row[6, 0]
    img, _ = rl.render_labels(labels, (1.0, 1.0, 1.0), "inferior", colors)
    assert img[3, 3, 2] > img[3, 3, 0] and img[3, 6, 0] > img[3, 6, 2]  # seen from below: mirrored
    img, _ = rl.render_labels(labels, (1.0, 1.0, 1.0), "left", colors)
    seen = img[..., 3] > 0
    assert seen.sum() == 16 and (img[..., 0] > img[..., 2] + 0.2)[seen].all()  # the left lobule hides the right
    assert (img[~seen] == 0).all()
    with pytest.raises(ValueError, match="unknown view"):
        rl.render_labels(labels, (1, 1, 1), "oblique", colors)


def test_volume_bars_mark_flagged_lobules(tmp_path):
    morph = write_morph(tmp_path / "morph.tsv")
    qc = tmp_path / "qc.json"
    qc.write_text(json.dumps(QC))
    out = lob.plot_lobule_volumes(morph, tmp_path / "volumes.svg", qc_json=qc)
    text = out.read_text()
    _svg_root(out)
    assert "2 flagged" in text and "QC PASS" in text
    assert text.count(rl.QC_FLAG_COLOR) >= 2
    with pytest.raises(ValueError, match="morph.tsv"):
        lob.plot_lobule_volumes(tmp_path / "missing_morph.tsv", tmp_path / "v.svg")


def test_empty_segmentation_draws_placeholders(tmp_path, caplog):
    empty = nb.Nifti1Image(np.zeros(SHAPE, np.int16), _affine())
    text = lob.plot_lobule_overview(empty, tmp_path / "render.svg").read_text()
    assert text.count("no labelled voxels") == 4 and "the label image is empty" in caplog.text
    prot = load_protocol("lobules")
    rows = morphometry_rows(np.zeros(SHAPE, np.int16), 1.0, 1500.0, prot, cv_percent=[float("nan")] * len(prot),
                            qc_flags=["warn"] * len(prot))
    write_morphometry_tsv(rows, tmp_path / "morph.tsv")
    text = lob.plot_lobule_volumes(tmp_path / "morph.tsv", tmp_path / "volumes.svg").read_text()
    assert "every volume is 0" in text and "26 flagged" in text


# ------------------------------------------------------------------- QC sentences
@pytest.mark.parametrize("qc, expected", [
    ({"atlas_prior": {"used": False, "reason": "no library"}}, "Atlas prior: not used (no library)."),
    ({"AtlasPrior": {"Used": True, "NCases": 12, "Library": "/lib"}}, "used (a subject-specific prior"),
    ({"atlas_prior": True}, "Atlas prior: used."),
    ({"atlas_prior": {"used": True, "reason": "", "details": {"selected": ["a", "b", "c"]}}}, "; 3 library cases)."),
    ({}, "not recorded"),
    ({"atlas_prior": {"used": True, "kind": "population", "reason": "no library given",
                      "details": {"kind": "population", "n_cases": 20}}},
     "the population prior (a probabilistic atlas of 20 library cases on the template crop, the same for every "
     "subject), not a subject-specific one (no library given)."),
])
def test_atlas_prior_line(qc, expected):
    assert expected in lob.atlas_prior_line(qc)


def test_t2_line():
    assert lob.t2_line({}) is None
    assert lob.t2_line({"t2": {"source": "real", "file": "/bids/sub-01/anat/sub-01_T2w.nii.gz"}}) == \
        "T2: the subject's T2w sub-01_T2w.nii.gz, rigidly registered to the T1w."
    assert lob.t2_line({"T2": "synthetic"}).startswith("T2: synthetic")


# ----------------------------------------------------------------------- section
def test_no_section_without_cerebellum_derivatives(tmp_path):
    ctx = subject_context(tmp_path, _record())
    assert all(s.get("kind") != "lobules" for s in ctx["sections"])
    html = write_subject_report(tmp_path, _record()).read_text()
    assert "Cerebellar lobules" not in html
    assert not (tmp_path / "sub-01_seg-cerebellum_report.pdf").exists()


def test_section_with_table_figures_and_flags(tmp_path, lobule_figures):
    write_derivatives(tmp_path, figures=lobule_figures)
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    assert section["kind"] == "lobules" and section["n_flagged"] == 2
    assert [Path(r["path"]).name for r in section["reportlets"]] == [
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-render_dseg.png",
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_dseg.svg",
        "sub-01_seg-cerebellum_desc-volumes_dseg.svg",
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-entropy_uncertainty.svg"]
    assert "Atlas prior: not used (no library)." in section["notes"]
    assert any(n.startswith("T2: synthetic") for n in section["notes"])
    table = section["table"]
    assert len(table["rows"]) == 26
    flagged = [r["cells"][0] for r in table["rows"] if r["flagged"]]
    assert flagged == ["Left VI", "Right Crus I"]
    assert "QC PASS" in section["description"] and "2 model(s)" in section["description"]

    html = write_subject_report(tmp_path, _record()).read_text()
    body = html[html.index('<section id="sec-cerebellar-lobules">'):]
    body = body[: body.index("</section>")]
    assert len(re.findall(r'<tr class="flagged">', body)) == 2
    flagged_rows = re.findall(r'<tr class="flagged">(.*?)</tr>', body)
    assert "Left VI" in flagged_rows[0] and "Right Crus I" in flagged_rows[1]
    assert "Atlas prior: not used (no library)." in body and "T2: synthetic" in body
    assert body.count("<img ") == 4 and "desc-render_dseg.png" in body
    assert 'class="swatch" style="background: #ccff00"' in body
    assert "2 of 26 rows flagged" in body
    pdf = tmp_path / "sub-01_seg-cerebellum_report.pdf"
    if pdf_unavailable_reason() is None:
        assert 'href="sub-01_seg-cerebellum_report.pdf"' in body  # the PDF was written and is linked
        assert pdf.read_bytes()[:5] == b"%PDF-"
    else:  # no WeasyPrint here: the HTML still comes, without the link (tests/reports/test_pdf.py insists in CI)
        assert "seg-cerebellum_report.pdf" not in body and not pdf.exists()
    assert '<a href="#sec-cerebellar-lobules">Cerebellar lobules</a>' in html


def test_section_without_qc_or_figures_still_appears(tmp_path):
    write_derivatives(tmp_path, qc=None, figures=False)
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    assert section is not None and section["reportlets"] == []
    assert "No QC file was found." in section["description"]
    assert section["notes"][0] == "Atlas prior: not recorded in the QC file."
    assert section["t2"] is None


def test_unreadable_qc_is_a_warning_not_a_crash(tmp_path, caplog):
    files = write_derivatives(tmp_path, figures=False)
    files["qc"].write_text("{not json")
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    assert section is not None and section["table"] is not None
    assert "cannot read the cerebellum QC file" in caplog.text


# ---------------------------------------------------------------------- workflow
def test_reports_workflow_builds_and_runs(tmp_path):
    from workflows.cerebellum_reports import CEREBELLUM_REPORT_INPUTS, init_cerebellum_reports_wf

    out = tmp_path / "out"
    t1w, dseg, unc = write_crop(tmp_path / "in")
    morph = write_morph(tmp_path / "in" / "morph.tsv")
    qc = tmp_path / "in" / "qc.json"
    qc.write_text(json.dumps(QC))
    wf = init_cerebellum_reports_wf(output_dir=str(out), source_file=SOURCE, template=TEMPLATE)  # entropy, nats
    assert {"lobules_rpt", "render_rpt", "volumes_rpt", "uncertainty_rpt", "ds_lobules_rpt", "ds_render_rpt",
            "ds_volumes_rpt", "ds_uncertainty_rpt"} <= set(wf.list_node_names())
    inputnode = wf.get_node("inputnode")
    assert tuple(inputnode.inputs.copyable_trait_names()) == CEREBELLUM_REPORT_INPUTS or \
        set(inputnode.inputs.copyable_trait_names()) == set(CEREBELLUM_REPORT_INPUTS)
    inputnode.inputs.t1w_crop = str(t1w)
    inputnode.inputs.dseg_crop = str(dseg)
    inputnode.inputs.uncertainty = str(unc)
    inputnode.inputs.morph_tsv = str(morph)
    inputnode.inputs.qc_json = str(qc)
    wf.base_dir = str(tmp_path / "work")
    wf.run(plugin="Linear")
    fig = out / "sub-01" / "figures"
    assert sorted(p.name for p in fig.iterdir()) == [
        "sub-01_seg-cerebellum_desc-volumes_dseg.svg",
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-entropy_uncertainty.svg",
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-render_dseg.png",
        "sub-01_space-MNI152NLin6Asym_seg-cerebellum_dseg.svg"]
    assert (fig / "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-render_dseg.png").read_bytes()[:8] == PNG_MAGIC


def test_reports_workflow_without_uncertainty(tmp_path):
    from workflows.cerebellum_reports import init_cerebellum_reports_wf

    wf = init_cerebellum_reports_wf(output_dir=str(tmp_path), source_file=SOURCE, template=TEMPLATE,
                                    uncertainty_desc=None)
    names = set(wf.list_node_names())
    assert "uncertainty_rpt" not in names and "lobules_rpt" in names
    with pytest.raises(ValueError, match="BIDS label"):
        init_cerebellum_reports_wf(output_dir=str(tmp_path), source_file=SOURCE, template=TEMPLATE,
                                   uncertainty_desc="mc_cv")
