"""Building the Nipype workflows without running them (workflows/*, bids_app.resources)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces.base import isdefined
from nipype.pipeline import engine as pe

from bids_app.bids import AnatInputs
from bids_app.config import PreprocConfig
from bids_app.errors import ResourceError
from bids_app.interfaces.preproc import AffineRegistration, ApplyTransform, Denoise, N4BiasCorrection
from bids_app.resources import TemplateFiles, resolve_template
from workflows import base, outputs, preproc

STAGES = ("conform_wf", "denoise_wf", "n4_wf", "template_registration_wf", "brain_mask_wf", "n4_masked_wf",
          "intensity_normalisation_wf", "template_resampling_wf", "cerebellum_crop_wf")
#: nodes per subject: preprocessing 34 (3 of them denoise; the crop masks with the ICV mask), derivatives 11, reportlets 12, subject inputnode 1
NODES_PER_SUBJECT = 56
DENOISE_NODES = 3


def _tiny(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture()
def env(tmp_path):
    tpl_dir = tmp_path / "tpl-Fake"
    template = TemplateFiles(
        name="Fake",
        target=_tiny(tpl_dir / "tpl-Fake_res-02_T1w.nii.gz"),
        reference=_tiny(tpl_dir / "tpl-Fake_res-01_desc-brain_T1w.nii.gz"),
        brain_mask=_tiny(tpl_dir / "tpl-Fake_res-01_desc-brain_mask.nii.gz"),
    )
    bids_dir = tmp_path / "raw"
    subjects = [
        AnatInputs(subject="01", session=None, t1w=_tiny(bids_dir / "sub-01/anat/sub-01_T1w.nii.gz")),
        AnatInputs(subject="02", session="A",
                   t1w=_tiny(bids_dir / "sub-02/ses-A/anat/sub-02_ses-A_run-1_T1w.nii.gz")),
    ]
    return {"template": template, "bids_dir": bids_dir, "subjects": subjects, "output_dir": tmp_path / "out",
            "work_dir": tmp_path / "work"}


def _build(env, preproc_config=None, **kwargs):
    return base.init_arborseg_wf(subjects=env["subjects"], bids_dir=env["bids_dir"],
                                 output_dir=env["output_dir"], work_dir=env["work_dir"],
                                 template=env["template"], preproc=preproc_config or PreprocConfig(), **kwargs)


def _flat_nodes(wf):
    return list(wf._create_flat_graph().nodes())


def _connected_inputs(wf) -> dict[str, set[str]]:
    graph = wf._create_flat_graph()
    connected: dict[str, set[str]] = {}
    for _src, dst, data in graph.edges(data=True):
        for _out, field in data["connect"]:
            connected.setdefault(dst.fullname, set()).add(field if isinstance(field, str) else field[0])
    return connected


# --------------------------------------------------------------------------- factories
def _factories(env):
    t = env["template"]
    src = str(env["subjects"][1].t1w)
    return {
        "conform_wf": (preproc.init_conform_wf(voxel_size=1.0), True),
        "denoise_wf": (preproc.init_denoise_wf(), True),
        "n4_wf": (preproc.init_n4_wf(masked=False), True),
        "n4_masked_wf": (preproc.init_n4_wf(masked=True, name="n4_masked_wf"), True),
        "template_registration_wf": (preproc.init_template_registration_wf(template_target=str(t.target)), True),
        "brain_mask_wf": (preproc.init_brain_mask_wf(template_mask=str(t.brain_mask)), True),
        "intensity_normalisation_wf": (preproc.init_intensity_normalisation_wf(), True),
        "template_resampling_wf": (preproc.init_template_resampling_wf(template_reference=str(t.reference),
                                                                       template_mask=str(t.brain_mask)), True),
        "cerebellum_crop_wf": (preproc.init_cerebellum_crop_wf(), True),
        "anat_preproc_wf": (preproc.init_anat_preproc_wf(template_target=str(t.target),
                                                         template_reference=str(t.reference),
                                                         template_mask=str(t.brain_mask), preproc=PreprocConfig()),
                            True),
        "anat_derivatives_wf": (outputs.init_anat_derivatives_wf(output_dir=str(env["output_dir"]), source_file=src,
                                                                 source_uri="bids:raw:x", template=t.name), False),
        "anat_reports_wf": (outputs.init_anat_reports_wf(output_dir=str(env["output_dir"]), source_file=src,
                                                         template=t.name, template_reference=str(t.reference),
                                                         template_mask=str(t.brain_mask)), False),
    }


def test_every_factory_returns_a_workflow_with_io_nodes(env):
    for name, (wf, has_outputnode) in _factories(env).items():
        assert isinstance(wf, pe.Workflow), name
        assert wf.name == name
        assert isinstance(wf.get_node("inputnode"), pe.Node), name
        assert (wf.get_node("outputnode") is not None) is has_outputnode, name
        names = [n.fullname for n in _flat_nodes(wf)]
        assert len(names) == len(set(names)), name
        assert len(names) >= 3, name


def test_n4_masked_connects_the_mask(env):
    masked = _connected_inputs(preproc.init_n4_wf(masked=True, name="m"))
    unmasked = _connected_inputs(preproc.init_n4_wf(masked=False, name="u"))
    assert masked["m.n4"] == {"in_file", "mask_file"}
    assert unmasked["u.n4"] == {"in_file"}


# --------------------------------------------------------------------------- the whole graph
def test_arborseg_wf_has_all_stages(env):
    wf = _build(env)
    assert isinstance(wf, pe.Workflow)
    assert wf.base_dir == str(env["work_dir"])
    for subject in ("sub_01_wf", "sub_02_ses_A_wf"):
        sub = wf.get_node(subject)
        assert isinstance(sub, pe.Workflow)
        for part in ("inputnode", "anat_preproc_wf", "anat_derivatives_wf", "anat_reports_wf"):
            assert sub.get_node(part) is not None, part
        for stage in STAGES:
            node = wf.get_node(f"{subject}.anat_preproc_wf.{stage}")
            assert isinstance(node, pe.Workflow), stage
            assert node.get_node("inputnode") is not None and node.get_node("outputnode") is not None
    # the subject inputnode holds the T1w
    assert wf.get_node("sub_02_ses_A_wf.inputnode").inputs.t1w == str(env["subjects"][1].t1w)


def test_node_names_unique_and_count(env):
    wf = _build(env)
    nodes = _flat_nodes(wf)
    names = [n.fullname for n in nodes]
    assert len(names) == len(set(names))
    assert len(nodes) == 2 * NODES_PER_SUBJECT
    assert len(wf.list_node_names()) == len(nodes)


def test_no_denoise(env):
    wf = _build(env, PreprocConfig(denoise=False))
    for subject in ("sub_01_wf", "sub_02_ses_A_wf"):
        assert wf.get_node(f"{subject}.anat_preproc_wf.denoise_wf") is None
        for stage in STAGES:
            if stage != "denoise_wf":
                assert wf.get_node(f"{subject}.anat_preproc_wf.{stage}") is not None
    assert len(_flat_nodes(wf)) == 2 * (NODES_PER_SUBJECT - DENOISE_NODES)
    # the conformed image goes straight to N4
    connected = _connected_inputs(wf)
    assert "in_file" in connected["arborseg_wf.sub_01_wf.anat_preproc_wf.n4_wf.n4"]


def test_mandatory_inputs_are_set_or_connected(env):
    wf = _build(env)
    connected = _connected_inputs(wf)
    missing = []
    for node in _flat_nodes(wf):
        for field in node.inputs.copyable_trait_names():
            trait = node.inputs.trait(field)
            if trait.mandatory and not isdefined(getattr(node.inputs, field)) \
                    and field not in connected.get(node.fullname, set()):
                missing.append(f"{node.fullname}.{field}")
    assert missing == []


def test_parameters_reach_the_nodes(env):
    config = PreprocConfig(voxel_size=1.5, crop_margin_mm=5.0, denoise_patch_radius=2, denoise_search_radius=3,
                           n4_shrink_factor=2, n4_iterations=(10, 5), normalise_percentile=95.0)
    wf = _build(env, config, omp_nthreads=3, random_seed=7)
    pre = "sub_01_wf.anat_preproc_wf"
    conform = wf.get_node(f"{pre}.conform_wf.conform")
    assert (conform.inputs.voxel_size, conform.inputs.crop_margin_mm) == (1.5, 5.0)
    denoise = wf.get_node(f"{pre}.denoise_wf.denoise")
    assert (denoise.inputs.patch_radius, denoise.inputs.search_radius) == (2, 3)
    assert denoise.inputs.num_threads == 3 and denoise.n_procs == 3
    for stage in ("n4_wf", "n4_masked_wf"):
        n4 = wf.get_node(f"{pre}.{stage}.n4")
        assert n4.inputs.shrink_factor == 2 and n4.inputs.iterations == [10, 5]
    register = wf.get_node(f"{pre}.template_registration_wf.register")
    assert register.inputs.random_seed == 7
    assert register.inputs.fixed_file == str(env["template"].target)
    assert wf.get_node(f"{pre}.intensity_normalisation_wf.normalise").inputs.percentile == 95.0
    assert wf.get_node(f"{pre}.brain_mask_wf.map_prior").inputs.in_file == str(env["template"].brain_mask)
    assert wf.get_node(f"{pre}.template_resampling_wf.resample").inputs.reference_file == str(
        env["template"].reference)


def test_single_subject_without_t1w_raises(env):
    with pytest.raises(ValueError, match="no T1w"):
        base.init_single_subject_wf(inputs=AnatInputs(subject="09", session=None, t1w=None),
                                    bids_dir=env["bids_dir"], output_dir=env["output_dir"],
                                    template=env["template"], preproc=PreprocConfig())


def test_write_graph(env, tmp_path, monkeypatch):
    wf = _build(env)
    monkeypatch.chdir(tmp_path)
    dotfile = tmp_path / "graph.dot"
    if shutil.which("dot"):
        wf.write_graph(graph2use="colored", format="svg", dotfilename=str(dotfile))
        assert (tmp_path / "graph.svg").stat().st_size > 0
    else:  # the .dot file is written; rendering needs graphviz
        with pytest.raises(OSError, match="dot"):
            wf.write_graph(graph2use="colored", format="svg", dotfilename=str(dotfile))
    text = dotfile.read_text()
    for stage in STAGES:
        assert f'label="{stage}"' in text
    assert text.count("->") >= len(_flat_nodes(wf)) // 2


# --------------------------------------------------------------------------- num_threads is nohash
@pytest.mark.parametrize("interface", [Denoise, N4BiasCorrection, AffineRegistration, ApplyTransform])
def test_num_threads_does_not_change_the_hash(env, interface):
    f = str(env["template"].target)
    common = {
        Denoise: {"in_file": f},
        N4BiasCorrection: {"in_file": f},
        AffineRegistration: {"moving_file": f, "fixed_file": f},
        ApplyTransform: {"in_file": f, "reference_file": f, "transform_file": f},
    }[interface]
    one = pe.Node(interface(num_threads=1, **common), name="node", n_procs=1)
    many = pe.Node(interface(num_threads=8, **common), name="node", n_procs=8)
    h1 = one.inputs.get_hashval(hash_method="content")[1]
    h8 = many.inputs.get_hashval(hash_method="content")[1]
    assert h1 == h8
    # a hashed parameter does change it (so the comparison above is meaningful)
    changed = pe.Node(interface(num_threads=1, **common), name="node")
    if interface is Denoise:
        changed.inputs.patch_radius = 3
    elif interface is N4BiasCorrection:
        changed.inputs.shrink_factor = 2
    elif interface is AffineRegistration:
        changed.inputs.random_seed = 1
    else:
        changed.inputs.invert = True
    assert changed.inputs.get_hashval(hash_method="content")[1] != h1


def test_num_threads_nohash_in_workflow(env):
    """Rebuilding the whole graph with more threads gives the same node hashes (the cache is reused)."""
    import nipype
    from copy import deepcopy

    h = {}
    for threads in (1, 4):
        wf = _build(env, omp_nthreads=threads)
        node = wf.get_node("sub_01_wf.anat_preproc_wf.template_registration_wf.register")
        node.inputs.moving_file = str(env["subjects"][0].t1w)
        node.config = deepcopy(nipype.config._sections)
        assert node.inputs.num_threads == threads
        h[threads] = node._get_hashval()[1]
    assert h[1] == h[4]


# --------------------------------------------------------------------------- templates
def test_resolve_template_finds_templateflow_names(env, tmp_path, monkeypatch):
    monkeypatch.setenv("ARBORSEG_OFFLINE", "1")
    found = resolve_template("Fake", home=tmp_path, registration_resolution=2)
    assert found == env["template"]
    # via the environment variable too
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    assert resolve_template("Fake") == env["template"]


def test_resolve_template_fallbacks(tmp_path, monkeypatch):
    """Without a res-02 target or a brain-extracted reference, the 1 mm whole-head T1w is used."""
    monkeypatch.setenv("ARBORSEG_OFFLINE", "1")
    folder = tmp_path / "tpl-Fake"
    head = _tiny(folder / "tpl-Fake_res-01_T1w.nii.gz")
    mask = _tiny(folder / "tpl-Fake_res-01_desc-brain_mask.nii.gz")
    found = resolve_template("Fake", home=tmp_path, registration_resolution=2)
    assert (found.target, found.reference, found.brain_mask) == (head, head, mask)


@pytest.mark.parametrize("missing", ["tpl-Fake_res-02_T1w.nii.gz", "tpl-Fake_res-01_desc-brain_mask.nii.gz"])
def test_resolve_template_missing_offline(env, tmp_path, monkeypatch, missing):
    monkeypatch.setenv("ARBORSEG_OFFLINE", "1")
    (tmp_path / "tpl-Fake" / missing).unlink()
    if missing.startswith("tpl-Fake_res-02"):
        # the 1 mm whole-head fallback must not exist either
        assert not (tmp_path / "tpl-Fake" / "tpl-Fake_res-01_T1w.nii.gz").exists()
    with pytest.raises(ResourceError) as exc:
        resolve_template("Fake", home=tmp_path, registration_resolution=2)
    msg = str(exc.value)
    assert "TEMPLATEFLOW_HOME" in msg
    assert missing in msg
    assert str(tmp_path) in msg
    assert exc.value.exit_code == 4


def test_resolve_template_empty_file_counts_as_missing(env, tmp_path, monkeypatch):
    monkeypatch.setenv("ARBORSEG_OFFLINE", "1")
    (tmp_path / "tpl-Fake" / "tpl-Fake_res-01_desc-brain_mask.nii.gz").write_bytes(b"")
    with pytest.raises(ResourceError, match="desc-brain_mask"):
        resolve_template("Fake", home=tmp_path)


# --------------------------------------------------------------------------- whole-brain segmentation
#: nodes of the whole-brain branch per subject for an aseg ensemble: segmentation 3, derivatives 17, reportlets 5
SEG_NODES = 25


def _seg_config(tmp_path, protocol="aseg", **kwargs):
    from bids_app.config import SegmentationConfig
    from tests.conftest import tiny_wholebrain_checkpoint

    ckpt = tiny_wholebrain_checkpoint(tmp_path / f"models-{protocol}" / "tiny", protocol=protocol)
    return SegmentationConfig(checkpoints=(ckpt,), protocol=protocol, mc_samples=4, **kwargs)


def test_wholebrain_branch_nodes_and_parameters(env, tmp_path):
    seg = _seg_config(tmp_path)
    wf = _build(env, segmentation=seg, omp_nthreads=3, random_seed=7, device="cpu")
    nodes = _flat_nodes(wf)
    names = [n.fullname for n in nodes]
    assert len(names) == len(set(names)) == 2 * (NODES_PER_SUBJECT + SEG_NODES)
    for part in ("wholebrain_seg_wf", "wholebrain_seg_derivatives_wf", "wholebrain_seg_reports_wf"):
        assert wf.get_node(f"sub_02_ses_A_wf.{part}") is not None, part
    segment = wf.get_node("sub_01_wf.wholebrain_seg_wf.segment")
    assert segment.inputs.checkpoints == [str(seg.checkpoints[0])]
    assert (segment.inputs.mc_samples, segment.inputs.seed, segment.inputs.num_threads) == (4, 7, 3)
    assert segment.inputs.device == "cpu" and segment.n_procs == 3
    connected = _connected_inputs(wf)
    assert {"t1w_preproc", "icv_mask", "icv_ml", "source_file"} <= connected[
        "arborseg_wf.sub_01_wf.wholebrain_seg_wf.segment"]
    # no fine-protocol sinks for an aseg ensemble (aseg is seg-wholebrain)
    assert wf.get_node("sub_01_wf.wholebrain_seg_derivatives_wf.ds_fine_dseg") is None
    sink = wf.get_node("sub_01_wf.wholebrain_seg_derivatives_wf.ds_aseg_dseg")
    assert sink.inputs.entities == {"segmentation": "wholebrain", "suffix": "dseg"}
    assert sink.inputs.sources[0] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    probs = [wf.get_node(f"sub_01_wf.wholebrain_seg_derivatives_wf.ds_probseg_{a}") for a in
             ("gm", "wm", "csf", "ven", "cer", "bst", "bga")]
    assert [p.inputs.entities["label"] for p in probs] == ["GM", "WM", "CSF", "VEN", "CER", "BST", "BGA"]


def test_wholebrain_branch_mandatory_inputs(env, tmp_path):
    wf = _build(env, segmentation=_seg_config(tmp_path))
    connected = _connected_inputs(wf)
    missing = [f"{node.fullname}.{field}" for node in _flat_nodes(wf)
               for field in node.inputs.copyable_trait_names()
               if node.inputs.trait(field).mandatory and not isdefined(getattr(node.inputs, field))
               and field not in connected.get(node.fullname, set())]
    assert missing == []


def test_wholebrain_branch_dkt_writes_the_fine_protocol(env, tmp_path):
    wf = _build(env, segmentation=_seg_config(tmp_path, protocol="dkt-aseg"))
    assert len(_flat_nodes(wf)) == 2 * (NODES_PER_SUBJECT + SEG_NODES + 3)
    sink = wf.get_node("sub_01_wf.wholebrain_seg_derivatives_wf.ds_fine_dseg")
    assert sink.inputs.entities == {"segmentation": "dkt", "suffix": "dseg"}


def test_wholebrain_branch_off(env, tmp_path):
    from bids_app.config import SegmentationConfig

    for seg in (SegmentationConfig(), SegmentationConfig(enabled=False, checkpoints=_seg_config(tmp_path).checkpoints)):
        assert not seg.active and seg.reason
        assert len(_flat_nodes(_build(env, segmentation=seg))) == 2 * NODES_PER_SUBJECT


def test_wholebrain_threads_and_device_do_not_change_the_hash(env, tmp_path):
    import nipype
    from copy import deepcopy

    seg = _seg_config(tmp_path)
    hashes = set()
    for threads, device in ((1, "cpu"), (4, "auto")):
        wf = _build(env, segmentation=seg, omp_nthreads=threads, device=device)
        node = wf.get_node("sub_01_wf.wholebrain_seg_wf.segment")
        f = str(env["subjects"][0].t1w)
        node.inputs.t1w_preproc = node.inputs.icv_mask = node.inputs.source_file = f
        node.config = deepcopy(nipype.config._sections)
        hashes.add(node._get_hashval()[1])
    assert len(hashes) == 1


# --------------------------------------------------------------------------- cortical parcellation
#: nodes of the parcellation branch per subject: segmentation 3 (only when it runs on its own: beside the
#: whole-brain branch it runs in that branch's node), derivatives 6 (inputnode, dseg, tsv, morph, qc_sources,
#: ds_qc), reportlet 3
PARC_NODES = 12
PARC_SEGMENT_NODES = 3


def _parc_config(tmp_path, **kwargs):
    from bids_app.config import SegmentationConfig
    from tests.conftest import tiny_parcellation_checkpoint

    ckpt = tiny_parcellation_checkpoint(tmp_path / "models-parc" / "tiny-parc")
    return SegmentationConfig(checkpoints=(ckpt,), protocol="dkt-aseg", mc_samples=4, task="parcellation", **kwargs)


def test_parcellation_branch_beside_the_wholebrain_one(env, tmp_path):
    seg, parc = _seg_config(tmp_path), _parc_config(tmp_path)
    wf = _build(env, segmentation=seg, parcellation=parc, omp_nthreads=2, random_seed=7, device="cpu")
    nodes = _flat_nodes(wf)
    names = [n.fullname for n in nodes]
    assert len(names) == len(set(names)) == 2 * (NODES_PER_SUBJECT + SEG_NODES + PARC_NODES - PARC_SEGMENT_NODES)
    # one node runs both ensembles and fuses them (fuse_parcellation)
    assert wf.get_node("sub_01_wf.parcellation_wf") is None
    segment = wf.get_node("sub_01_wf.wholebrain_seg_wf.segment")
    assert segment.inputs.fine_only is False and segment.inputs.parc_checkpoints == [str(parc.checkpoints[0])]
    assert (segment.inputs.mc_samples, segment.inputs.seed, segment.inputs.num_threads) == (4, 7, 2)
    assert segment.mem_gb > 1.0 + 1.5 * 93 * 8e6 * 4 / 1e9  # both ensembles' probabilities
    connected = _connected_inputs(wf)
    assert {"t1w_preproc", "icv_mask", "icv_ml", "source_file"} <= connected[
        "arborseg_wf.sub_01_wf.wholebrain_seg_wf.segment"]
    edges = {(u.fullname, v.fullname) for u, v in wf._create_flat_graph().edges()}
    assert ("arborseg_wf.sub_01_wf.wholebrain_seg_wf.outputnode",
            "arborseg_wf.sub_01_wf.parcellation_derivatives_wf.inputnode") in edges
    # only the fine (seg-dkt) derivatives: no wholebrain/cerebrum7/probseg/entropy duplicates
    sinks = {n.fullname.rsplit(".", 1)[1]: n for n in nodes
             if n.fullname.startswith("arborseg_wf.sub_01_wf.parcellation_derivatives_wf.ds_")}
    assert set(sinks) == {"ds_fine_dseg", "ds_fine_dseg_tsv", "ds_fine_morph", "ds_qc"}
    assert {s.inputs.entities["segmentation"] for s in sinks.values()} == {"dkt"}
    assert sinks["ds_qc"].inputs.entities == {"segmentation": "dkt", "suffix": "qc", "extension": ".json"}
    assert sinks["ds_fine_dseg"].inputs.meta_dict["Models"] == ["tiny-parc"]
    rpt = wf.get_node("sub_01_wf.parcellation_reports_wf.parc_rpt")
    assert rpt.inputs.protocol == "dkt-aseg" and len(rpt.inputs.include) == 62
    assert all(v >= 1000 for v in rpt.inputs.include)
    ds = wf.get_node("sub_01_wf.parcellation_reports_wf.ds_parc_rpt")
    assert ds.inputs.entities == {"datatype": "figures", "extension": ".svg", "segmentation": "dkt", "suffix": "dseg"}
    missing = [f"{node.fullname}.{field}" for node in nodes
               for field in node.inputs.copyable_trait_names()
               if node.inputs.trait(field).mandatory and not isdefined(getattr(node.inputs, field))
               and field not in connected.get(node.fullname, set())]
    assert missing == []


def test_parcellation_alone_and_off(env, tmp_path):
    from bids_app.config import SegmentationConfig

    parc = _parc_config(tmp_path)
    wf = _build(env, parcellation=parc)
    assert len(_flat_nodes(wf)) == 2 * (NODES_PER_SUBJECT + PARC_NODES)
    assert wf.get_node("sub_01_wf.wholebrain_seg_wf") is None
    segment = wf.get_node("sub_01_wf.parcellation_wf.segment")  # its own node, not fused
    assert segment.inputs.fine_only is True and segment.inputs.checkpoints == [str(parc.checkpoints[0])]
    assert {"t1w_preproc", "icv_mask", "icv_ml", "source_file"} <= _connected_inputs(wf)[
        "arborseg_wf.sub_01_wf.parcellation_wf.segment"]
    for off in (SegmentationConfig(task="parcellation"),
                SegmentationConfig(enabled=False, checkpoints=parc.checkpoints, task="parcellation",
                                   switched_off_by="--no-parc")):
        assert not off.active
        assert len(_flat_nodes(_build(env, segmentation=_seg_config(tmp_path), parcellation=off))) == \
            2 * (NODES_PER_SUBJECT + SEG_NODES)
    assert "--parc-models" in SegmentationConfig(task="parcellation").reason
    assert SegmentationConfig(enabled=False, task="parcellation", switched_off_by="--no-parc").reason == \
        "switched off with --no-parc"


def test_fusion_needs_a_parcellation_that_subdivides_the_wholebrain_protocol():
    from bids_app.config import SegmentationConfig

    parc = SegmentationConfig(protocol="dkt-aseg", task="parcellation")
    assert base._can_fuse(SegmentationConfig(protocol="aseg"), parc)
    assert base._can_fuse(SegmentationConfig(protocol="cerebrum7"), parc)  # through aseg
    assert not base._can_fuse(SegmentationConfig(protocol="hemispheres"), parc)
    assert not base._can_fuse(SegmentationConfig(protocol="aseg", mc_samples=parc.mc_samples + 1), parc)
    assert not base._can_fuse(SegmentationConfig(protocol="aseg", tta="flip"), parc)
    assert not base._can_fuse(SegmentationConfig(protocol="aseg", refinement="intensity"), parc)
