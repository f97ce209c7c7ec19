"""The cerebellum branch: the CerebellumSegmentation interface, the workflow factories, the command-line
options, and the whole graph on the phantom with tiny random checkpoints (--cerebellum-models)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces.base import isdefined

from bids_app.core.labels import load_protocol
from bids_app.core.morphometry import MORPH_COLUMNS, read_morphometry_tsv
from bids_app.interfaces.cerebellum import CerebellumSegmentation
from bids_app.models.cascade import HEMISPHERES_TASK, LOBULES_TASK
from tests.models.test_cascade import tiny_cerebellum_checkpoint

LOBULES = load_protocol("lobules")


def _write_transform(path: Path, scale: float = 1.0) -> Path:
    import ants

    from bids_app.core.registration import write_transform

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=np.eye(3) * scale,
                                    translation=[0.0, 0.0, 0.0])
    return write_transform(tx, path)


@pytest.fixture(scope="module")
def cer(tmp_path_factory):
    """A 16^3 1 mm crop, a LAS raw T1w on the same voxels, transforms, a prior and tiny checkpoints."""
    root = tmp_path_factory.mktemp("cerebellum")
    shape = (16, 16, 16)
    rng = np.random.default_rng(2)
    grid = np.indices(shape).astype(float)
    r = sum(((g - 7.5) / 6.0) ** 2 for g in grid)
    crop = np.where(r < 1, 0.5 + 0.4 * rng.random(shape), 0.02).astype(np.float32)
    affine = np.array([[1.0, 0, 0, -8.0], [0, 1.0, 0, -70.0], [0, 0, 1.0, -40.0], [0, 0, 0, 1]])
    nb.save(nb.Nifti1Image(crop, affine), str(root / "crop.nii.gz"))
    # the raw T1w: the same voxels stored LAS (x flipped), so nearest neighbour is an exact flip
    las = affine.copy()
    las[0, 0], las[0, 3] = -1.0, affine[0, 3] + shape[0] - 1
    raw = nb.Nifti1Image((crop[::-1] * 1000).astype(np.int16), las)
    raw.set_data_dtype(np.int16)
    nb.save(raw, str(root / "sub-01_T1w.nii.gz"))
    prior = np.random.default_rng(3).gamma(0.5, size=shape + (27,)).astype(np.float32)
    prior /= prior.sum(axis=-1, keepdims=True)
    nb.save(nb.Nifti1Image(prior, affine), str(root / "prior.nii.gz"))
    (root / "prior.json").write_text(json.dumps({"n_atlases": 3, "cases": ["a", "b", "c"]}))
    # a population prior on the crop grid (uint8, as the shipped one is stored) and its sidecar
    population = nb.Nifti1Image(prior[..., ::-1].copy(), affine)
    population.set_data_dtype(np.uint8)
    nb.save(population, str(root / "population.nii.gz"))
    (root / "population.json").write_text(json.dumps({"kind": "population", "protocol": "lobules", "n_cases": 4}))
    models = root / "models"
    return {
        "root": root, "crop": root / "crop.nii.gz", "raw": root / "sub-01_T1w.nii.gz", "shape": shape,
        "affine": affine, "las": las, "identity": _write_transform(root / "identity.mat"),
        "scaled": _write_transform(root / "scaled.mat", 0.9), "prior": root / "prior.nii.gz",
        "prior_json": root / "prior.json", "population": root / "population.nii.gz",
        "hemi": tiny_cerebellum_checkpoint(models / "tiny-hemi", task=HEMISPHERES_TASK, seed=1),
        "hemi2": tiny_cerebellum_checkpoint(models / "tiny-hemi-dpn", task=HEMISPHERES_TASK, arch="dpn",
                                            voxel_size_mm=2.0, seed=2),
        "lob": tiny_cerebellum_checkpoint(models / "tiny-lob", task=LOBULES_TASK, seed=3),
        "lob_prior": tiny_cerebellum_checkpoint(models / "tiny-lob-prior", task=LOBULES_TASK, arch="dpn",
                                                prior=True, seed=4),
        "lob_population": tiny_cerebellum_checkpoint(models / "tiny-lob-population", task=LOBULES_TASK, arch="dpn",
                                                     prior="population", seed=6),
    }


def _run(cer, cwd, monkeypatch, **kwargs):
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    kwargs.setdefault("inverse_transform", str(cer["identity"]))
    kwargs.setdefault("lobule_checkpoints", [str(cer["lob"])])
    node = CerebellumSegmentation(crop_t1w=str(cer["crop"]), source_file=str(cer["raw"]),
                                  hemisphere_checkpoints=[str(cer["hemi"]), str(cer["hemi2"])], mc_samples=2, seed=5,
                                  num_threads=1, device="cpu", icv_ml=1500.0, **kwargs)
    return node.run().outputs


@pytest.fixture(scope="module")
def isolated(cer, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _run(cer, tmp_path_factory.mktemp("isolated"), mp, prior_reason="no cerebellum library given")
    finally:
        mp.undo()


# --------------------------------------------------------------------------- the interface


def test_interface_outputs_on_both_grids(cer, isolated):
    crop_dseg = nb.load(isolated.dseg_crop)
    assert crop_dseg.shape == cer["shape"] and np.allclose(crop_dseg.affine, cer["affine"])
    assert crop_dseg.get_data_dtype() == np.int16
    labels = np.asarray(crop_dseg.dataobj)
    assert set(np.unique(labels)) <= set(LOBULES.indices)
    probseg = nb.load(isolated.probseg_crop)
    assert probseg.shape == cer["shape"] + (27,)
    probs = np.asarray(probseg.dataobj, dtype=np.float32)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(labels, LOBULES.to_labels(probs.argmax(axis=-1)))
    entropy = np.asarray(nb.load(isolated.entropy_crop).dataobj)
    assert entropy.shape == cer["shape"] and entropy.max() <= np.log(27) + 1e-4
    native = nb.load(isolated.dseg)
    assert native.shape == cer["shape"] and np.allclose(native.affine, cer["las"])
    assert native.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(native.dataobj), labels[::-1])  # identity transform, LAS grid


def test_interface_tables_and_qc(cer, isolated):
    with open(isolated.morph) as fh:
        assert fh.readline().rstrip("\n").split("\t") == list(MORPH_COLUMNS)
    rows = read_morphometry_tsv(isolated.morph)
    assert [r["index"] for r in rows] == list(LOBULES.indices[1:])
    labels = np.asarray(nb.load(isolated.dseg_crop).dataobj)
    for row in rows:
        assert row["volume_mm3"] == pytest.approx(float((labels == row["index"]).sum()))
        assert row["qc_flag"] in ("pass", "warn")
    left, right = rows[0], rows[13]  # I-II left / right: the same asymmetry index on both rows
    assert left["asymmetry_index"] == right["asymmetry_index"]
    with open(isolated.dseg_tsv) as fh:
        assert fh.readline().split() == ["index", "name", "abbreviation", "color"]
    qc = json.loads(Path(isolated.qc_json).read_text())
    assert qc["Task"] == "cerebellum" and qc["LabelProtocol"] == "lobules"
    assert qc["MCSamples"] == 2 and qc["Seed"] == 5 and qc["QCFlag"] == isolated.qc_flag
    assert qc["atlas_prior"] == {"used": False, "kind": None, "reason": "no cerebellum library given"}
    assert [m["Task"] for m in qc["Models"]] == [HEMISPHERES_TASK, HEMISPHERES_TASK, LOBULES_TASK]
    assert [m["Name"] for m in qc["Models"]] == ["tiny-hemi", "tiny-hemi-dpn", "tiny-lob"]
    assert len(qc["Protocols"]["lobules"]["Structures"]) == 26
    assert len(qc["Protocols"]["hemispheres"]["Structures"]) == 2
    assert qc["NativeVolumeScale"] == pytest.approx(1.0) and qc["ICVML"] == 1500.0
    assert not isolated.prior_used


def test_in_process_run_with_prior_and_scaled_transform(cer, isolated, tmp_path, monkeypatch):
    out = _run(cer, tmp_path / "local", monkeypatch, inverse_transform=str(cer["scaled"]),
               lobule_checkpoints=[str(cer["lob_prior"])], prior_file=str(cer["prior"]),
               prior_json=str(cer["prior_json"]), isolate=False)
    assert out.prior_used
    qc = json.loads(Path(out.qc_json).read_text())
    assert qc["atlas_prior"]["used"] is True and qc["atlas_prior"]["details"]["n_atlases"] == 3
    # T1w points -> template points shrink by 0.9: a template mm3 is 1 / 0.729 native mm3
    assert qc["NativeVolumeScale"] == pytest.approx(1 / 0.729, rel=1e-4)
    labels = np.asarray(nb.load(out.dseg_crop).dataobj)
    rows = read_morphometry_tsv(out.morph)
    for row in rows:
        assert row["volume_mm3"] == pytest.approx(float((labels == row["index"]).sum()) / 0.729, rel=1e-4)
        assert row["volume_icv_fraction"] == pytest.approx(row["volume_mm3"] / 1.5e6, rel=1e-4)


def test_interface_failure_is_one_line(cer, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="cerebellum segmentation failed.*prior"):
        _run(cer, tmp_path / "fail", monkeypatch, lobule_checkpoints=[str(cer["lob_prior"])])


# --------------------------------------------------------------------------- workflow factories


def _flat(wf):
    return list(wf._create_flat_graph().nodes())


def _connected(wf) -> dict[str, set[str]]:
    connected: dict[str, set[str]] = {}
    for _src, dst, data in wf._create_flat_graph().edges(data=True):
        for _out, field in data["connect"]:
            connected.setdefault(dst.fullname, set()).add(field if isinstance(field, str) else field[0])
    return connected


def _subject_wf(cer, tmp_path, **kwargs):
    from bids_app.bids import AnatInputs
    from bids_app.config import CerebellumConfig, PreprocConfig
    from bids_app.resources import TemplateFiles
    from workflows.base import init_single_subject_wf

    template = TemplateFiles(name="Fake", target=cer["crop"], reference=cer["crop"], brain_mask=cer["crop"])
    config = CerebellumConfig(hemisphere_checkpoints=(cer["hemi"], cer["hemi2"]),
                              lobule_checkpoints=(cer["lob"],), mc_samples=3,
                              prior_reason="no cerebellum library given", **kwargs)
    return init_single_subject_wf(inputs=AnatInputs(subject="01", session=None, t1w=cer["raw"]),
                                  bids_dir=cer["root"], output_dir=tmp_path / "out", template=template,
                                  preproc=PreprocConfig(), omp_nthreads=2, random_seed=7, cerebellum=config,
                                  device="cpu", name="sub_01_wf")


def test_branch_nodes_parameters_and_connections(cer, tmp_path):
    wf = _subject_wf(cer, tmp_path)
    segment = wf.get_node("cerebellum_wf.segment")
    assert segment.inputs.hemisphere_checkpoints == [str(cer["hemi"]), str(cer["hemi2"])]
    assert segment.inputs.lobule_checkpoints == [str(cer["lob"])]
    assert (segment.inputs.mc_samples, segment.inputs.seed, segment.inputs.num_threads) == (3, 7, 2)
    assert segment.inputs.device == "cpu" and segment.n_procs == 2
    assert segment.inputs.prior_reason == "no cerebellum library given"
    connected = _connected(wf)
    assert connected["sub_01_wf.cerebellum_wf.segment"] == {"crop_t1w", "inverse_transform", "icv_ml", "source_file"}
    assert wf.get_node("cerebellum_wf.atlas_prior") is None
    sinks = {n.fullname.rsplit(".", 1)[1]: n for n in _flat(wf)
             if n.fullname.startswith("sub_01_wf.cerebellum_derivatives_wf.ds_")}
    assert set(sinks) == {"ds_dseg_crop", "ds_probseg_crop", "ds_entropy_crop", "ds_dseg", "ds_morph", "ds_qc",
                          "ds_dseg_tsv"}
    assert sinks["ds_dseg_crop"].inputs.entities == {"space": "Fake", "segmentation": "cerebellum", "suffix": "dseg"}
    assert sinks["ds_dseg"].inputs.entities == {"segmentation": "cerebellum", "suffix": "dseg"}
    assert sinks["ds_entropy_crop"].inputs.entities["desc"] == "entropy"
    meta = sinks["ds_probseg_crop"].inputs.meta_dict
    assert meta["LabelMap"]["0"] == "background" and meta["LabelMap"]["113"] == "Right-Cerebellum-White-Matter"
    assert list(meta["LabelMap"]) == [str(v) for v in meta["LabelValues"]]
    assert meta["LabelValues"][14] == 101 and meta["Models"] == ["tiny-hemi", "tiny-hemi-dpn", "tiny-lob"]
    assert sinks["ds_dseg_tsv"].inputs.out_file == str(tmp_path / "out" / "seg-cerebellum_dseg.tsv")
    from workflows.cerebellum import REPORTS_MODULE, module_available

    if module_available(REPORTS_MODULE):  # the reportlets read the crop, the labels, the entropy and the tables
        assert {"in_file", "dseg"} <= connected["sub_01_wf.cerebellum_reports_wf.lobules_rpt"]
        assert {"morph_tsv", "qc_json"} <= connected["sub_01_wf.cerebellum_reports_wf.volumes_rpt"]
        assert "in_file" in connected["sub_01_wf.cerebellum_reports_wf.uncertainty_rpt"]
    missing = [f"{node.fullname}.{field}" for node in _flat(wf) for field in node.inputs.copyable_trait_names()
               if node.inputs.trait(field).mandatory and not isdefined(getattr(node.inputs, field))
               and field not in connected.get(node.fullname, set())]
    assert missing == []


def test_library_adds_the_atlas_prior_node(cer, tmp_path):
    from bids_app.atlas_library import write_synthetic_library

    library = write_synthetic_library(tmp_path / "library", subjects=1, shape=(8, 8, 8), mirrored=False)
    wf = _subject_wf(cer, tmp_path, use_prior=True, library_dir=library, n_atlases=2)
    atlas = wf.get_node("cerebellum_wf.atlas_prior")
    assert atlas.inputs.library_dir == str(library) and atlas.inputs.n_atlases == 2
    assert (atlas.inputs.num_threads, atlas.inputs.random_seed) == (2, 7)
    connected = _connected(wf)
    assert connected["sub_01_wf.cerebellum_wf.atlas_prior"] == {"in_file"}
    assert {"prior_file", "prior_json"} <= connected["sub_01_wf.cerebellum_wf.segment"]
    assert wf.get_node("cerebellum_wf.segment").inputs.prior_reason == ""
    assert "in_file" in connected["sub_01_wf.cerebellum_derivatives_wf.ds_prior_crop"]


def test_prior_hook_and_prior_sink(cer, tmp_path):
    from workflows.cerebellum import init_cerebellum_derivatives_wf, init_cerebellum_wf

    wf = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])], lobule_checkpoints=[str(cer["lob_prior"])],
                            use_prior=True)
    connected = _connected(wf)
    assert {"prior_file", "prior_json"} <= connected["cerebellum_wf.segment"]
    plain = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])], lobule_checkpoints=[str(cer["lob"])])
    assert "prior_file" not in _connected(plain)["cerebellum_wf.segment"]
    der = init_cerebellum_derivatives_wf(output_dir=str(tmp_path), source_file=str(cer["raw"]), source_uri="bids:raw:x",
                                         template="MNI152NLin6Asym", prior_used=True)
    ds = der.get_node("ds_prior_crop")
    assert ds.inputs.entities == {"space": "MNI152NLin6Asym", "segmentation": "cerebellum", "desc": "prior",
                                  "suffix": "probseg"}
    assert len(ds.inputs.meta_dict["LabelMap"]) == 27


def test_population_prior_feeds_the_models_and_the_qc_without_a_derivative(cer, tmp_path):
    """No library: the population prior (one file for every subject) is the prior of ``population:`` models; the
    QC JSON and the report say so; it is not written per subject."""
    from nipype.pipeline import engine as pe

    from bids_app.reports.lobules import atlas_prior_line
    from workflows.cerebellum import init_cerebellum_derivatives_wf, init_cerebellum_wf

    cer_wf = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])],
                                lobule_checkpoints=[str(cer["lob_population"])], mc_samples=2, seed=3, device="cpu",
                                prior_reason="no cerebellum library given", population_prior=str(cer["population"]))
    segment = cer_wf.get_node("segment")
    assert segment.inputs.prior_file == str(cer["population"])
    assert segment.inputs.prior_json == str(cer["root"] / "population.json")
    assert segment.inputs.prior_reason == "no cerebellum library given"
    out = tmp_path / "out"
    der_wf = init_cerebellum_derivatives_wf(output_dir=str(out), source_file=str(cer["raw"]), source_uri="bids:raw:x",
                                            template="MNI152NLin6Asym", models=["tiny-hemi", "tiny-lob-population"],
                                            mc_samples=2, prior_used=False)
    wf = pe.Workflow(name="population_test", base_dir=str(tmp_path / "work"))
    fields = ["dseg_crop", "probseg_crop", "entropy_crop", "dseg", "morph", "dseg_tsv", "qc_json"]
    wf.connect([(cer_wf, der_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])])
    node = wf.get_node("cerebellum_wf.inputnode")
    node.inputs.cerebellum_crop = str(cer["crop"])
    node.inputs.source_file = str(cer["raw"])
    node.inputs.inverse_transform = str(cer["identity"])
    node.inputs.icv_ml = 1200.0
    wf.run()
    qc = json.loads(next(out.rglob("*_seg-cerebellum_qc.json")).read_text())
    prior = qc["atlas_prior"]
    assert prior["used"] is True and prior["kind"] == "population"
    assert prior["reason"] == "no cerebellum library given" and prior["details"]["n_cases"] == 4
    assert "the population prior (a probabilistic atlas of 4 library cases" in atlas_prior_line(qc)
    assert not list(out.rglob("*desc-prior_probseg*"))


def test_a_prior_off_the_crop_grid_is_refused(cer, tmp_path, monkeypatch):
    shifted = nb.load(str(cer["population"]))
    moved = shifted.affine.copy()
    moved[0, 3] += 2.0
    nb.save(nb.Nifti1Image(np.asarray(shifted.dataobj, np.float32), moved), str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(Exception, match="not on the crop's grid"):
        _run(cer, tmp_path / "shifted", monkeypatch, lobule_checkpoints=[str(cer["lob_population"])],
             prior_file=str(tmp_path / "shifted.nii.gz"), isolate=False)


def test_threads_and_device_do_not_change_the_hash(cer, tmp_path):
    import nipype
    from copy import deepcopy

    from workflows.cerebellum import init_cerebellum_wf

    hashes = set()
    for threads, device in ((1, "cpu"), (4, "auto")):
        wf = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])], lobule_checkpoints=[str(cer["lob"])],
                                omp_nthreads=threads, device=device)
        node = wf.get_node("segment")
        node.inputs.crop_t1w = node.inputs.source_file = str(cer["crop"])
        node.inputs.inverse_transform = str(cer["identity"])
        node.config = deepcopy(nipype.config._sections)
        hashes.add(node._get_hashval()[1])
    assert len(hashes) == 1


def test_branch_with_the_atlas_prior_runs(cer, tmp_path):
    """AtlasPrior -> cascade with prior channels -> derivatives (with the prior's probseg), on a synthetic library."""
    import shutil

    from nipype.pipeline import engine as pe

    from bids_app.atlas_library import write_synthetic_library
    from workflows.cerebellum import init_cerebellum_derivatives_wf, init_cerebellum_wf

    library = write_synthetic_library(tmp_path / "library", subjects=2, shape=(16, 16, 16), mirrored=False)
    source = tmp_path / "raw" / "sub-01_T1w.nii.gz"
    source.parent.mkdir()
    shutil.copy(library / "synth-00_T1w.nii.gz", source)  # the crop is on the library grid
    cer_wf = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])], lobule_checkpoints=[str(cer["lob_prior"])],
                                mc_samples=2, seed=3, device="cpu", use_prior=True, library_dir=str(library),
                                n_atlases=1)
    out = tmp_path / "out"
    der_wf = init_cerebellum_derivatives_wf(output_dir=str(out), source_file=str(source), source_uri="bids:raw:x",
                                            template="MNI152NLin6Asym", models=["tiny-hemi", "tiny-lob-prior"],
                                            mc_samples=2, prior_used=True)
    wf = pe.Workflow(name="prior_test", base_dir=str(tmp_path / "work"))
    fields = ["dseg_crop", "probseg_crop", "entropy_crop", "dseg", "morph", "dseg_tsv", "qc_json", "prior_crop"]
    wf.connect([(cer_wf, der_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])])
    node = wf.get_node("cerebellum_wf.inputnode")
    node.inputs.cerebellum_crop = node.inputs.source_file = str(source)
    node.inputs.inverse_transform = str(cer["identity"])
    node.inputs.icv_ml = 1200.0
    assert wf.get_node("cerebellum_wf.atlas_prior").inputs.n_atlases == 1
    wf.run(plugin="Linear")
    anat = out / "sub-01" / "anat"
    prior = nb.load(str(anat / "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-prior_probseg.nii.gz"))
    assert prior.shape == (16, 16, 16, 27)
    sidecar = json.loads((anat / "sub-01_space-MNI152NLin6Asym_seg-cerebellum_desc-prior_probseg.json").read_text())
    assert len(sidecar["LabelMap"]) == 27 and sidecar["Sources"]
    qc = json.loads((anat / "sub-01_seg-cerebellum_qc.json").read_text())
    assert qc["atlas_prior"]["used"] is True and qc["atlas_prior"]["reason"] == ""
    assert len(qc["atlas_prior"]["details"]["Sources"]) == 1
    assert [m["InputChannels"][1] for m in qc["Models"] if m["Task"] == LOBULES_TASK] == [
        "prior:Cerebellum-Lobule-I-II"]
    for name in ("space-MNI152NLin6Asym_seg-cerebellum_dseg.nii.gz", "seg-cerebellum_dseg.nii.gz",
                 "seg-cerebellum_morph.tsv"):
        assert (anat / f"sub-01_{name}").is_file(), name
    assert (out / "seg-cerebellum_dseg.tsv").is_file()


# --------------------------------------------------------------------------- command line


def _parse(*extra):
    from bids_app.cli.parser import get_parser

    return get_parser().parse_args(["bids", "out", "participant", *map(str, extra)])


def test_options_parse_and_conflict(capsys):
    opts = _parse()
    assert opts.cerebellum_models is None and not opts.no_cerebellum and opts.n_atlases is None
    opts = _parse("--cerebellum-models", "a.json", "b", "--library-dir", "lib", "--n-atlases", "5")
    assert opts.cerebellum_models == [Path("a.json"), Path("b")] and opts.library_dir == Path("lib")
    assert opts.n_atlases == 5
    with pytest.raises(SystemExit):
        _parse("--no-cerebellum", "--cerebellum-models", "a.json")
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("--n-atlases", "0")


def test_library_dir_default_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ARBORSEG_LIBRARY_DIR", str(tmp_path))
    assert _parse().library_dir == tmp_path


def test_run_config(cer, tmp_path, monkeypatch, no_package_models):
    from bids_app.atlas_library import write_synthetic_library
    from bids_app.cli.run import build_config
    from bids_app.errors import ArborSegError
    from bids_app.models.checkpoint import ModelError

    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("ARBORSEG_LIBRARY_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()

    def config(*extra):
        return build_config(_parse(*extra), [])[0].cerebellum

    none = config()  # nothing installed: switched on, skipped, says why
    assert none.enabled and not none.active and "--cerebellum-models" in none.reason
    off = config("--no-cerebellum")
    assert not off.enabled and off.reason == "switched off with --no-cerebellum"
    models = [cer["hemi"], cer["hemi2"], cer["lob"], cer["lob_prior"]]
    cfg = config("--cerebellum-models", *models, "--mc-samples", "2")
    assert cfg.active and cfg.origin == "--cerebellum-models" and cfg.mc_samples == 2
    assert cfg.hemisphere_checkpoints == (cer["hemi"].resolve(), cer["hemi2"].resolve())
    assert cfg.lobule_checkpoints == (cer["lob"].resolve(),) and not cfg.use_prior
    assert "no cerebellum library" in cfg.prior_reason
    library = write_synthetic_library(tmp_path / "library", subjects=1, shape=(8, 8, 8), mirrored=False)
    with_lib = config("--cerebellum-models", *models, "--library-dir", library, "--n-atlases", "4")
    assert with_lib.library_dir == library and with_lib.n_atlases == 4
    assert with_lib.use_prior and with_lib.prior_reason == ""
    assert with_lib.lobule_checkpoints == (cer["lob_prior"].resolve(),)
    monkeypatch.setenv("ARBORSEG_LIBRARY_DIR", str(library))  # the environment names it too
    assert config("--cerebellum-models", *models).use_prior
    monkeypatch.delenv("ARBORSEG_LIBRARY_DIR")
    other = config("--cerebellum-models", *models, "--library-dir", library, "--template", "Other")
    assert not other.use_prior and "MNI152NLin6Asym space" in other.prior_reason
    with pytest.raises(ArborSegError, match="library.json") as exc:
        config("--cerebellum-models", *models, "--library-dir", tmp_path / "bids")
    assert exc.value.exit_code == 4
    with pytest.raises(ModelError, match="--library-dir"):
        config("--cerebellum-models", cer["hemi"], cer["lob_prior"])
    # a lobule model taking the population prior: chosen without a library (the shipped prior, MNI152NLin6Asym)
    from bids_app.models.cascade import POPULATION_PRIOR

    pop = config("--cerebellum-models", *models, cer["lob_population"])
    assert pop.lobule_checkpoints == (cer["lob_population"].resolve(),) and not pop.use_prior
    assert pop.population_prior == POPULATION_PRIOR.resolve() and "no cerebellum library" in pop.prior_reason
    assert config("--cerebellum-models", *models, cer["lob_population"], "--library-dir", library).use_prior
    other_space = config("--cerebellum-models", *models, cer["lob_population"], "--template", "Other")
    assert other_space.population_prior is None and other_space.lobule_checkpoints == (cer["lob"].resolve(),)
    # installed: picked by their manifest's task; only one of the two tasks: skipped with a reason
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(cer["hemi"].parent))
    installed = config()
    assert installed.active and installed.origin == "installed"
    half = tmp_path / "half"
    half.mkdir()
    for suffix in (".json", ".safetensors"):
        (half / f"h{suffix}").write_bytes(cer["hemi"].with_suffix(suffix).read_bytes())
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(half))
    partial = config()
    assert not partial.active and "cerebellum-lobules" in partial.reason
    assert "[cerebellum]" in build_config(_parse(), [])[0].to_toml()


def test_unusable_models_stop_before_any_work(cer, tmp_path, monkeypatch, no_package_models):
    from bids_app.cli.run import main

    monkeypatch.delenv("ARBORSEG_LIBRARY_DIR", raising=False)
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--no-seg",
                 "--cerebellum-models", str(cer["hemi"]), str(cer["lob_prior"])])
    assert code == 4 and not out.exists()


# --------------------------------------------------------------------------- the graph on the phantom


@pytest.mark.e2e
def test_phantom_run_writes_the_cerebellum_derivatives(cer, tmp_path, phantom_templateflow, monkeypatch):
    from bids_app.cli.run import main
    from bids_app.core.phantom import write_demo_dataset

    from tests.conftest import tiny_image_checkpoint

    monkeypatch.delenv("ARBORSEG_LIBRARY_DIR", raising=False)
    bids = write_demo_dataset(tmp_path / "bids", n_subjects=1, voxel_size=3.0, seed=5)
    models = tmp_path / "models"
    image_models = tmp_path / "image-models"  # installed: super-resolution by default, T2 synthesis not needed
    tiny_image_checkpoint(image_models / "phantom-superres", task="superres", seed=6)
    tiny_image_checkpoint(image_models / "phantom-t2synth", task="t2synth", seed=7)
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(image_models))
    ckpts = [tiny_cerebellum_checkpoint(models / "phantom-hemi", task=HEMISPHERES_TASK, voxel_size_mm=2.0, seed=1),
             tiny_cerebellum_checkpoint(models / "phantom-hemi-dpn", task=HEMISPHERES_TASK, arch="dpn",
                                        voxel_size_mm=4.0, seed=2),
             tiny_cerebellum_checkpoint(models / "phantom-lob", task=LOBULES_TASK, voxel_size_mm=2.0, seed=3),
             tiny_cerebellum_checkpoint(models / "phantom-lob-prior", task=LOBULES_TASK, prior=True, seed=4)]
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--template", "ArborSegPhantom",
                 "--templateflow-home", str(phantom_templateflow), "--voxel-size", "3", "--no-denoise", "--nprocs", "2",
                 "--no-seg", "--mc-samples", "2", "--cerebellum-models", *map(str, ckpts)])
    assert code == 0
    anat = out / "sub-phantom01" / "anat"
    stem = "sub-phantom01_"
    space = "space-ArborSegPhantom_seg-cerebellum_"
    crop = nb.load(str(anat / f"{stem}space-ArborSegPhantom_desc-cerebellum_T1w.nii.gz"))
    raw = nb.load(str(bids / "sub-phantom01" / "anat" / "sub-phantom01_T1w.nii.gz"))
    for name, grid in ((f"{space}dseg.nii.gz", crop), (f"{space}probseg.nii.gz", crop),
                       (f"{space}desc-entropy_uncertainty.nii.gz", crop), ("seg-cerebellum_dseg.nii.gz", raw)):
        img = nb.load(str(anat / (stem + name)))
        assert img.shape[:3] == grid.shape[:3] and np.allclose(img.affine, grid.affine), name
        sidecar = json.loads((anat / (stem + name.replace(".nii.gz", ".json"))).read_text())
        assert sidecar["Sources"] and sidecar["MCSamples"] == 2, name
        assert sidecar["Models"] == ["phantom-hemi", "phantom-hemi-dpn", "phantom-lob"], name
    probseg = nb.load(str(anat / f"{stem}{space}probseg.nii.gz"))
    assert probseg.shape[3] == 27
    assert len(json.loads((anat / f"{stem}{space}probseg.json").read_text())["LabelMap"]) == 27
    assert not list(anat.glob("*desc-prior_probseg*"))  # no library: no prior
    native = np.asarray(nb.load(str(anat / f"{stem}seg-cerebellum_dseg.nii.gz")).dataobj)
    assert native.dtype == np.int16 and set(np.unique(native)) <= set(LOBULES.indices)
    rows = read_morphometry_tsv(anat / f"{stem}seg-cerebellum_morph.tsv")
    assert [r["index"] for r in rows] == list(LOBULES.indices[1:])
    assert all(r["volume_icv_fraction"] is not None for r in rows)
    assert "volume_mm3" in json.loads((anat / f"{stem}seg-cerebellum_morph.json").read_text())
    qc = json.loads((anat / f"{stem}seg-cerebellum_qc.json").read_text())
    assert qc["atlas_prior"]["used"] is False and "library" in qc["atlas_prior"]["reason"]
    assert qc["Sources"] and qc["QCFlag"] in ("pass", "warn") and qc["MCSamples"] == 2
    assert qc["VoxelSizeMM"] == [2.0, 2.0, 2.0]
    table = (out / "seg-cerebellum_dseg.tsv").read_text().splitlines()
    assert table[0].split("\t")[:2] == ["index", "name"] and len(table) == 28
    record = json.loads((out / "logs" / "sub-phantom01_record.json").read_text())
    assert record["status"] == "success"
    assert "cerebellum" in {r["stage"] for r in record["runtimes"]}
    from workflows.cerebellum import REPORTS_MODULE, module_available

    # the image stages: the crop super-resolved, the phantom's own T2w registered onto the crop (auto)
    sr = nb.load(str(anat / f"{stem}space-ArborSegPhantom_res-hi_desc-superres_T1w.nii.gz"))
    assert sr.shape == tuple(2 * n for n in crop.shape)
    np.testing.assert_allclose(nb.affines.voxel_sizes(sr.affine), nb.affines.voxel_sizes(crop.affine) / 2)
    t2 = nb.load(str(anat / f"{stem}space-ArborSegPhantom_desc-cerebellum_T2w.nii.gz"))
    assert t2.shape == crop.shape and np.allclose(t2.affine, crop.affine)
    t2_data, crop_data = np.asarray(t2.dataobj), np.asarray(crop.dataobj)
    assert (t2_data[crop_data == 0] == 0).all() and abs(np.percentile(t2_data[crop_data > 0], 99) - 1) < 0.05
    t2_meta = json.loads((anat / f"{stem}space-ArborSegPhantom_desc-cerebellum_T2w.json").read_text())
    assert t2_meta["Sources"][0] == "bids:raw:sub-phantom01/anat/sub-phantom01_T2w.nii.gz"
    assert (anat / f"{stem}from-T2w_to-T1w_mode-image_xfm.mat").is_file()
    assert not list(anat.glob("*desc-synth_T2w*"))
    assert qc["superres"] is True and qc["superres_details"]["model"] == "phantom-superres"
    assert qc["t2"] == "real" and qc["t2_details"]["file"] == "sub-phantom01_T2w.nii.gz"
    assert max(abs(v) for v in qc["t2_details"]["TranslationMM"]) < 6.0  # the phantom's T2w shares its anatomy
    if module_available(REPORTS_MODULE):
        figures = out / "sub-phantom01" / "figures"
        for name in ("space-ArborSegPhantom_seg-cerebellum_dseg.svg", "seg-cerebellum_desc-volumes_dseg.svg",
                     "space-ArborSegPhantom_seg-cerebellum_desc-entropy_uncertainty.svg",
                     "space-ArborSegPhantom_seg-cerebellum_desc-superres_T1w.svg",
                     "space-ArborSegPhantom_seg-cerebellum_desc-t2_T2w.svg"):
            assert (figures / f"sub-phantom01_{name}").is_file(), name
        html = (out / "sub-phantom01.html").read_text()
        assert "T2: the subject&#39;s T2w sub-phantom01_T2w.nii.gz, rigidly registered to the T1w." in html
        assert "Super-resolution: the T1w crop x2" in html


# --------------------------------------------------------------------------- image stages (super-resolution, T2)


@pytest.fixture(scope="module")
def image_models(cer):
    from tests.conftest import tiny_image_checkpoint

    models = cer["root"] / "image-models"
    return {"superres": tiny_image_checkpoint(models / "tiny-superres", task="superres", seed=1),
            "t2synth": tiny_image_checkpoint(models / "tiny-t2synth", task="t2synth", seed=2)}


@pytest.mark.parametrize("mode, has_t2w, synth, expected", [
    ("auto", True, True, "real"), ("auto", False, True, "synthetic"), ("auto", False, False, "none"),
    ("real", True, True, "real"), ("real", False, True, "none"), ("synth", True, True, "synthetic"),
    ("synth", False, False, "none"), ("none", True, True, "none"),
])
def test_t2_source_resolution(mode, has_t2w, synth, expected):
    from bids_app.config import resolve_t2_source

    source, reason = resolve_t2_source(mode, has_t2w=has_t2w, synth_available=synth)
    assert source == expected
    if expected == "none":
        assert reason  # always says why
    if mode == "real" and not has_t2w:
        assert "no T2w" in reason
    with pytest.raises(ValueError, match="unknown T2 mode"):
        resolve_t2_source("t2", has_t2w=True, synth_available=True)


def test_image_options_and_config(cer, image_models, tmp_path, monkeypatch, no_package_models):
    from bids_app.cli.run import build_config

    opts = _parse()
    assert not opts.no_superres and opts.cerebellum_t2 == "auto"
    assert _parse("--no-superres", "--cerebellum-t2", "synth").cerebellum_t2 == "synth"
    with pytest.raises(SystemExit):
        _parse("--cerebellum-t2", "t1")
    monkeypatch.delenv("ARBORSEG_LIBRARY_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()
    models = [cer["hemi"], cer["lob"]]

    def config(*extra):
        return build_config(_parse("--cerebellum-models", *models, *extra), [])[0].cerebellum

    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    bare = config()  # no image model installed: both stages skipped, and why
    assert not bare.superres_active and "no super-resolution model" in bare.superres_reason
    assert bare.t2_source(has_t2w=False)[0] == "none" and bare.t2_source(has_t2w=True)[0] == "real"
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(image_models["superres"].parent))
    cfg = config()
    assert cfg.superres_active and cfg.superres_checkpoint == image_models["superres"].resolve()
    assert cfg.t2synth_checkpoint == image_models["t2synth"].resolve() and cfg.t2_mode == "auto"
    assert cfg.t2_source(has_t2w=False) == ("synthetic", "the subject has no T2w")
    off = config("--no-superres", "--cerebellum-t2", "none")
    assert not off.superres_active and off.superres_reason == "switched off with --no-superres"
    assert off.t2_source(has_t2w=True) == ("none", "switched off with --cerebellum-t2 none")
    assert "t2_mode" in build_config(_parse("--cerebellum-models", *models), [])[0].to_toml()


def _image_subject_wf(cer, image_models, tmp_path, *, t2w=None, **kwargs):
    from bids_app.bids import AnatInputs
    from bids_app.config import CerebellumConfig, PreprocConfig
    from bids_app.resources import TemplateFiles
    from workflows.base import init_single_subject_wf

    template = TemplateFiles(name="Fake", target=cer["crop"], reference=cer["crop"], brain_mask=cer["crop"])
    config = CerebellumConfig(hemisphere_checkpoints=(cer["hemi"],), lobule_checkpoints=(cer["lob"],), mc_samples=3,
                              prior_reason="no cerebellum library given", superres_checkpoint=image_models["superres"],
                              t2synth_checkpoint=image_models["t2synth"], **kwargs)
    return init_single_subject_wf(inputs=AnatInputs(subject="01", session=None, t1w=cer["raw"], t2w=t2w),
                                  bids_dir=cer["root"], output_dir=tmp_path / "out", template=template,
                                  preproc=PreprocConfig(), omp_nthreads=2, random_seed=7, cerebellum=config,
                                  device="cpu", name="sub_01_wf")


def _names(wf) -> set[str]:
    return {n.fullname.removeprefix("sub_01_wf.") for n in _flat(wf)}


def _mandatory_missing(wf) -> list[str]:
    connected = _connected(wf)
    return [f"{node.fullname}.{field}" for node in _flat(wf) for field in node.inputs.copyable_trait_names()
            if node.inputs.trait(field).mandatory and not isdefined(getattr(node.inputs, field))
            and field not in connected.get(node.fullname, set())]


def test_image_stages_are_in_the_graph_by_default(cer, image_models, tmp_path):
    from workflows.cerebellum import REPORTS_MODULE, module_available

    wf = _image_subject_wf(cer, image_models, tmp_path)  # no T2w: auto -> synthetic
    names = _names(wf)
    assert {"cerebellum_wf.superres", "cerebellum_wf.t2_synth", "cerebellum_wf.qc_images"} <= names
    assert "cerebellum_wf.t2_register" not in names
    sr = wf.get_node("cerebellum_wf.superres")
    assert sr.inputs.checkpoint == str(image_models["superres"]) and sr.inputs.device == "cpu"
    assert (sr.inputs.num_threads, sr.n_procs) == (2, 2)
    assert wf.get_node("cerebellum_wf.t2_synth").inputs.checkpoint == str(image_models["t2synth"])
    qc = wf.get_node("cerebellum_wf.qc_images")
    assert qc.inputs.t2_source == "synthetic" and qc.inputs.t2_reason == "the subject has no T2w"
    connected = _connected(wf)
    assert {"qc_json", "superres_json", "t2_json"} <= connected["sub_01_wf.cerebellum_wf.qc_images"]
    sinks = {n.fullname.rsplit(".", 1)[1]: n for n in _flat(wf)
             if n.fullname.startswith("sub_01_wf.cerebellum_image_derivatives_wf.ds_")}
    assert set(sinks) == {"ds_superres", "ds_t2w"}
    assert sinks["ds_superres"].inputs.entities == {"space": "Fake", "res": "hi", "desc": "superres", "suffix": "T1w"}
    assert sinks["ds_t2w"].inputs.entities == {"space": "Fake", "desc": "synth", "suffix": "T2w"}
    assert sinks["ds_superres"].inputs.meta_dict["Model"] == {"Name": "tiny-superres", "Version": "0.0.1",
                                                             "Task": "superres"}
    assert sinks["ds_t2w"].inputs.meta_dict["Model"]["Name"] == "tiny-t2synth"
    if module_available(REPORTS_MODULE):
        assert {"cerebellum_reports_wf.superres_rpt", "cerebellum_reports_wf.t2_rpt"} <= names
        assert {"first", "second", "qc_json"} <= connected["sub_01_wf.cerebellum_reports_wf.superres_rpt"]
    assert _mandatory_missing(wf) == []


def test_the_t2w_weighs_the_atlas_prior(cer, image_models, tmp_path):
    """With a library, the branch's T2w (synthetic here) goes to the atlas prior; without a T2 stage it does not."""
    from bids_app.atlas_library import write_synthetic_library

    library = write_synthetic_library(tmp_path / "library", subjects=1, shape=(8, 8, 8), mirrored=False)
    wf = _image_subject_wf(cer, image_models, tmp_path, use_prior=True, library_dir=library)
    assert _connected(wf)["sub_01_wf.cerebellum_wf.atlas_prior"] == {"in_file", "t2_file"}
    wf = _image_subject_wf(cer, image_models, tmp_path / "none", use_prior=True, library_dir=library,
                           t2_mode="none")
    assert _connected(wf)["sub_01_wf.cerebellum_wf.atlas_prior"] == {"in_file"}


def test_auto_registers_the_real_t2w(cer, image_models, tmp_path):
    t2w = cer["root"] / "sub-01_T2w.nii.gz"
    t2w.write_bytes(cer["raw"].read_bytes())
    wf = _image_subject_wf(cer, image_models, tmp_path, t2w=t2w)
    names = _names(wf)
    assert "cerebellum_wf.t2_register" in names and "cerebellum_wf.t2_synth" not in names
    reg = wf.get_node("cerebellum_wf.t2_register")
    assert (reg.inputs.random_seed, reg.inputs.num_threads) == (7, 2)
    assert wf.get_node("cerebellum_wf.inputnode").inputs.t2w == str(t2w)
    connected = _connected(wf)
    assert connected["sub_01_wf.cerebellum_wf.t2_register"] == {"t2w_file", "t1w_file", "crop_file",
                                                                "forward_transform"}
    assert {"forward_transform", "cerebellum_crop"} <= connected["sub_01_wf.cerebellum_wf.inputnode"]
    assert wf.get_node("cerebellum_wf.qc_images").inputs.t2_source == "real"
    sinks = {n.fullname.rsplit(".", 1)[1]: n for n in _flat(wf)
             if n.fullname.startswith("sub_01_wf.cerebellum_image_derivatives_wf.ds_")}
    assert sinks["ds_t2w"].inputs.entities == {"space": "Fake", "desc": "cerebellum", "suffix": "T2w"}
    assert sinks["ds_t2w"].inputs.sources[0] == "bids:raw:sub-01_T2w.nii.gz"
    assert sinks["ds_t2w_xfm"].inputs.entities == {"from": "T2w", "to": "T1w", "mode": "image", "suffix": "xfm"}
    assert _mandatory_missing(wf) == []
    # synth: the synthetic one even with a T2w; real without a T2w: no T2 stage
    assert "cerebellum_wf.t2_synth" in _names(_image_subject_wf(cer, image_models, tmp_path, t2w=t2w,
                                                                t2_mode="synth"))
    assert not {n for n in _names(_image_subject_wf(cer, image_models, tmp_path, t2_mode="real"))
                if n.startswith("cerebellum_wf.t2_")}


def test_switched_off_image_stages_leave_the_graph(cer, image_models, tmp_path):
    wf = _image_subject_wf(cer, image_models, tmp_path, superres=False, t2_mode="none")
    names = _names(wf)
    assert not {n for n in names if n.split(".")[-1] in ("superres", "t2_synth", "t2_register", "superres_rpt",
                                                          "t2_rpt")}
    assert not any(n.startswith("cerebellum_image_derivatives_wf") for n in names)
    qc = wf.get_node("cerebellum_wf.qc_images")
    assert qc.inputs.superres_reason == "switched off with --no-superres"
    assert qc.inputs.t2_source == "none" and qc.inputs.t2_reason == "switched off with --cerebellum-t2 none"
    assert _mandatory_missing(wf) == []


def test_image_qc_merges_the_stages(tmp_path, monkeypatch):
    from workflows.cerebellum import _image_qc

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    qc = tmp_path / "in" / "qc.json"
    qc.write_text(json.dumps({"Task": "cerebellum", "QCFlag": "pass"}))
    sr = tmp_path / "in" / "sr.json"
    sr.write_text(json.dumps({"model": "m-sr", "version": "1.0", "voxel_size_mm": [0.5] * 3, "shape": [4, 4, 4],
                              "seconds": 1.0, "device": "cpu"}))
    t2 = tmp_path / "in" / "t2.json"
    t2.write_text(json.dumps({"source": "real", "file": "sub-01_T2w.nii.gz", "TranslationMM": [1, 2, 3],
                              "RotationDegrees": 1.5}))
    data = json.loads(Path(_image_qc(str(qc), "real", "", "", superres_json=str(sr), t2_json=str(t2))).read_text())
    assert data["QCFlag"] == "pass" and data["superres"] is True and data["t2"] == "real"
    assert data["superres_details"] == {"used": True, "reason": "", "model": "m-sr", "version": "1.0",
                                        "voxel_size_mm": [0.5] * 3, "shape": [4, 4, 4]}
    assert data["t2_details"]["file"] == "sub-01_T2w.nii.gz" and data["t2_details"]["TranslationMM"] == [1, 2, 3]
    off = json.loads(Path(_image_qc(str(qc), "none", "switched off with --cerebellum-t2 none",
                                    "switched off with --no-superres")).read_text())
    assert off["superres"] is False and off["superres_details"]["reason"] == "switched off with --no-superres"
    assert off["t2"] == "none" and off["t2_details"] == {"source": "none",
                                                         "reason": "switched off with --cerebellum-t2 none"}


def test_branch_with_image_stages_runs_and_writes_derivatives(cer, image_models, tmp_path):
    """Cascade + super-resolution + synthetic T2w -> derivatives (names, grids, sidecars) and the QC JSON keys."""
    from nipype.pipeline import engine as pe

    from workflows.cerebellum import (
        CEREBELLUM_DERIVATIVES,
        image_model_info,
        init_cerebellum_derivatives_wf,
        init_cerebellum_image_derivatives_wf,
        init_cerebellum_wf,
    )

    cer_wf = init_cerebellum_wf(hemisphere_checkpoints=[str(cer["hemi"])], lobule_checkpoints=[str(cer["lob"])],
                                mc_samples=2, seed=3, device="cpu", superres=True,
                                superres_checkpoint=str(image_models["superres"]), t2_source="synthetic",
                                t2_reason="the subject has no T2w", t2synth_checkpoint=str(image_models["t2synth"]))
    out = tmp_path / "out"
    der_wf = init_cerebellum_derivatives_wf(output_dir=str(out), source_file=str(cer["raw"]), source_uri="bids:raw:x",
                                            template="MNI152NLin6Asym", mc_samples=2)
    img_wf = init_cerebellum_image_derivatives_wf(
        output_dir=str(out), source_file=str(cer["raw"]), template="MNI152NLin6Asym", superres=True,
        t2_source="synthetic", superres_model=image_model_info(image_models["superres"]),
        t2synth_model=image_model_info(image_models["t2synth"]))
    wf = pe.Workflow(name="image_test", base_dir=str(tmp_path / "work"))
    wf.connect([
        (cer_wf, der_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in CEREBELLUM_DERIVATIVES]),
        (cer_wf, img_wf, [("outputnode.superres_crop", "inputnode.superres_crop"),
                          ("outputnode.t2w_crop", "inputnode.t2w_crop")]),
    ])
    node = cer_wf.get_node("inputnode")
    node.inputs.cerebellum_crop = str(cer["crop"])
    node.inputs.source_file = str(cer["raw"])
    node.inputs.inverse_transform = str(cer["identity"])
    wf.run(plugin="Linear")
    anat = out / "sub-01" / "anat"
    sr = nb.load(str(anat / "sub-01_space-MNI152NLin6Asym_res-hi_desc-superres_T1w.nii.gz"))
    assert sr.shape == tuple(2 * n for n in cer["shape"])
    np.testing.assert_allclose(nb.affines.voxel_sizes(sr.affine), 0.5)
    t2 = nb.load(str(anat / "sub-01_space-MNI152NLin6Asym_desc-synth_T2w.nii.gz"))
    assert t2.shape == cer["shape"] and np.allclose(t2.affine, cer["affine"])
    meta = json.loads((anat / "sub-01_space-MNI152NLin6Asym_res-hi_desc-superres_T1w.json").read_text())
    assert meta["Model"]["Name"] == "tiny-superres" and meta["Description"] and meta["Resolution"].startswith("hi")
    assert meta["Sources"] == ["bids::sub-01/anat/sub-01_space-MNI152NLin6Asym_desc-cerebellum_T1w.nii.gz"]
    meta = json.loads((anat / "sub-01_space-MNI152NLin6Asym_desc-synth_T2w.json").read_text())
    assert meta["Model"]["Version"] == "0.0.1" and "Synthetic T2w" in meta["Description"]
    qc = json.loads((anat / "sub-01_seg-cerebellum_qc.json").read_text())
    assert qc["superres"] is True and qc["superres_details"]["model"] == "tiny-superres"
    assert qc["superres_details"]["voxel_size_mm"] == [0.5, 0.5, 0.5]
    assert qc["t2"] == "synthetic" and qc["t2_details"]["model"] == "tiny-t2synth"
    assert qc["t2_details"]["reason"] == "the subject has no T2w" and qc["Sources"]
    assert qc["Task"] == "cerebellum"  # the cascade's own keys are kept
