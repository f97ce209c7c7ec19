"""The WholeBrainSegmentation interface: outputs on the raw T1w's grid, tables, QC, error lines."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from bids_app.core.conform import conform
from bids_app.core.labels import load_protocol
from bids_app.core.morphometry import MORPH_COLUMNS, read_morphometry_tsv
from bids_app.interfaces.segment import WholeBrainSegmentation
from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A LAS int16 raw T1w, its conformed 1 mm RAS version (normalised), an ICV mask and a tiny model."""
    root = tmp_path_factory.mktemp("wholebrain")
    shape = (30, 34, 26)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.42 * s)) ** 2 for g, c, s in zip(grid, centre, shape))
    rng = np.random.default_rng(4)
    data = np.where(r < 1, 800 + 200 * (grid[0] / shape[0]) + rng.normal(0, 20, shape), 20).astype(np.int16)
    affine = np.array([[-1.0, 0, 0, 40.0], [0, 1.0, 0, -60.0], [0, 0, 1.0, -20.0], [0, 0, 0, 1]])
    raw = nb.Nifti1Image(data, affine)
    raw.set_data_dtype(np.int16)
    assert nb.aff2axcodes(raw.affine) == ("L", "A", "S")
    raw_file = root / "sub-01_T1w.nii.gz"
    nb.save(raw, str(raw_file))
    conf = conform(nb.Nifti1Image(data.astype(np.float32), affine), voxel_size=1.0, crop_margin_mm=None)
    values = np.asarray(conf.dataobj, dtype=np.float32)
    icv = (values > 400).astype(np.uint8)
    normalised = np.clip(values / np.percentile(values[icv > 0], 99), 0, 2).astype(np.float32)
    t1w_file, icv_file = root / "t1w_preproc.nii.gz", root / "icv_mask.nii.gz"
    nb.save(nb.Nifti1Image(normalised, conf.affine), str(t1w_file))
    nb.save(nb.Nifti1Image(icv, conf.affine), str(icv_file))
    ckpt = tiny_wholebrain_checkpoint(root / "tiny-wholebrain")
    return {"root": root, "raw": raw_file, "t1w": t1w_file, "icv": icv_file, "ckpt": ckpt, "shape": shape,
            "affine": affine, "conformed_affine": conf.affine}


def _run(inputs, cwd, monkeypatch, **kwargs):
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    node = WholeBrainSegmentation(t1w_preproc=str(inputs["t1w"]), icv_mask=str(inputs["icv"]),
                                  source_file=str(inputs["raw"]), checkpoints=[str(inputs["ckpt"])], mc_samples=3,
                                  seed=5, num_threads=1, device="cpu", **kwargs)
    return node.run().outputs


@pytest.fixture(scope="module")
def isolated(inputs, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _run(inputs, tmp_path_factory.mktemp("isolated"), mp)
    finally:
        mp.undo()


def test_native_outputs_have_the_raw_grid(inputs, isolated):
    assert isolated.fine_protocol == "aseg"
    for path in (isolated.aseg_dseg, isolated.cerebrum7_dseg, isolated.fine_dseg):
        img = nb.load(path)
        assert img.shape == inputs["shape"] and np.allclose(img.affine, inputs["affine"])
        assert img.get_data_dtype() == np.int16
    aseg = np.asarray(nb.load(isolated.aseg_dseg).dataobj)
    assert set(np.unique(aseg)) <= set(load_protocol("aseg").indices)
    cer = np.asarray(nb.load(isolated.cerebrum7_dseg).dataobj)
    assert set(np.unique(cer)) <= set(load_protocol("cerebrum7").indices)
    # the conformed grid is the LAS grid flipped along x: nearest neighbour is an exact flip
    conformed = nb.load(isolated.conformed_aseg_dseg)
    assert np.allclose(conformed.affine, inputs["conformed_affine"])
    np.testing.assert_array_equal(aseg, np.asarray(conformed.dataobj)[::-1])
    assert len(isolated.probseg_cerebrum7) == 7 and isolated.probseg_labels == ["GM", "WM", "CSF", "VEN", "CER",
                                                                                 "BST", "BGA"]
    total = np.zeros(inputs["shape"], np.float32)
    for path in isolated.probseg_cerebrum7:
        img = nb.load(path)
        assert img.shape == inputs["shape"] and np.allclose(img.affine, inputs["affine"])
        prob = np.asarray(img.dataobj, dtype=np.float32)
        assert img.get_data_dtype() == np.float32 and prob.min() >= 0 and prob.max() <= 1 + 1e-5
        total += prob
    assert total.max() <= 1 + 1e-4
    entropy = nb.load(isolated.entropy)
    assert entropy.shape == inputs["shape"] and np.allclose(entropy.affine, inputs["affine"])
    assert np.asarray(entropy.dataobj).max() <= np.log(33) + 1e-4


def test_tables_and_qc(inputs, isolated):
    for path, protocol in ((isolated.aseg_morph, "aseg"), (isolated.cerebrum7_morph, "cerebrum7")):
        with open(path) as fh:
            assert fh.readline().rstrip("\n").split("\t") == list(MORPH_COLUMNS)
        rows = read_morphometry_tsv(path)
        assert [r["index"] for r in rows] == list(load_protocol(protocol).indices[1:])
    conformed = np.asarray(nb.load(isolated.conformed_aseg_dseg).dataobj)
    rows = read_morphometry_tsv(isolated.aseg_morph)
    assert sum(r["volume_mm3"] for r in rows) == pytest.approx(float((conformed > 0).sum()))
    tsv = isolated.aseg_dseg_tsv
    with open(tsv) as fh:
        assert fh.readline().split() == ["index", "name", "abbreviation", "color"]
    qc = json.loads(open(isolated.qc_json).read())
    assert qc["MCSamples"] == 3 and qc["Seed"] == 5 and qc["QCFlag"] in ("pass", "warn")
    assert qc["QCThresholdPercent"] == 1.0 and qc["Models"][0]["Name"] == "tiny-wholebrain"
    assert set(qc["Protocols"]) == {"aseg", "cerebrum7", "deep14"}
    assert len(qc["Protocols"]["aseg"]["Structures"]) == 32 and len(qc["Protocols"]["deep14"]["Structures"]) == 14
    assert all(s["qc_flag"] in ("pass", "warn") for s in qc["Protocols"]["cerebrum7"]["Structures"])
    assert "Deep14MeanCVPercent" in qc and qc["ICVML"] > 0
    # the raw T1w is 1 mm, no coarser than the model grid
    geometry = qc["InputResolution"]
    assert geometry["VoxelSizeMM"] == [1.0, 1.0, 1.0] and geometry["Flag"] == "pass"
    assert geometry["ModelVoxelMM"] >= 1.0
    assert isolated.qc_flag == qc["QCFlag"]
    assert qc["Refinement"] == "none" and qc["RefinementSkipped"] is None  # the interface's default
    assert qc["QCCalibration"]["Calibrated"] is False  # the tiny model has none: the T1w default
    assert {s["qc_threshold_percent"] for s in qc["Protocols"]["aseg"]["Structures"]} == {1.0}


def test_intensity_refinement_runs_on_a_1mm_scan_and_is_skipped_for_thick_slices(inputs, tmp_path, monkeypatch):
    from bids_app.models.segment_files import refinement_for_input

    outputs = _run(inputs, tmp_path / "refined", monkeypatch, refinement="intensity")
    qc = json.loads(open(outputs.qc_json).read())
    assert qc["Refinement"] == "intensity" and qc["RefinementSkipped"] is None
    ckpt = [str(inputs["ckpt"])]  # a 2 mm model
    assert refinement_for_input("intensity", (1.0, 1.0, 2.0), ckpt) == ("intensity", None)
    ran, why = refinement_for_input("intensity", (0.5, 0.5, 5.5), ckpt)
    assert ran == "none" and "5.50 mm" in why and "skipped" in why
    assert refinement_for_input("none", (0.5, 0.5, 5.5), ckpt) == ("none", None)


def test_a_calibrated_ensemble_gets_its_own_thresholds(inputs, tmp_path, monkeypatch):
    import shutil

    stem = inputs["ckpt"].with_suffix("")
    shutil.copy(stem.with_suffix(".safetensors"), tmp_path / "tiny-wholebrain.safetensors")
    manifest = json.loads(inputs["ckpt"].read_text())
    aseg = load_protocol("aseg")
    manifest["qc_calibration"] = {
        "ensemble": ["tiny-wholebrain"], "modality": "T1w", "mc_samples": 3, "method": "test",
        "source": "test", "study": {"clean_scans": 5},
        "protocols": {"aseg": {"mean_cv_threshold_percent": 50.0,
                               "structure_thresholds_percent": {aseg.names[1]: -1.0, aseg.names[2]: 1e6}},
                      "deep14": {"mean_cv_threshold_percent": 1e6, "structure_thresholds_percent": {}}}}
    (tmp_path / "tiny-wholebrain.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(inputs, "ckpt", tmp_path / "tiny-wholebrain.json")
    out = _run(inputs, tmp_path / "run", monkeypatch, isolate=False)
    qc = json.loads(open(out.qc_json).read())
    assert qc["QCCalibration"]["Calibrated"] is True and qc["QCCalibration"]["MCSamples"] == 3
    assert qc["QCThresholdPercent"] == 50.0 and qc["Protocols"]["aseg"]["QCThresholdPercent"] == 50.0
    assert qc["QCFlag"] == ("pass" if qc["MeanCVPercent"] <= 50.0 else "warn")
    structures = qc["Protocols"]["aseg"]["Structures"]
    assert structures[0]["qc_threshold_percent"] == -1.0 and structures[0]["qc_flag"] == "warn"
    assert structures[1]["qc_threshold_percent"] == 1e6
    assert structures[1]["qc_flag"] == ("pass" if structures[1]["cv_percent"] is not None else "warn")
    assert {s["qc_threshold_percent"] for s in structures[2:]} == {50.0}  # the protocol's mean threshold
    # deep14 is calibrated on its own; cerebrum7 is not and falls back to the fine protocol's threshold
    assert qc["Protocols"]["deep14"]["QCThresholdPercent"] == 1e6
    assert qc["Protocols"]["cerebrum7"]["QCThresholdPercent"] == 50.0
    rows = read_morphometry_tsv(out.aseg_morph)
    assert rows[0]["qc_flag"] == "warn"  # the table's flags use the same per-structure thresholds


def test_in_process_run_matches_the_isolated_one(inputs, isolated, tmp_path, monkeypatch):
    local = _run(inputs, tmp_path / "local", monkeypatch, isolate=False)
    for field in ("aseg_dseg", "cerebrum7_dseg", "entropy"):
        np.testing.assert_array_equal(np.asarray(nb.load(getattr(local, field)).dataobj),
                                      np.asarray(nb.load(getattr(isolated, field)).dataobj))


def test_a_broken_checkpoint_is_one_line(inputs, tmp_path, monkeypatch):
    bad = tiny_wholebrain_checkpoint(tmp_path / "bad")
    weights = bad.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.chdir(tmp_path)
    node = WholeBrainSegmentation(t1w_preproc=str(inputs["t1w"]), icv_mask=str(inputs["icv"]),
                                  source_file=str(inputs["raw"]), checkpoints=[str(bad)], mc_samples=1)
    with pytest.raises(RuntimeError, match="whole-brain segmentation failed .*ModelError: .*checksum mismatch"):
        node.run()


def test_labels_are_background_outside_the_icv(inputs, isolated):
    icv = np.asarray(nb.load(str(inputs["icv"])).dataobj) > 0
    for path in (isolated.conformed_aseg_dseg, isolated.conformed_cerebrum7_dseg):
        labels = np.asarray(nb.load(path).dataobj)
        assert labels.shape == icv.shape and (labels[~icv] == 0).all() and (labels[icv] > 0).any()
    assert (np.asarray(nb.load(isolated.conformed_entropy).dataobj)[~icv] == 0).all()


def test_parcellation_mode_writes_only_the_fine_outputs(inputs, tmp_path, monkeypatch):
    from nipype.interfaces.base import isdefined

    ckpt = tiny_parcellation_checkpoint(tmp_path / "tiny-parc")
    out = _run(dict(inputs, ckpt=ckpt), tmp_path / "node", monkeypatch, fine_only=True)
    dkt = load_protocol("dkt-aseg")
    assert out.fine_protocol == "dkt-aseg"
    img = nb.load(out.fine_dseg)
    assert img.shape == inputs["shape"] and np.allclose(img.affine, inputs["affine"])
    assert set(np.unique(np.asarray(img.dataobj))) <= set(dkt.indices)
    conformed = np.asarray(nb.load(out.conformed_fine_dseg).dataobj)
    icv = np.asarray(nb.load(str(inputs["icv"])).dataobj) > 0
    assert (conformed[~icv] == 0).all()
    assert [r["index"] for r in read_morphometry_tsv(out.fine_morph)] == list(dkt.indices[1:])
    with open(out.fine_dseg_tsv) as fh:
        assert len(fh.read().splitlines()) == len(dkt) + 1
    for field in ("aseg_dseg", "cerebrum7_dseg", "aseg_morph", "cerebrum7_morph", "aseg_dseg_tsv", "entropy",
                  "probseg_cerebrum7", "conformed_aseg_dseg", "conformed_entropy"):
        assert not isdefined(getattr(out, field)) or getattr(out, field) == [], field
    written = sorted(p.name for p in (tmp_path / "node" / "segmentation").iterdir())
    assert written == ["conformed_dkt-aseg_dseg.nii.gz", "dkt-aseg_dseg.nii.gz", "dkt-aseg_dseg.tsv",
                       "dkt-aseg_morph.tsv", "qc.json"]
    qc = json.loads(open(out.qc_json).read())
    assert qc["Task"] == "parcellation" and qc["LabelProtocol"] == "dkt-aseg" and qc["MCSamples"] == 3
    assert set(qc["Protocols"]) == {"dkt-aseg", "deep14"}
    assert len(qc["Protocols"]["dkt-aseg"]["Structures"]) == 92 and qc["Models"][0]["Name"] == "tiny-parc"
    assert qc["Models"][0]["Architecture"] == "cerebrum" and out.qc_flag == qc["QCFlag"]


def test_a_fused_parcellation_agrees_with_the_whole_brain_labels(inputs, tmp_path, monkeypatch):
    from bids_app.core.labels import merge_labels

    ckpt = tiny_parcellation_checkpoint(tmp_path / "tiny-parc")
    out = _run(inputs, tmp_path / "node", monkeypatch, parc_checkpoints=[str(ckpt)], refinement="intensity")
    assert out.parc_fine_protocol == "dkt-aseg" and out.fine_protocol == "aseg"
    aseg = np.asarray(nb.load(out.conformed_aseg_dseg).dataobj)
    dkt = np.asarray(nb.load(out.parc_conformed_fine_dseg).dataobj)
    merged = merge_labels(dkt, load_protocol("dkt-aseg"), load_protocol("aseg"))
    # the parcels of a structure cover exactly the voxels the whole-brain labels give it
    assert (merged == aseg).all() and (aseg > 0).any()
    assert nb.load(out.parc_fine_dseg).shape == inputs["shape"]
    qc, parc_qc = (json.loads(open(f).read()) for f in (out.qc_json, out.parc_qc_json))
    for q in (qc, parc_qc):
        assert q["Fusion"]["method"] == "hierarchical" and q["Fusion"]["fine_models"] == ["tiny-parc"]
        assert q["Refinement"] == "intensity"
    assert qc["Task"] == "wholebrain" and parc_qc["Task"] == "parcellation"
    assert parc_qc["Protocols"]["dkt-aseg"]["Structures"] and out.parc_qc_flag == parc_qc["QCFlag"]
    # each ensemble keeps its own MC-dropout QC: the same models alone give the same CVs
    alone = _run(inputs, tmp_path / "alone", monkeypatch, refinement="intensity")
    assert json.loads(open(alone.qc_json).read())["MeanCVPercent"] == qc["MeanCVPercent"]
    assert json.loads(open(alone.qc_json).read())["Fusion"] is None
