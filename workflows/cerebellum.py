"""The cerebellum branch: atlas prior (optional), hemisphere -> lobule cascade ensemble with MC-dropout QC,
and its derivatives.

It attaches to ``anat_preproc_wf.outputnode`` (``cerebellum_crop``: the cerebellum box of the
template-space T1w; ``inverse_transform``: template -> T1w; ``icv_ml``) and to the raw T1w, whose
grid is the native space of ``seg-cerebellum_dseg``. The other outputs stay on the crop grid
(``space-<template>``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.core.morphometry import MORPH_COLUMN_DESCRIPTIONS
from bids_app.interfaces.bids import DerivativesDataSink
from bids_app.interfaces.cerebellum import CerebellumSegmentation
from bids_app.models.cascade import CEREBELLUM_SEG, MASK_DILATION, OUTPUT_PROTOCOL, label_map

from .outputs import _uri
from .segment import _add_sources, model_names

#: fields of the branch's outputnode
CEREBELLUM_OUTPUTS = ("dseg_crop", "probseg_crop", "entropy_crop", "prior_crop", "dseg", "morph", "dseg_tsv",
                      "qc_json", "prior_used", "mean_cv_percent", "qc_flag")
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


def init_cerebellum_wf(*, hemisphere_checkpoints: Sequence[str], lobule_checkpoints: Sequence[str],
                       mc_samples: int = 15, seed: int = 42, omp_nthreads: int = 1, device: str = "auto",
                       use_prior: bool = False, library_dir: str | None = None, n_atlases: int | None = None,
                       prior_reason: str = "", name: str = "cerebellum_wf"):
    """Cerebellar lobules on the crop and in the native T1w space, with MC-dropout QC.

    ``inputnode``: ``cerebellum_crop``, ``inverse_transform``, ``icv_ml``, ``source_file`` (the raw
    T1w), and ``prior_file``/``prior_json``: the atlas prior hook, read when ``use_prior`` and no
    ``library_dir`` is given (the prior then comes from outside the branch). With ``use_prior`` and
    ``library_dir`` the prior is computed here by :class:`bids_app.interfaces.atlas.AtlasPrior`
    (node ``atlas_prior``). Without ``use_prior`` the lobule models take no prior and
    ``prior_reason`` is recorded in the QC JSON. ``outputnode``: :data:`CEREBELLUM_OUTPUTS`
    (``prior_crop`` only with the prior).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["cerebellum_crop", "inverse_transform", "icv_ml",
                                                      "source_file", "prior_file", "prior_json"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(CEREBELLUM_OUTPUTS)), name="outputnode")
    segment = pe.Node(CerebellumSegmentation(hemisphere_checkpoints=[str(c) for c in hemisphere_checkpoints],
                                             lobule_checkpoints=[str(c) for c in lobule_checkpoints],
                                             mc_samples=mc_samples, seed=seed, num_threads=omp_nthreads,
                                             device=device, prior_reason="" if use_prior else prior_reason),
                      name="segment", n_procs=omp_nthreads, mem_gb=3.0)
    wf.connect([
        (inputnode, segment, [("cerebellum_crop", "crop_t1w"), ("inverse_transform", "inverse_transform"),
                              ("icv_ml", "icv_ml"), ("source_file", "source_file")]),
        (segment, outputnode, [(f, f) for f in CEREBELLUM_OUTPUTS if f != "prior_crop"]),
    ])
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
