"""The whole-brain segmentation and cortical parcellation branches: MC-dropout ensembles, their
derivatives and their reportlets.

Both attach to ``anat_preproc_wf.outputnode`` (``t1w_preproc``, ``icv_mask``, ``icv_ml``) and to
the raw T1w, whose grid is the native space of the derivatives. The parcellation branch is the
same segmentation node with ``fine_only=True``: it writes only its own protocol (``seg-dkt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.bids import seg_entity
from bids_app.core.labels import load_protocol
from bids_app.core.morphometry import MORPH_COLUMN_DESCRIPTIONS
from bids_app.interfaces.bids import DerivativesDataSink
from bids_app.interfaces.reports import MapRPT, SegmentationRPT
from bids_app.interfaces.segment import WholeBrainSegmentation
from bids_app.models.segment import read_manifests

from .outputs import _uri

#: fields of the branch's outputnode (and of the derivatives workflow's inputnode)
SEG_OUTPUTS = ("fine_protocol", "fine_dseg", "aseg_dseg", "cerebrum7_dseg", "fine_dseg_tsv", "aseg_dseg_tsv",
               "cerebrum7_dseg_tsv", "probseg_cerebrum7", "entropy", "fine_morph", "aseg_morph", "cerebrum7_morph",
               "qc_json", "conformed_fine_dseg", "conformed_aseg_dseg", "conformed_cerebrum7_dseg",
               "conformed_entropy", "mean_cv_percent", "qc_flag")
#: derivative fields written by :func:`init_wholebrain_seg_derivatives_wf`
SEG_DERIVATIVES = ("fine_dseg", "aseg_dseg", "cerebrum7_dseg", "fine_dseg_tsv", "aseg_dseg_tsv", "cerebrum7_dseg_tsv",
                   "probseg_cerebrum7", "entropy", "fine_morph", "aseg_morph", "cerebrum7_morph", "qc_json")
#: fields of the parcellation branch's outputnode (``fine_only``: its own protocol only)
PARC_OUTPUTS = ("fine_protocol", "fine_dseg", "fine_dseg_tsv", "fine_morph", "qc_json", "conformed_fine_dseg",
                "mean_cv_percent", "qc_flag")
#: derivative fields written by :func:`init_wholebrain_seg_derivatives_wf` with ``fine_only``
PARC_DERIVATIVES = ("fine_dseg", "fine_dseg_tsv", "fine_morph", "qc_json")
#: protocol whose classes get a probseg each
PROBSEG_PROTOCOL = "cerebrum7"


def _memory_gb(checkpoints: Sequence[str], parc_checkpoints: Sequence[str] = ()) -> float:
    """Planned memory of the segmentation node: the fine probabilities of a ~8 M-voxel 1 mm head, x1.5, + 1 GB
    (with a fused parcellation: its probabilities and the whole-brain ensemble's together)."""
    def classes(paths: Sequence[str]) -> int:
        try:
            return max(len(m["label_protocol"]["labels"]) for m in read_manifests(paths))
        except Exception:  # checked before the run; a guess is enough here
            return 40

    n_classes = classes(checkpoints) + (classes(parc_checkpoints) if parc_checkpoints else 0)
    return round(1.0 + 1.5 * n_classes * 8e6 * 4 / 1e9, 1)


def init_wholebrain_seg_wf(*, checkpoints: Sequence[str], mc_samples: int = 15, seed: int = 42,
                           omp_nthreads: int = 1, device: str = "auto", fine_only: bool = False,
                           name: str = "wholebrain_seg_wf", tta: str = "none", refinement: str = "none",
                           parc_checkpoints: Sequence[str] = ()):
    """Whole-brain labels (fine protocol, aseg, CEREBRUM 7) in the native T1w space, with MC-dropout QC.

    ``inputnode``: ``t1w_preproc`` and ``icv_mask`` (conformed T1w space), ``icv_ml``, ``source_file``
    (the raw T1w). ``outputnode``: :data:`SEG_OUTPUTS` (see
    :class:`~bids_app.interfaces.segment.WholeBrainSegmentation`); with ``fine_only`` (the
    cortical parcellation) only :data:`PARC_OUTPUTS`. ``tta``: the test-time augmentation
    (:data:`bids_app.models.segment.TTA_VIEWS`); ``refinement``: the probabilities' refinement
    (:data:`bids_app.core.refinement.REFINEMENTS`). ``parc_checkpoints``: the cortical parcellation
    ensemble runs in the same node, fused with this one
    (:func:`bids_app.models.segment.fuse_parcellation`); the outputnode then also has
    ``parc_<field>`` for every field of :data:`PARC_OUTPUTS`.
    """
    fields = list(PARC_OUTPUTS if fine_only else SEG_OUTPUTS)
    if parc_checkpoints:
        fields += [f"parc_{f}" for f in PARC_OUTPUTS]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "icv_mask", "icv_ml", "source_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    segment = pe.Node(WholeBrainSegmentation(checkpoints=[str(c) for c in checkpoints], mc_samples=mc_samples,
                                             seed=seed, num_threads=omp_nthreads, device=device,
                                             fine_only=fine_only, tta=tta, refinement=refinement,
                                             parc_checkpoints=[str(c) for c in parc_checkpoints]),
                      name="segment", n_procs=omp_nthreads, mem_gb=_memory_gb(checkpoints, parc_checkpoints))
    wf.connect([
        (inputnode, segment, [("t1w_preproc", "t1w_preproc"), ("icv_mask", "icv_mask"), ("icv_ml", "icv_ml"),
                              ("source_file", "source_file")]),
        (segment, outputnode, [(f, f) for f in fields]),
    ])
    return wf


def _pick(items, index):
    """Element ``index`` of a list (a connection function: no closures, imports inside)."""
    return items[index]


def _add_sources(in_file, sources):
    """A copy of a JSON file with ``Sources`` added (runs inside a Function node)."""
    import json
    import os

    with open(in_file) as fh:
        data = json.load(fh)
    data["Sources"] = list(sources)
    out = os.path.abspath(os.path.basename(in_file))
    with open(out, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    return out


def init_wholebrain_seg_derivatives_wf(*, output_dir: str, source_file: str, source_uri: str, fine_protocol: str,
                                       models: Sequence[str] = (), mc_samples: int = 15, fine_only: bool = False,
                                       name: str = "wholebrain_seg_derivatives_wf", tta: str = "none",
                                       refinement: str = "none", fused_with: Sequence[str] = ()):
    """Write the segmentation derivatives (README "Outputs"); every sidecar has ``Sources``.

    ``fine_protocol`` is the models' protocol: its own ``seg-<x>_dseg`` is written only when it is
    not ``aseg`` (which is ``seg-wholebrain``). ``fine_only`` (the cortical parcellation): only the
    fine protocol's ``dseg`` (+ ``.tsv``), ``morph.tsv`` and ``seg-<x>_qc.json``
    (inputnode :data:`PARC_DERIVATIVES`). ``fused_with``: the models of the other ensemble this one
    was fused with (:func:`bids_app.models.segment.fuse_parcellation`), named in the sidecars.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(PARC_DERIVATIVES if fine_only else SEG_DERIVATIVES)),
                        name="inputnode")
    preproc_uri = _uri(source_file, desc="preproc", suffix="T1w", extension=".nii.gz")
    icv_uri = _uri(source_file, label="ICV", suffix="mask", extension=".nii.gz")
    inputs_uris = [source_uri, preproc_uri, icv_uri]

    def sink(node_name, entities, sources=(), meta=None):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=entities,
                                           sources=list(sources), meta_dict=meta or {}),
                       name=node_name, run_without_submitting=True)

    protocols = [] if fine_only else [("aseg", "aseg"), ("cerebrum7", "cerebrum7")]
    if fine_only or fine_protocol not in ("aseg", "cerebrum7"):
        protocols.insert(0, ("fine", fine_protocol))
    what = "Cortical parcellation" if fine_only else "Whole-brain segmentation"
    common = {"Models": list(models), "MCSamples": int(mc_samples), "TestTimeAugmentation": tta,
              "Refinement": refinement if refinement == "none" else (
                  f"{refinement} (skipped when the raw T1w is coarser than the models' grid; the QC JSON's "
                  "Refinement says what ran)"),
              "Space": "the grid of the raw T1w (labels by nearest neighbour from the conformed T1w space)"}
    if fused_with:
        common["FusedWith"] = list(fused_with)
        common["Fusion"] = ("hierarchical: the whole-brain structures' probabilities are the mean of every network of "
                            "both ensembles, and each parcel gets its structure's share (labels agree)")
    dseg_uris = []
    for field, protocol in protocols:
        seg = seg_entity(protocol)
        dseg_uri = _uri(source_file, segmentation=seg, suffix="dseg", extension=".nii.gz")
        dseg_uris.append(dseg_uri)
        ds_dseg = sink(f"ds_{field}_dseg", {"segmentation": seg, "suffix": "dseg"}, inputs_uris, dict(
            common, Description=f"{what}, {protocol} protocol (argmax of the MC-dropout mean probabilities of the "
                                "ensemble; background outside the intracranial mask)", LabelProtocol=protocol))
        ds_tsv = sink(f"ds_{field}_dseg_tsv", {"segmentation": seg, "suffix": "dseg", "extension": ".tsv"})
        ds_morph = sink(f"ds_{field}_morph", {"segmentation": seg, "suffix": "morph", "extension": ".tsv"},
                        [dseg_uri, icv_uri], dict(MORPH_COLUMN_DESCRIPTIONS, Description=(
                            f"Structure volumes of the {protocol} segmentation, counted on the conformed T1w grid, "
                            "with the MC-dropout volume CV and QC flag of each structure")))
        wf.connect([
            (inputnode, ds_dseg, [(f"{field}_dseg", "in_file")]),
            (inputnode, ds_tsv, [(f"{field}_dseg_tsv", "in_file")]),
            (inputnode, ds_morph, [(f"{field}_morph", "in_file")]),
        ])

    qc_sources = pe.Node(niu.Function(function=_add_sources, input_names=["in_file", "sources"],
                                      output_names=["out_file"]), name="qc_sources")
    qc_sources.inputs.sources = dseg_uris + inputs_uris
    ds_qc = sink("ds_qc", {"segmentation": seg_entity(fine_protocol) if fine_only else "wholebrain", "suffix": "qc",
                           "extension": ".json"})
    wf.connect([
        (inputnode, qc_sources, [("qc_json", "in_file")]),
        (qc_sources, ds_qc, [("out_file", "in_file")]),
    ])
    if fine_only:
        return wf

    probseg = load_protocol(PROBSEG_PROTOCOL)
    labels = [(i, a, n) for i, (v, a, n) in enumerate(zip(probseg.indices, probseg.abbreviations, probseg.names))
              if not (i == 0 and v == 0)]
    for position, (_, abbreviation, structure) in enumerate(labels):
        ds_prob = sink(f"ds_probseg_{abbreviation.lower()}",
                       {"segmentation": PROBSEG_PROTOCOL, "label": abbreviation, "suffix": "probseg"}, inputs_uris,
                       dict(common, Description=f"Probability of {structure} (CEREBRUM 7-class protocol: the sum of "
                                                "the fine classes it merges), linear interpolation to the raw grid"))
        wf.connect(inputnode, ("probseg_cerebrum7", _pick, position), ds_prob, "in_file")

    ds_entropy = sink("ds_entropy", {"segmentation": "wholebrain", "desc": "entropy", "suffix": "uncertainty"},
                      inputs_uris, dict(common, Description="Voxel-wise predictive entropy of the MC-dropout mean "
                                                            "softmax of the ensemble, linear interpolation to the "
                                                            "raw grid", Units="nats"))
    wf.connect(inputnode, "entropy", ds_entropy, "in_file")
    return wf


def init_wholebrain_seg_reports_wf(*, output_dir: str, source_file: str, name: str = "wholebrain_seg_reports_wf"):
    """Reportlets: aseg outlines on the preprocessed T1w, and the entropy map."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "icv_mask", "conformed_aseg_dseg",
                                                      "conformed_entropy"]), name="inputnode")

    def sink(node_name, entities):
        ents = {"datatype": "figures", "extension": ".svg"}
        ents.update(entities)
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=ents),
                       name=node_name, run_without_submitting=True)

    seg_rpt = pe.Node(SegmentationRPT(protocol="aseg", title="Whole-brain segmentation (aseg protocol)"),
                      name="seg_rpt")
    entropy_rpt = pe.Node(MapRPT(cmap="inferno", unit="nats", title="Predictive entropy of the MC-dropout ensemble"),
                          name="entropy_rpt")
    ds_seg = sink("ds_seg_rpt", {"segmentation": "wholebrain", "suffix": "dseg"})
    ds_entropy = sink("ds_entropy_rpt", {"segmentation": "wholebrain", "desc": "entropy", "suffix": "uncertainty"})
    wf.connect([
        (inputnode, seg_rpt, [("t1w_preproc", "in_file"), ("conformed_aseg_dseg", "dseg")]),
        (inputnode, entropy_rpt, [("conformed_entropy", "in_file"), ("icv_mask", "bbox_file")]),
        (seg_rpt, ds_seg, [("out_report", "in_file")]),
        (entropy_rpt, ds_entropy, [("out_report", "in_file")]),
    ])
    return wf


def init_parcellation_reports_wf(*, output_dir: str, source_file: str, protocol: str,
                                 name: str = "parcellation_reports_wf"):
    """Reportlet of the cortical parcellation: outlines of the cortical parcels, in the colours of the
    protocol's table, on the preprocessed T1w (``figures/<source>_seg-<x>_dseg.svg``)."""
    from bids_app.core.labels import protocol_families

    prot = load_protocol(protocol)
    cortex = [int(prot.indices[k]) for k in protocol_families(prot).get("cortex", [])]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "conformed_fine_dseg"]), name="inputnode")
    parc_rpt = pe.Node(SegmentationRPT(protocol=protocol, include=cortex,
                                       title=f"Cortical parcellation ({protocol} protocol)"), name="parc_rpt")
    ds_parc = pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities={
        "datatype": "figures", "extension": ".svg", "segmentation": seg_entity(protocol), "suffix": "dseg"}),
        name="ds_parc_rpt", run_without_submitting=True)
    wf.connect([
        (inputnode, parc_rpt, [("t1w_preproc", "in_file"), ("conformed_fine_dseg", "dseg")]),
        (parc_rpt, ds_parc, [("out_report", "in_file")]),
    ])
    return wf


def model_names(checkpoints: Sequence[str | Path]) -> list[str]:
    """Names of the models (from their manifests)."""
    return [str(m.get("name")) for m in read_manifests(checkpoints)]
