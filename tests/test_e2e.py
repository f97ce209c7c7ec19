"""The real graph, end to end, on the phantom BIDS dataset (minutes): participant, resume,
reports-only and group levels, one broken subject that must not stop the others, and the whole-brain
segmentation and cortical parcellation branches with tiny random checkpoints (switched off, and with no
models installed)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from bids_app.cli.run import main
from bids_app.core.labels import load_protocol, merge_labels
from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint, tree_state

pytestmark = pytest.mark.e2e


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, phantom_templateflow):
    import nibabel as nb

    from bids_app.core.phantom import write_demo_dataset

    root = tmp_path_factory.mktemp("e2e")
    bids = write_demo_dataset(root / "bids", n_subjects=2, voxel_size=2.0, seed=3)
    # a third subject whose T1w has NaN voxels: it must fail alone
    broken = bids / "sub-broken" / "anat"
    broken.mkdir(parents=True)
    src = nb.load(str(bids / "sub-phantom01" / "anat" / "sub-phantom01_T1w.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32).copy()
    data[10, 10, 10] = np.nan
    nb.save(nb.Nifti1Image(data, src.affine), str(broken / "sub-broken_T1w.nii.gz"))
    with open(bids / "participants.tsv", "a") as fh:
        fh.write("sub-broken\tn/a\tn/a\n")
    out = bids / "derivatives" / "arborseg"  # allowed inside the input dataset
    model = tiny_wholebrain_checkpoint(root / "models" / "tiny-wholebrain")
    parc = tiny_parcellation_checkpoint(root / "models" / "tiny-parc")
    common = ["-w", str(root / "work"), "--template", "ArborSegPhantom", "--templateflow-home",
              str(phantom_templateflow), "--voxel-size", "2", "--nprocs", "2"]
    args = [str(bids), str(out), "participant", *common, "--seg-models", str(model), "--parc-models", str(parc),
            "--mc-samples", "2"]
    before = tree_state(bids)
    t0 = time.perf_counter()
    code = main(args)
    first = time.perf_counter() - t0
    return {"bids": bids, "out": out, "args": args, "code": code, "first": first, "before": before, "root": root,
            "common": common, "model": model}


def test_participant_outputs(e2e):
    assert e2e["code"] == 1  # one participant failed, the others finished
    out = e2e["out"]
    for sub in ("phantom01", "phantom02"):
        anat = out / f"sub-{sub}" / "anat"
        for name in ("desc-preproc_T1w", "label-ICV_mask", "desc-brain_mask",
                     "from-T1w_to-ArborSegPhantom_mode-image_xfm", "from-ArborSegPhantom_to-T1w_mode-image_xfm",
                     "space-ArborSegPhantom_desc-preproc_T1w", "space-ArborSegPhantom_desc-cerebellum_T1w"):
            matches = list(anat.glob(f"sub-{sub}_{name}.*"))
            assert {p.suffix for p in matches} >= {".json"}, name
            sidecar = json.loads((anat / f"sub-{sub}_{name}.json").read_text())
            assert sidecar["Sources"], name
        t1 = json.loads((anat / f"sub-{sub}_desc-preproc_T1w.json").read_text())
        assert t1["Sources"] == [f"bids:raw:sub-{sub}/anat/sub-{sub}_T1w.nii.gz"]
        icv = json.loads((anat / f"sub-{sub}_label-ICV_mask.json").read_text())
        assert 900 < icv["VolumeML"] < 2200
        figures = sorted(p.name for p in (out / f"sub-{sub}" / "figures").glob("*.svg"))
        # 5 of preprocessing, 2 of the segmentation, 1 of the parcellation, 3 of the cerebellum (+ its PNG render),
        # T1w | T2w (the phantom's own T2w, --cerebellum-t2 auto) and T1w | super-resolved T1w when a model is installed
        from bids_app.models.imaging import default_image_model

        assert len(figures) == 12 + (default_image_model("superres") is not None), figures
        assert f"sub-{sub}_space-ArborSegPhantom_seg-cerebellum_desc-t2_T2w.svg" in figures
        assert (out / f"sub-{sub}" / "figures" / f"sub-{sub}_space-ArborSegPhantom_seg-cerebellum_desc-render_dseg.png"
                ).is_file()
        html = (out / f"sub-{sub}.html").read_text()
        assert "success" in html.lower() and "figures/" in html
        record = json.loads((out / "logs" / f"sub-{sub}_record.json").read_text())
        assert record["status"] == "success"
        stages = {r["stage"] for r in record["runtimes"]}
        assert {"conform", "denoise", "n4", "template_registration", "brain_mask", "n4_masked",
                "intensity_normalisation", "template_resampling", "cerebellum_crop"} <= stages
    broken = json.loads((out / "logs" / "sub-broken_record.json").read_text())
    assert broken["status"] == "failed" and "NaN" in broken["error"]
    assert not (out / "sub-broken").exists()


def test_preprocessing_is_plausible(e2e):
    import nibabel as nb

    anat = e2e["out"] / "sub-phantom01" / "anat"
    t1 = nb.load(str(anat / "sub-phantom01_desc-preproc_T1w.nii.gz"))
    brain = np.asarray(nb.load(str(anat / "sub-phantom01_desc-brain_mask.nii.gz")).dataobj) > 0
    icv = np.asarray(nb.load(str(anat / "sub-phantom01_label-ICV_mask.nii.gz")).dataobj) > 0
    assert nb.aff2axcodes(t1.affine) == ("R", "A", "S")
    assert np.allclose(nb.affines.voxel_sizes(t1.affine), 2.0)
    assert brain.sum() < icv.sum() and (brain & ~icv).sum() == 0
    data = np.asarray(t1.dataobj)
    assert abs(np.percentile(data[brain], 99) - 1.0) < 0.02
    crop = nb.load(str(anat / "sub-phantom01_space-ArborSegPhantom_desc-cerebellum_T1w.nii.gz"))
    assert crop.shape == (64, 44, 44)  # the 128 x 88 x 88 mm box at 2 mm
    assert float(np.asarray(crop.dataobj).mean()) > 0.1  # tissue, not air


def test_input_untouched(e2e):
    after = {k: v for k, v in tree_state(e2e["bids"]).items() if not k.startswith("derivatives")}
    assert after == e2e["before"]


def test_pybids_indexes_every_derivative(e2e):
    from bids import BIDSLayout

    layout = BIDSLayout(str(e2e["bids"]), validate=False, derivatives=str(e2e["out"]))
    deriv = layout.derivatives["ArborSeg"] if "ArborSeg" in layout.derivatives else list(layout.derivatives.values())[0]
    indexed = {Path(f).resolve() for f in deriv.get(return_type="file")}
    written = {p.resolve() for p in e2e["out"].glob("sub-*/**/*") if p.is_file()}
    assert written and written <= indexed, sorted(map(str, written - indexed))
    assert deriv.get(subject="phantom01", desc="preproc", suffix="T1w", extension=".nii.gz", space=None)


def test_logs_and_description(e2e):
    out = e2e["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "ArborSeg"
    tomls = list((out / "logs").glob("config-*.toml"))
    import tomllib

    cfg = tomllib.loads(tomls[0].read_text())
    assert cfg["arborseg"]["template"] == "ArborSegPhantom" and cfg["preproc"]["voxel_size"] == 2.0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "N4" in citation and "Tustison" in citation
    assert not list(out.rglob("*.part"))


def test_resume_reuses_cache_and_is_identical(e2e):
    out = e2e["out"]
    ref = _md5(out / "sub-phantom01" / "anat" / "sub-phantom01_desc-preproc_T1w.nii.gz")
    t0 = time.perf_counter()
    assert main(e2e["args"]) == 1
    second = time.perf_counter() - t0
    assert _md5(out / "sub-phantom01" / "anat" / "sub-phantom01_desc-preproc_T1w.nii.gz") == ref
    assert second < e2e["first"] * 0.6, (second, e2e["first"])


def test_reports_only_and_group(e2e, capsys):
    out = e2e["out"]
    (out / "sub-phantom02.html").unlink()
    assert main(e2e["args"] + ["--reports-only", "--participant-label", "phantom02"]) == 0
    assert (out / "sub-phantom02.html").is_file()
    assert main([str(e2e["bids"]), str(out), "group"]) == 0
    tsv = (out / "group.tsv").read_text().splitlines()
    header = tsv[0].split("\t")
    rows = {ln.split("\t")[0]: dict(zip(header, ln.split("\t"))) for ln in tsv[1:]}
    assert set(rows) == {"sub-phantom01", "sub-phantom02", "sub-broken"}
    assert rows["sub-broken"]["status"] == "failed" and rows["sub-phantom01"]["status"] == "success"
    assert float(rows["sub-phantom01"]["icv_ml"]) > 0
    html = (out / "group.html").read_text()
    assert "sub-phantom01.html" in html and "sub-broken" in html
    # segmentation tables: one row per successful subject, one column per structure (mm3)
    aseg = load_protocol("aseg")
    for seg, protocol in (("wholebrain", aseg), ("cerebrum7", load_protocol("cerebrum7"))):
        lines = (out / f"group_volumes_{seg}.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        assert header == ["label", "subject", "session", *protocol.names[1:]]
        table = {ln.split("\t")[0]: ln.split("\t") for ln in lines[1:]}
        assert set(table) == {"sub-phantom01", "sub-phantom02"}
        assert all(float(v) >= 0 for row in table.values() for v in row[3:])
    qc = (out / "group_seg_qc.tsv").read_text().splitlines()
    header = qc[0].split("\t")
    assert header[:5] == ["label", "subject", "session", "qc_flag", "mean_cv_percent"]
    rows = [dict(zip(header, ln.split("\t"))) for ln in qc[1:]]
    assert sorted(r["label"] for r in rows) == ["sub-phantom01", "sub-phantom02"]
    assert all(r["qc_flag"] in ("pass", "warn") and r["mc_samples"] == "2" for r in rows)
    assert all(r["tta"] == "flip" for r in rows)  # the default TTA that 2 samples allow
    assert all(r["refinement"] == "intensity" for r in rows)  # the default refinement
    for r in rows:  # the input-geometry check of each subject's QC JSON, gathered
        qc_json = json.loads(next((out / r["label"] / "anat").glob("*_seg-wholebrain_qc.json")).read_text())
        assert r["input_flag"] == qc_json["InputResolution"]["Flag"]
        assert float(r["input_thickest_mm"]) == qc_json["InputResolution"]["ThickestMM"] > 0
    # the cortical parcellation: its volumes and its own QC table
    dkt = load_protocol("dkt-aseg")
    lines = (out / "group_volumes_dkt.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["label", "subject", "session", *dkt.names[1:]]
    assert sorted(ln.split("\t")[0] for ln in lines[1:]) == ["sub-phantom01", "sub-phantom02"]
    qc = (out / "group_seg_qc_dkt.tsv").read_text().splitlines()
    rows = [dict(zip(qc[0].split("\t"), ln.split("\t"))) for ln in qc[1:]]
    assert sorted(r["label"] for r in rows) == ["sub-phantom01", "sub-phantom02"]
    assert all(r["label_protocol"] == "dkt-aseg" and r["models"] == "tiny-parc" for r in rows)
    assert (out / "figures" / "group_seg-dkt_desc-meancv_strip.svg").is_file()
    for family in ("cortex", "whitematter", "deepgreymatter", "ventriclescsf", "cerebellum", "brainstem"):
        rel = f"figures/group_seg-wholebrain_desc-{family}_strip.svg"
        assert (out / rel).is_file() and "sub-phantom01.html" in (out / rel).read_text()
    assert "structures-axes" in html and "segmentation QC: warn" in html


def test_sessions_are_processed_and_named(tmp_path, phantom_templateflow):
    import shutil

    from bids_app.core.phantom import write_demo_dataset

    src = write_demo_dataset(tmp_path / "src", n_subjects=1, voxel_size=3.0, seed=5)
    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    shutil.copy(src / "dataset_description.json", bids)
    for ses in ("A", "B", "C"):
        anat = bids / "sub-01" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(src / "sub-phantom01" / "anat" / "sub-phantom01_T1w.nii.gz", anat / f"sub-01_ses-{ses}_T1w.nii.gz")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--participant-label", "01", "--session-label", "A", "ses-B",
                 "-w", str(tmp_path / "work"), "--template", "ArborSegPhantom", "--templateflow-home",
                 str(phantom_templateflow), "--voxel-size", "3", "--no-denoise", "--nprocs", "2", "--no-seg"])
    assert code == 0
    for ses in ("A", "B"):
        assert (out / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_desc-preproc_T1w.nii.gz").is_file()
        assert (out / f"sub-01_ses-{ses}.html").is_file()
        assert (out / "sub-01" / "figures" / f"sub-01_ses-{ses}_desc-brain_mask.svg").is_file()
    assert not (out / "sub-01" / "ses-C").exists()  # not selected
    record = json.loads((out / "logs" / "sub-01_ses-A_record.json").read_text())
    assert "denoise" not in {r["stage"] for r in record["runtimes"]}  # --no-denoise removes the stage


SEG_FILES = ("seg-wholebrain_dseg.nii.gz", "seg-wholebrain_dseg.tsv", "seg-cerebrum7_dseg.nii.gz",
             "seg-cerebrum7_dseg.tsv", "seg-wholebrain_desc-entropy_uncertainty.nii.gz", "seg-wholebrain_morph.tsv",
             "seg-cerebrum7_morph.tsv", "seg-wholebrain_qc.json",
             *(f"seg-cerebrum7_label-{a}_probseg.nii.gz" for a in ("GM", "WM", "CSF", "VEN", "CER", "BST", "BGA")))


DKT_FILES = ("seg-dkt_dseg.nii.gz", "seg-dkt_dseg.tsv", "seg-dkt_dseg.json", "seg-dkt_morph.tsv",
             "seg-dkt_morph.json", "seg-dkt_qc.json")


def test_segmentation_derivatives(e2e):
    import nibabel as nb

    from bids_app.core.morphometry import MORPH_COLUMNS, read_morphometry_tsv

    out = e2e["out"]
    aseg = load_protocol("aseg")
    for sub in ("phantom01", "phantom02"):
        anat = out / f"sub-{sub}" / "anat"
        raw = nb.load(str(e2e["bids"] / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"))
        for name in SEG_FILES:
            assert (anat / f"sub-{sub}_{name}").is_file(), name
            if name.endswith(".nii.gz"):
                img = nb.load(str(anat / f"sub-{sub}_{name}"))
                assert img.shape == raw.shape[:3] and np.allclose(img.affine, raw.affine), name
                sidecar = json.loads((anat / f"sub-{sub}_{name.replace('.nii.gz', '.json')}").read_text())
                assert sidecar["Sources"][0] == f"bids:raw:sub-{sub}/anat/sub-{sub}_T1w.nii.gz", name
                assert sidecar["Models"] == ["tiny-wholebrain"] and sidecar["MCSamples"] == 2
        dseg = np.asarray(nb.load(str(anat / f"sub-{sub}_seg-wholebrain_dseg.nii.gz")).dataobj)
        assert dseg.dtype == np.int16 and set(np.unique(dseg)) <= set(aseg.indices)
        tsv = (anat / f"sub-{sub}_seg-wholebrain_dseg.tsv").read_text().splitlines()
        assert tsv[0].split("\t")[:2] == ["index", "name"] and len(tsv) == len(aseg) + 1
        morph = anat / f"sub-{sub}_seg-wholebrain_morph.tsv"
        assert morph.read_text().splitlines()[0].split("\t") == list(MORPH_COLUMNS)
        rows = read_morphometry_tsv(morph)
        assert [r["name"] for r in rows] == list(aseg.names[1:])
        assert json.loads((anat / f"sub-{sub}_seg-wholebrain_morph.json").read_text())["Sources"]
        qc = json.loads((anat / f"sub-{sub}_seg-wholebrain_qc.json").read_text())
        assert qc["MCSamples"] == 2 and qc["Seed"] == 42 and qc["QCFlag"] in ("pass", "warn")
        assert qc["Sources"] and set(qc["Protocols"]) == {"aseg", "cerebrum7", "deep14"}
        figures = out / f"sub-{sub}" / "figures"
        for fig in ("seg-wholebrain_dseg.svg", "seg-wholebrain_desc-entropy_uncertainty.svg"):
            assert (figures / f"sub-{sub}_{fig}").is_file(), fig
        record = json.loads((out / "logs" / f"sub-{sub}_record.json").read_text())
        seg = record["segmentation"]
        assert seg["status"] == "done" and seg["models"] == ["tiny-wholebrain"] and seg["mc_samples"] == 2
        assert [r["name"] for r in seg["volumes"]["wholebrain"]] == list(aseg.names[1:])
        assert "seg_mean_cv_percent" in record["metrics"] or seg["mean_cv_percent"] is None
        html = (out / f"sub-{sub}.html").read_text()
        assert "Whole-brain segmentation" in html and f"sub-{sub}_seg-wholebrain_dseg.svg" in html
        assert 'class="seg-table"' in html and "Left-Hippocampus" in html
        # flagged rows of the whole-brain table and of the cerebellum section's lobule table
        cerebellum_rows = read_morphometry_tsv(anat / f"sub-{sub}_seg-cerebellum_morph.tsv")
        assert html.count('<tr class="flagged">') == sum(r["qc_flag"] == "warn" for r in rows + cerebellum_rows)
        # the cortical parcellation: only the seg-dkt outputs, on the raw grid, background outside the ICV
        for name in DKT_FILES:
            assert (anat / f"sub-{sub}_{name}").is_file(), name
        assert not list(anat.glob("*_seg-dkt_*probseg*")) and not list(anat.glob("*seg-dkt_desc-entropy*"))
        dkt = load_protocol("dkt-aseg")
        img = nb.load(str(anat / f"sub-{sub}_seg-dkt_dseg.nii.gz"))
        assert img.shape == raw.shape[:3] and np.allclose(img.affine, raw.affine)
        assert set(np.unique(np.asarray(img.dataobj))) <= set(dkt.indices)
        sidecar = json.loads((anat / f"sub-{sub}_seg-dkt_dseg.json").read_text())
        assert sidecar["Models"] == ["tiny-parc"] and sidecar["LabelProtocol"] == "dkt-aseg"
        # fused with the whole-brain ensemble: the parcels merged into aseg are the whole-brain labels
        assert sidecar["FusedWith"] == ["tiny-wholebrain"] and "hierarchical" in sidecar["Fusion"]
        wholebrain = np.asarray(nb.load(str(anat / f"sub-{sub}_seg-wholebrain_dseg.nii.gz")).dataobj)
        assert (merge_labels(np.asarray(img.dataobj), dkt, load_protocol("aseg")) == wholebrain).all()
        assert [r["name"] for r in read_morphometry_tsv(anat / f"sub-{sub}_seg-dkt_morph.tsv")] == list(dkt.names[1:])
        assert json.loads((anat / f"sub-{sub}_seg-dkt_morph.json").read_text())["Sources"]
        parc_qc = json.loads((anat / f"sub-{sub}_seg-dkt_qc.json").read_text())
        assert parc_qc["Task"] == "parcellation" and parc_qc["MCSamples"] == 2 and parc_qc["Sources"]
        assert "dkt-aseg" in parc_qc["Protocols"] and parc_qc["Models"][0]["Name"] == "tiny-parc"
        assert (figures / f"sub-{sub}_seg-dkt_dseg.svg").is_file()
        assert record["parcellation"]["status"] == "done" and record["parcellation"]["models"] == ["tiny-parc"]
        assert "Cortical parcellation" in html and f"sub-{sub}_seg-dkt_dseg.svg" in html
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "Monte-Carlo dropout" in citation and "Zopes" in citation
    broken = json.loads((out / "logs" / "sub-broken_record.json").read_text())
    assert broken["segmentation"]["status"] == "failed"


def _no_seg_files(out: Path, *, cerebellum: bool = False) -> None:
    """No segmentation output at all (``cerebellum``: except the cerebellum branch's, which has its own switch)."""
    found = [p for p in out.rglob("*seg-*") if p.is_file()]
    if cerebellum:
        assert any("seg-cerebellum" in p.name for p in found)
        found = [p for p in found if "seg-cerebellum" not in p.name]
    assert not found
    group = [p.name for p in out.glob("group_*seg*.tsv")] + [p.name for p in out.glob("group_volumes_*.tsv")]
    assert not [name for name in group if not (cerebellum and "cerebellum" in name)], group


def test_no_seg_writes_no_segmentation(e2e):
    out = e2e["root"] / "out-noseg"
    code = main([str(e2e["bids"]), str(out), "participant", "--participant-label", "phantom01", *e2e["common"],
                 "--no-seg"])
    assert code == 0  # preprocessing comes from the shared work directory
    assert (out / "sub-phantom01" / "anat" / "sub-phantom01_desc-preproc_T1w.nii.gz").is_file()
    record = json.loads((out / "logs" / "sub-phantom01_record.json").read_text())
    assert record["segmentation"] == {"status": "off", "reason": "switched off with --no-seg"}
    assert "Whole-brain segmentation" not in (out / "sub-phantom01.html").read_text()
    assert main([str(e2e["bids"]), str(out), "group"]) == 0
    _no_seg_files(out, cerebellum=True)  # --no-seg leaves the cerebellum branch on (--no-cerebellum stops it)
    assert "segmeancv" not in (out / "group.html").read_text()


def test_no_models_installed_says_so(e2e, monkeypatch, tmp_path, capsys):
    from bids_app.models import checkpoint

    monkeypatch.setattr(checkpoint, "PACKAGE_MODELS_DIR", tmp_path / "none")
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    out = e2e["root"] / "out-nomodels"
    code = main([str(e2e["bids"]), str(out), "participant", "--participant-label", "phantom01", *e2e["common"]])
    assert code == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "segmentation skipped" in ln]
    assert len(warnings) == 1 and "no whole-brain segmentation models are installed" in warnings[0]
    record = json.loads((out / "logs" / "sub-phantom01_record.json").read_text())
    assert record["segmentation"]["status"] == "skipped"
    html = (out / "sub-phantom01.html").read_text()
    assert "Whole-brain segmentation" in html and "Not run: no whole-brain segmentation models" in html
    assert "Not run: no cortical parcellation models" in html
    _no_seg_files(out)
