"""The cerebellum branch: atlas prior (optional), hemisphere -> lobule cascade ensemble with MC-dropout QC,
and its derivatives.

It attaches to ``anat_preproc_wf.outputnode`` (``cerebellum_crop``: the cerebellum box of the
template-space T1w; ``inverse_transform``: template -> T1w; ``icv_ml``) and to the raw T1w, whose
grid is the native space of ``seg-cerebellum_dseg``. The other outputs stay on the crop grid
(``space-<template>``).

Two image stages sit next to the cascade (they do not feed it): the x2 super-resolution of the crop
(``superres``: 0.5 mm, ``res-hi``) and a T2w on the crop grid (``t2_source``): the subject's own T2w
rigidly registered to the T1w (``"real"``), a T2w synthesised from the T1w crop (``"synthetic"``) or
none. The QC JSON says which (``"superres"``, ``"t2"`` and their ``*_details``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.core.morphometry import MORPH_COLUMN_DESCRIPTIONS
from bids_app.interfaces.bids import DerivativesDataSink
from bids_app.interfaces.cerebellum import CerebellumSegmentation
from bids_app.interfaces.imaging import RealT2w, SuperResolution, T2Synthesis
from bids_app.models.cascade import CEREBELLUM_SEG, MASK_DILATION, OUTPUT_PROTOCOL, label_map

from .outputs import _uri
from .segment import _add_sources, model_names

#: fields of the branch's outputnode
CEREBELLUM_OUTPUTS = ("dseg_crop", "probseg_crop", "entropy_crop", "prior_crop", "dseg", "morph", "dseg_tsv",
                      "qc_json", "prior_used", "mean_cv_percent", "qc_flag")
#: image outputs of the branch (super-resolved crop, T2w on the crop, their summaries, the T2w -> T1w transform)
IMAGE_OUTPUTS = ("superres_crop", "superres_json", "t2w_crop", "t2w_json", "t2w_xfm")
#: where the T2w of the branch comes from
T2_SOURCES = ("real", "synthetic", "none")
#: derivative fields written by :func:`init_cerebellum_derivatives_wf` (``prior_crop`` only with the prior)
CEREBELLUM_DERIVATIVES = ("dseg_crop", "probseg_crop", "entropy_crop", "dseg", "morph", "dseg_tsv", "qc_json")
#: the module of the atlas fusion interface (``AtlasPrior``) and of the cerebellum reportlets
ATLAS_MODULE = "bids_app.interfaces.atlas"
REPORTS_MODULE = "workflows.cerebellum_reports"


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported (the atlas fusion and the cerebellum reportlets are optional)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _image_qc(qc_json, t2_source, t2_reason, superres_reason, superres_json=None, t2_json=None):
    """A copy of the cascade's QC JSON with the image stages: ``superres`` (bool), ``t2`` ("real",
    "synthetic" or "none") and their ``superres_details``/``t2_details`` (model, version or the T2w's
    file name, and why a stage did not run). Runs inside a Function node."""
    import json
    import os

    def read(path):
        with open(path) as fh:
            return json.load(fh)

    data = read(qc_json)
    superres = {"used": superres_json is not None, "reason": "" if superres_json else (superres_reason or "not run")}
    if superres_json:
        summary = read(superres_json)
        # no run times here: the QC JSON is a result, equal across runs (timings are in the node's summary)
        superres.update({k: summary[k] for k in ("model", "version", "voxel_size_mm", "shape") if k in summary})
    t2 = {"source": t2_source, "reason": t2_reason or ""}
    if t2_json:
        summary = read(t2_json)
        keys = (("model", "version") if t2_source == "synthetic" else
                ("file", "Registration", "TranslationMM", "RotationDegrees", "BrainCoverage"))
        t2.update({k: summary[k] for k in keys if k in summary})
    data.update({"superres": superres["used"], "superres_details": superres, "t2": t2_source, "t2_details": t2})
    out = os.path.abspath(os.path.basename(qc_json))
    with open(out, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    return out


def _image_model_node(interface, checkpoint, name: str, omp_nthreads: int, device: str):
    """A node of an image-model stage (super-resolution, T2 synthesis): ``checkpoint`` or the installed model."""
    spec = interface(num_threads=omp_nthreads, device=device)
    if checkpoint:
        spec.inputs.checkpoint = str(checkpoint)
    return pe.Node(spec, name=name, n_procs=omp_nthreads, mem_gb=2.0)


def init_cerebellum_wf(*, hemisphere_checkpoints: Sequence[str], lobule_checkpoints: Sequence[str],
                       mc_samples: int = 15, seed: int = 42, omp_nthreads: int = 1, device: str = "auto",
                       use_prior: bool = False, library_dir: str | None = None, n_atlases: int | None = None,
                       prior_reason: str = "", superres: bool = False, superres_checkpoint: str | None = None,
                       superres_reason: str = "", t2_source: str = "none", t2_reason: str = "",
                       t2synth_checkpoint: str | None = None, population_prior: str | None = None,
                       name: str = "cerebellum_wf"):
    """Cerebellar lobules on the crop and in the native T1w space, with MC-dropout QC; the image stages.

    ``inputnode``: ``cerebellum_crop``, ``inverse_transform``, ``icv_ml``, ``source_file`` (the raw
    T1w), and ``prior_file``/``prior_json``: the atlas prior hook, read when ``use_prior`` and no
    ``library_dir`` is given (the prior then comes from outside the branch). With ``use_prior`` and
    ``library_dir`` the prior is computed here by :class:`bids_app.interfaces.atlas.AtlasPrior`
    (node ``atlas_prior``). Without ``use_prior`` the lobule models take no prior and
    ``prior_reason`` is recorded in the QC JSON; with ``population_prior`` (the shipped probabilistic atlas,
    for lobule models with ``population:`` channels) that file is their prior, the same for every subject,
    so it is not written as a derivative. ``outputnode``: :data:`CEREBELLUM_OUTPUTS`
    (``prior_crop`` only with the prior) and :data:`IMAGE_OUTPUTS` (those of the stages that run).

    Image stages: ``superres`` adds the node ``superres`` (:class:`SuperResolution`, model
    ``superres_checkpoint``, default: the installed one); ``t2_source="synthetic"`` the node
    ``t2_synth`` (:class:`T2Synthesis`), ``"real"`` the node ``t2_register`` (:class:`RealT2w`, which
    reads ``inputnode.t2w`` and ``inputnode.forward_transform``: T1w -> template). The node
    ``qc_images`` records them (and ``superres_reason``/``t2_reason``) in ``outputnode.qc_json``.
    With a library, the T2w (either source) also goes to ``atlas_prior.t2_file``: the atlas vote then
    weighs T1w and T2w differences (the atlases' T2w synthesised). The super-resolved crop is an
    output only: fusing at 0.5 mm gained 0.0008 lobule Dice over trilinear 0.5 mm for 70 s more
    (``results/image-stages-ablation``), so the segmentation stays on the 1 mm grid.
    """
    if t2_source not in T2_SOURCES:
        raise ValueError(f"t2_source must be one of {', '.join(T2_SOURCES)}, got {t2_source!r}")
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["cerebellum_crop", "inverse_transform", "icv_ml",
                                                      "source_file", "prior_file", "prior_json", "t2w",
                                                      "forward_transform"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(CEREBELLUM_OUTPUTS) + list(IMAGE_OUTPUTS)),
                         name="outputnode")
    segment = pe.Node(CerebellumSegmentation(hemisphere_checkpoints=[str(c) for c in hemisphere_checkpoints],
                                             lobule_checkpoints=[str(c) for c in lobule_checkpoints],
                                             mc_samples=mc_samples, seed=seed, num_threads=omp_nthreads,
                                             device=device, prior_reason="" if use_prior else prior_reason),
                      name="segment", n_procs=omp_nthreads, mem_gb=3.0)
    qc_images = pe.Node(niu.Function(function=_image_qc, input_names=["qc_json", "t2_source", "t2_reason",
                                                                      "superres_reason", "superres_json", "t2_json"],
                                     output_names=["out_file"]), name="qc_images")
    qc_images.inputs.t2_source = t2_source
    qc_images.inputs.t2_reason = t2_reason
    qc_images.inputs.superres_reason = "" if superres else (superres_reason or "switched off")
    wf.connect([
        (inputnode, segment, [("cerebellum_crop", "crop_t1w"), ("inverse_transform", "inverse_transform"),
                              ("icv_ml", "icv_ml"), ("source_file", "source_file")]),
        (segment, outputnode, [(f, f) for f in CEREBELLUM_OUTPUTS if f not in ("prior_crop", "qc_json")]),
        (segment, qc_images, [("qc_json", "qc_json")]),
        (qc_images, outputnode, [("out_file", "qc_json")]),
    ])
    if superres:
        sr_node = _image_model_node(SuperResolution, superres_checkpoint, "superres", omp_nthreads, device)
        wf.connect([
            (inputnode, sr_node, [("cerebellum_crop", "in_file")]),
            (sr_node, outputnode, [("out_file", "superres_crop"), ("out_json", "superres_json")]),
            (sr_node, qc_images, [("out_json", "superres_json")]),
        ])
    if t2_source == "synthetic":
        t2_node = _image_model_node(T2Synthesis, t2synth_checkpoint, "t2_synth", omp_nthreads, device)
        wf.connect(inputnode, "cerebellum_crop", t2_node, "in_file")
    elif t2_source == "real":
        t2_node = pe.Node(RealT2w(random_seed=seed, num_threads=omp_nthreads), name="t2_register",
                          n_procs=omp_nthreads, mem_gb=2.0)
        wf.connect([
            (inputnode, t2_node, [("t2w", "t2w_file"), ("source_file", "t1w_file"), ("cerebellum_crop", "crop_file"),
                                  ("forward_transform", "forward_transform")]),
            (t2_node, outputnode, [("out_transform", "t2w_xfm")]),
        ])
    if t2_source != "none":
        wf.connect([
            (t2_node, outputnode, [("out_file", "t2w_crop"), ("out_json", "t2w_json")]),
            (t2_node, qc_images, [("out_json", "t2_json")]),
        ])
    if population_prior and not use_prior:
        from bids_app.atlas_library import sidecar_path

        segment.inputs.prior_file = str(population_prior)
        segment.inputs.prior_json = str(sidecar_path(population_prior))
        return wf
    if not use_prior:
        return wf
    if library_dir is None:
        wf.connect([
            (inputnode, segment, [("prior_file", "prior_file"), ("prior_json", "prior_json")]),
            (inputnode, outputnode, [("prior_file", "prior_crop")]),
        ])
        return wf
    from bids_app.interfaces.atlas import AtlasPrior

    atlas = AtlasPrior(library_dir=str(library_dir), random_seed=seed, num_threads=omp_nthreads)
    if n_atlases is not None:
        atlas.inputs.n_atlases = int(n_atlases)
    atlas_prior = pe.Node(atlas, name="atlas_prior", n_procs=omp_nthreads, mem_gb=2.0)
    wf.connect([
        (inputnode, atlas_prior, [("cerebellum_crop", "in_file")]),
        (atlas_prior, segment, [("out_prior", "prior_file"), ("out_json", "prior_json")]),
        (atlas_prior, outputnode, [("out_prior", "prior_crop")]),
    ])
    if t2_source != "none":  # the T2w also weighs the atlas vote (measured: +0.003 lobule Dice)
        wf.connect(t2_node, "out_file", atlas_prior, "t2_file")
    return wf


def _copy_to(in_file, out_file):
    """Copy ``in_file`` to ``out_file`` atomically (a Function node: imports inside)."""
    from pathlib import Path

    from bids_app.bids import atomic_copy

    return str(atomic_copy(Path(in_file), Path(out_file)))


def init_cerebellum_derivatives_wf(*, output_dir: str, source_file: str, source_uri: str, template: str,
                                   models: Sequence[str] = (), mc_samples: int = 15, prior_used: bool = False,
                                   name: str = "cerebellum_derivatives_wf"):
    """Write the cerebellum derivatives; every sidecar has ``Sources`` and the models.

    Crop grid (``space-<template>``): ``seg-cerebellum_dseg``, ``seg-cerebellum_probseg`` (4D,
    ``LabelMap`` in the sidecar), ``seg-cerebellum_desc-entropy_uncertainty`` and, with the prior,
    ``seg-cerebellum_desc-prior_probseg``. Native T1w grid: ``seg-cerebellum_dseg``. Tables:
    ``seg-cerebellum_morph.tsv``, ``seg-cerebellum_qc.json`` and the top-level ``seg-cerebellum_dseg.tsv``.
    """
    from bids_app.core.labels import load_protocol

    fields = list(CEREBELLUM_DERIVATIVES) + (["prior_crop"] if prior_used else [])
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    seg = CEREBELLUM_SEG
    crop_uri = _uri(source_file, space=template, desc="cerebellum", suffix="T1w", extension=".nii.gz")
    xfm_uri = _uri(source_file, **{"from": template, "to": "T1w", "mode": "image", "suffix": "xfm",
                                   "extension": ".mat"})
    icv_uri = _uri(source_file, label="ICV", suffix="mask", extension=".nii.gz")
    crop_dseg_uri = _uri(source_file, space=template, segmentation=seg, suffix="dseg", extension=".nii.gz")
    dseg_uri = _uri(source_file, segmentation=seg, suffix="dseg", extension=".nii.gz")
    protocol = load_protocol(OUTPUT_PROTOCOL)
    common = {"Models": list(models), "MCSamples": int(mc_samples), "LabelProtocol": OUTPUT_PROTOCOL}
    labels = {"LabelMap": label_map(OUTPUT_PROTOCOL), "LabelValues": [int(i) for i in protocol.indices],
              "ChannelOrder": "4th axis: one volume per label of the lobules protocol, in LabelValues order "
                              "(background first)"}
    cascade = ("cascade of a hemisphere ensemble and a lobule ensemble (DeepCERES-style; the lobule models see the "
               f"T1w masked by the hemisphere models' cerebellum dilated by {MASK_DILATION} voxels"
               + (" and the atlas prior" if prior_used else "") + ")")

    def sink(node_name, entities, sources=(), meta=None):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=entities,
                                           sources=list(sources), meta_dict=meta or {}),
                       name=node_name, run_without_submitting=True)

    ds_dseg_crop = sink("ds_dseg_crop", {"space": template, "segmentation": seg, "suffix": "dseg"}, [crop_uri], dict(
        common, Description=f"Cerebellar lobules (argmax of the MC-dropout mean probabilities of the {cascade}), on "
                            f"the cerebellum crop of the {template} T1w"))
    ds_probseg_crop = sink("ds_probseg_crop", {"space": template, "segmentation": seg, "suffix": "probseg"},
                           [crop_uri], dict(common, **labels, Description=(
                               "Probability of every class of the lobules protocol (one volume each, in LabelMap "
                               "order): P(bg) = P1(bg) + (P1(L) + P1(R)) P2(bg), P(side, lobule) = P1(side) "
                               "P2(lobule), averaged over the MC-dropout samples")))
    ds_entropy = sink("ds_entropy_crop", {"space": template, "segmentation": seg, "desc": "entropy",
                                          "suffix": "uncertainty"}, [crop_uri], dict(
        common, Description="Voxel-wise predictive entropy of the MC-dropout mean probabilities of the cascade",
        Units="nats"))
    ds_dseg = sink("ds_dseg", {"segmentation": seg, "suffix": "dseg"}, [source_uri, crop_dseg_uri, xfm_uri], dict(
        common, Description=f"Cerebellar lobules ({cascade}) on the grid of the raw T1w: the crop labels through the "
                            f"{template} -> T1w affine, nearest neighbour"))
    ds_morph = sink("ds_morph", {"segmentation": seg, "suffix": "morph", "extension": ".tsv"},
                    [crop_dseg_uri, xfm_uri, icv_uri], dict(MORPH_COLUMN_DESCRIPTIONS, Description=(
                        "Volumes of the cerebellar lobules in the native T1w space (crop voxels counted in template "
                        "space, times the volume change of the template -> T1w affine), with the MC-dropout volume "
                        "CV and QC flag of each structure")))
    qc_sources = pe.Node(niu.Function(function=_add_sources, input_names=["in_file", "sources"],
                                      output_names=["out_file"]), name="qc_sources")
    qc_sources.inputs.sources = [dseg_uri, crop_dseg_uri, crop_uri, xfm_uri, source_uri]
    ds_qc = sink("ds_qc", {"segmentation": seg, "suffix": "qc", "extension": ".json"})
    ds_table = pe.Node(niu.Function(function=_copy_to, input_names=["in_file", "out_file"],
                                    output_names=["out_file"]), name="ds_dseg_tsv", run_without_submitting=True,
                       overwrite=True)
    ds_table.inputs.out_file = os.path.join(str(output_dir), f"seg-{seg}_dseg.tsv")
    wf.connect([
        (inputnode, ds_dseg_crop, [("dseg_crop", "in_file")]),
        (inputnode, ds_probseg_crop, [("probseg_crop", "in_file")]),
        (inputnode, ds_entropy, [("entropy_crop", "in_file")]),
        (inputnode, ds_dseg, [("dseg", "in_file")]),
        (inputnode, ds_morph, [("morph", "in_file")]),
        (inputnode, qc_sources, [("qc_json", "in_file")]),
        (qc_sources, ds_qc, [("out_file", "in_file")]),
        (inputnode, ds_table, [("dseg_tsv", "in_file")]),
    ])
    if prior_used:
        ds_prior = sink("ds_prior_crop", {"space": template, "segmentation": seg, "desc": "prior",
                                          "suffix": "probseg"}, [crop_uri], dict(labels, LabelProtocol=OUTPUT_PROTOCOL,
                                                                                 Description=(
            "Subject-specific atlas prior of the cerebellar lobules: the labelled library's atlases registered to "
            "the crop and fused (one volume per class of the lobules protocol, in LabelMap order)")))
        wf.connect(inputnode, "prior_crop", ds_prior, "in_file")
    return wf


def cerebellum_model_names(hemisphere_checkpoints: Sequence[str], lobule_checkpoints: Sequence[str]) -> list[str]:
    """Names of the models of both stages (from their manifests)."""
    return model_names(list(hemisphere_checkpoints)) + model_names(list(lobule_checkpoints))


def image_model_info(checkpoint: str | os.PathLike | None) -> dict:
    """``{"Name", "Version", "Task"}`` of an image model's manifest (read as JSON, no torch); {} without one."""
    import json
    from pathlib import Path

    if not checkpoint:
        return {}
    path = Path(checkpoint)
    if path.suffix != ".json":
        path = path.with_name(path.name.removesuffix(".safetensors") + ".json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"Name": manifest.get("name"), "Version": manifest.get("version"), "Task": manifest.get("task")}


def init_cerebellum_image_derivatives_wf(*, output_dir: str, source_file: str, template: str, superres: bool = False,
                                         t2_source: str = "none", t2w_uri: str | None = None,
                                         superres_model: Mapping | None = None, t2synth_model: Mapping | None = None,
                                         name: str = "cerebellum_image_derivatives_wf"):
    """Write the image derivatives of the cerebellum branch (those of the stages that run), with sidecars
    (``Description``, ``Sources`` and the model's name and version)::

        space-<tpl>_res-hi_desc-superres_T1w.nii.gz     x2 super-resolved crop (0.5 mm)   superres
        space-<tpl>_desc-synth_T2w.nii.gz               synthetic T2w on the crop grid    t2_source="synthetic"
        space-<tpl>_desc-cerebellum_T2w.nii.gz          the subject's T2w on the crop     t2_source="real"
        from-T2w_to-T1w_mode-image_xfm.mat              its rigid registration            t2_source="real"

    ``inputnode``: :data:`IMAGE_OUTPUTS`. ``t2w_uri``: the BIDS URI of the subject's T2w (``"real"``).
    """
    if t2_source not in T2_SOURCES:
        raise ValueError(f"t2_source must be one of {', '.join(T2_SOURCES)}, got {t2_source!r}")
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(IMAGE_OUTPUTS)), name="inputnode")
    crop_uri = _uri(source_file, space=template, desc="cerebellum", suffix="T1w", extension=".nii.gz")
    fwd_uri = _uri(source_file, **{"from": "T1w", "to": template, "mode": "image", "suffix": "xfm",
                                   "extension": ".mat"})
    t2_xfm_uri = _uri(source_file, **{"from": "T2w", "to": "T1w", "mode": "image", "suffix": "xfm",
                                      "extension": ".mat"})

    def sink(node_name, entities, sources, meta):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=entities,
                                           sources=list(sources), meta_dict=meta),
                       name=node_name, run_without_submitting=True)

    def model(info):
        return {"Model": dict(info)} if info else {}

    if superres:
        ds_sr = sink("ds_superres", {"space": template, "res": "hi", "desc": "superres", "suffix": "T1w"}, [crop_uri],
                     dict(model(superres_model), Description=(
                         f"The cerebellum crop of the {template} T1w super-resolved x2 by a residual sub-pixel "
                         "network (trilinear up-sampling plus learnt detail), same field of view; intensities as "
                         "the crop (99th percentile inside the brain = 1, zero outside the brain)"),
                         Resolution="hi: twice the resolution of the crop (0.5 mm for the 1 mm crop)"))
        wf.connect(inputnode, "superres_crop", ds_sr, "in_file")
    if t2_source == "synthetic":
        ds_t2 = sink("ds_t2w", {"space": template, "desc": "synth", "suffix": "T2w"}, [crop_uri],
                     dict(model(t2synth_model), Description=(
                         f"Synthetic T2w predicted from the T1w cerebellum crop ({template}) by a U-Net: not an "
                         "acquired image; in units of the T2w's 99th percentile inside the brain, zero outside the "
                         "brain")))
        wf.connect(inputnode, "t2w_crop", ds_t2, "in_file")
    elif t2_source == "real":
        ds_t2 = sink("ds_t2w", {"space": template, "desc": "cerebellum", "suffix": "T2w"},
                     [u for u in (t2w_uri, t2_xfm_uri, fwd_uri, crop_uri) if u], dict(
                         Description=(f"The subject's T2w rigidly registered to the T1w (ANTs, Mattes mutual "
                                      f"information) and resampled once onto the cerebellum crop of the {template} "
                                      "T1w through the T1w -> template affine; zero outside the brain of the crop, "
                                      "99th percentile inside it = 1"),
                         Registration={"Type": "rigid", "Software": "ANTs", "Metric": "Mattes mutual information",
                                       "Target": "raw T1w"}))
        ds_xfm = sink("ds_t2w_xfm", {"from": "T2w", "to": "T1w", "mode": "image", "suffix": "xfm"},
                      [u for u in (t2w_uri,) if u],
                      {"Type": "rigid", "Software": "ANTs", "Format": "ITK MatlabTransformIO"})
        wf.connect([
            (inputnode, ds_t2, [("t2w_crop", "in_file")]),
            (inputnode, ds_xfm, [("t2w_xfm", "in_file")]),
        ])
    return wf
