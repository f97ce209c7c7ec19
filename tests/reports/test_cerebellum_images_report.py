"""The image stages of the cerebellum branch in the report: the side-by-side figures (T1w crop | super-resolved
T1w, T1w crop | T2w), the T2 and super-resolution sentences of the lobule section (HTML and PDF), and the
reportlet workflow; on the tiny synthetic crop of ``test_lobule_report``."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.core.superres import interpolate, upsampled_affine
from bids_app.reports import lobules as lob
from bids_app.reports import reportlets as rl
from bids_app.reports.build import write_subject_report
from tests.reports.test_lobule_report import QC, SOURCE, TEMPLATE, _record, write_crop, write_derivatives

SVG_NS = "{http://www.w3.org/2000/svg}"
SR_QC = {"superres": True, "superres_details": {"used": True, "reason": "", "model": "cerebellum-superres-x2",
                                                "version": "0.1.0", "voxel_size_mm": [0.5, 0.5, 0.5]}}


def write_superres(t1w: Path, out: Path) -> Path:
    """A stand-in for the network's output: the crop up-sampled x2 (trilinear) on the network's grid."""
    img = nb.load(str(t1w))
    nb.save(nb.Nifti1Image(interpolate(np.asarray(img.dataobj), 2), upsampled_affine(img.affine, 2)), str(out))
    return out


def write_t2(t1w: Path, out: Path) -> Path:
    img = nb.load(str(t1w))
    data = np.asarray(img.dataobj)
    nb.save(nb.Nifti1Image(np.where(data > 0.2, 1.2 - data, 0.0).astype(np.float32), img.affine), str(out))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    t1w, dseg, _ = write_crop(root)
    return {"t1w": t1w, "dseg": dseg, "superres": write_superres(t1w, root / "sr.nii.gz"),
            "t2w": write_t2(t1w, root / "t2.nii.gz")}


def test_pair_figure_shows_both_images_on_the_same_slices(images, tmp_path):
    out = rl.plot_image_pair(images["t1w"], images["superres"], tmp_path / "pair.svg",
                             labels=("T1w crop (1 mm)", "super-resolved T1w (x2)"), title="Super-resolution",
                             detail="sagittal", note="Super-resolution: by a model.")
    root = ET.fromstring(out.read_bytes())
    text = out.read_text()
    assert root.tag == f"{SVG_NS}svg" and out.stat().st_size < rl.MAX_SVG_BYTES
    for label in ("T1w crop (1 mm)", "super-resolved T1w (x2)", "Super-resolution: by a model.",
                  "detail (sagittal, zoomed)"):
        assert label in text
    # 3 views x 3 cuts on each side plus the two detail panels
    panel = re.compile(r"(pair|detail)-(first|second)-(sagittal|coronal|axial)-\d")
    axes = [g.get("id") for g in root.iter(f"{SVG_NS}g") if panel.fullmatch(g.get("id") or "")]
    assert sum(a.startswith("pair-first") for a in axes) == 9 and sum(a.startswith("pair-second") for a in axes) == 9
    assert sum(a.startswith("detail-") for a in axes) == 2
    # the slice positions printed on both sides are the same world coordinates
    first = re.findall(r'id="pair-first-(?:sagittal|coronal|axial)-\d".*?([xyz]=-?\d+)<', text, re.S)
    second = re.findall(r'id="pair-second-(?:sagittal|coronal|axial)-\d".*?([xyz]=-?\d+)<', text, re.S)
    assert len(first) == 9 and first == second
    with pytest.raises(ValueError, match="detail view"):
        rl.plot_image_pair(images["t1w"], images["t2w"], tmp_path / "x.svg", detail="oblique")


def test_t2_and_superres_sentences():
    real = {"t2": "real", "t2_details": {"source": "real", "file": "sub-01_T2w.nii.gz", "reason": ""}}
    assert lob.t2_line(real) == "T2: the subject's T2w sub-01_T2w.nii.gz, rigidly registered to the T1w."
    synth = {"t2": "synthetic", "t2_details": {"model": "cerebellum-t2synth", "version": "0.1.0",
                                               "reason": "the subject has no T2w"}}
    assert lob.t2_line(synth) == ("T2: synthetic T2w from the T1w by cerebellum-t2synth 0.1.0 (the subject has no "
                                  "T2w).")
    off = {"t2": "none", "t2_details": {"reason": "switched off with --cerebellum-t2 none"}}
    assert lob.t2_line(off) == "T2: not run (switched off with --cerebellum-t2 none)."
    assert lob.superres_line({}) is None
    assert lob.superres_line(SR_QC) == "Super-resolution: the T1w crop x2 (0.5 mm) by cerebellum-superres-x2 0.1.0."
    assert lob.superres_line({"superres": False, "superres_details": {"reason": "switched off with --no-superres"}}) \
        == "Super-resolution: not run (switched off with --no-superres)."


def test_section_has_the_pair_figures_and_sentences(images, tmp_path):
    qc = dict(QC, **SR_QC, t2="synthetic", t2_details={"source": "synthetic", "model": "cerebellum-t2synth",
                                                        "version": "0.1.0", "reason": ""})
    write_derivatives(tmp_path, qc=qc, figures=False)
    fig = tmp_path / "sub-01" / "figures"
    entities = lob.figure_entities(TEMPLATE)
    names = {key: f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-{desc}.svg"
             for key, desc in (("superres", "superres_T1w"), ("t2", "t2_T2w"))}
    assert {k: entities[k]["desc"] for k in names} == {"superres": "superres", "t2": "t2"}
    rl.plot_image_pair(images["t1w"], images["superres"], fig / names["superres"], detail="sagittal")
    rl.plot_image_pair(images["t1w"], images["t2w"], fig / names["t2"])
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    paths = [Path(r["path"]).name for r in section["reportlets"]]
    assert paths == [names["superres"], names["t2"]]
    captions = {Path(r["path"]).name: r["caption"] for r in section["reportlets"]}
    assert "x2 super-resolution" in captions[names["superres"]] and "by cerebellum-superres-x2" in \
        captions[names["superres"]]
    assert "synthetic T2w from the T1w by cerebellum-t2synth 0.1.0" in captions[names["t2"]]
    assert "T2: synthetic T2w from the T1w by cerebellum-t2synth 0.1.0." in section["notes"]
    assert section["superres"].startswith("Super-resolution: the T1w crop x2")
    html = write_subject_report(tmp_path, _record()).read_text()
    body = html[html.index('<section id="sec-cerebellar-lobules">'):]
    body = body[: body.index("</section>")]
    assert "desc-superres_T1w.svg" in body and "desc-t2_T2w.svg" in body
    assert "T2: synthetic T2w from the T1w by cerebellum-t2synth 0.1.0." in body
    assert "Super-resolution: the T1w crop x2 (0.5 mm) by cerebellum-superres-x2 0.1.0." in body


def test_section_says_what_was_switched_off(tmp_path):
    qc = dict(QC, superres=False, superres_details={"used": False, "reason": "switched off with --no-superres"},
              t2="none", t2_details={"source": "none", "reason": "switched off with --cerebellum-t2 none"})
    write_derivatives(tmp_path, qc=qc, figures=False)
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    assert section["reportlets"] == []
    assert "T2: not run (switched off with --cerebellum-t2 none)." in section["notes"]
    assert "Super-resolution: not run (switched off with --no-superres)." in section["notes"]
    html = write_subject_report(tmp_path, _record()).read_text()
    assert "Super-resolution: not run (switched off with --no-superres)." in html


def test_pdf_has_the_pair_figures(images, tmp_path):
    from bids_app.reports.pdf import pdf_unavailable_reason, render_pdf_html

    qc = dict(QC, **SR_QC, t2="real", t2_details={"source": "real", "file": "sub-01_T2w.nii.gz"})
    write_derivatives(tmp_path, qc=qc, figures=False)
    fig = tmp_path / "sub-01" / "figures"
    rl.plot_image_pair(images["t1w"], images["t2w"], fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-t2_T2w.svg")
    section = lob.lobule_section(tmp_path, SOURCE, TEMPLATE)
    html = render_pdf_html({"title": "sub-01", "subject": "01", "sections": [section]}, tmp_path)
    assert "desc-t2_T2w.svg" in html and "the subject&#39;s T2w sub-01_T2w.nii.gz, rigidly registered" in html
    if pdf_unavailable_reason() is None:
        write_subject_report(tmp_path, _record())
        assert (tmp_path / "sub-01_seg-cerebellum_report.pdf").read_bytes()[:5] == b"%PDF-"


def test_reports_workflow_draws_the_pair_figures(images, tmp_path):
    from workflows.cerebellum_reports import init_cerebellum_reports_wf
    from tests.reports.test_lobule_report import write_morph

    out = tmp_path / "out"
    qc = tmp_path / "qc.json"
    qc.write_text(json.dumps(dict(QC, **SR_QC, t2="real", t2_details={"file": "sub-01_T2w.nii.gz"})))
    wf = init_cerebellum_reports_wf(output_dir=str(out), source_file=SOURCE, template=TEMPLATE,
                                    uncertainty_desc=None, superres=True, t2_source="real")
    assert {"superres_rpt", "t2_rpt", "ds_superres_rpt", "ds_t2_rpt"} <= set(wf.list_node_names())
    assert wf.get_node("t2_rpt").inputs.second_label == "the subject's T2w (rigidly registered)"
    inputnode = wf.get_node("inputnode")
    inputnode.inputs.t1w_crop = str(images["t1w"])
    inputnode.inputs.dseg_crop = str(images["dseg"])
    inputnode.inputs.morph_tsv = str(write_morph(tmp_path / "morph.tsv"))
    inputnode.inputs.qc_json = str(qc)
    inputnode.inputs.superres_crop = str(images["superres"])
    inputnode.inputs.t2w_crop = str(images["t2w"])
    wf.base_dir = str(tmp_path / "work")
    wf.run(plugin="Linear")
    fig = out / "sub-01" / "figures"
    t2 = (fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-t2_T2w.svg").read_text()
    assert "T2: the subject&#39;s T2w sub-01_T2w.nii.gz, rigidly registered to the T1w." in t2 or \
        "T2: the subject's T2w sub-01_T2w.nii.gz, rigidly registered to the T1w." in t2
    sr = (fig / f"sub-01_space-{TEMPLATE}_seg-cerebellum_desc-superres_T1w.svg").read_text()
    assert "by cerebellum-superres-x2 0.1.0" in sr and "detail (sagittal, zoomed)" in sr
    off = init_cerebellum_reports_wf(output_dir=str(out), source_file=SOURCE, template=TEMPLATE)
    assert not {"superres_rpt", "t2_rpt"} & set(off.list_node_names())
    with pytest.raises(ValueError, match="t2_source"):
        init_cerebellum_reports_wf(output_dir=str(out), source_file=SOURCE, template=TEMPLATE, t2_source="both")
