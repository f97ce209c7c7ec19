"""The top-level ArborSeg workflow: one anatomical sub-workflow per subject/session."""

from __future__ import annotations

import logging
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.bids import AnatInputs, raw_uri
from bids_app.config import CerebellumConfig, PreprocConfig, SegmentationConfig
from bids_app.core.crop import CEREBELLUM_BOX_MM
from bids_app.resources import TemplateFiles

from .outputs import init_anat_derivatives_wf, init_anat_reports_wf
from .preproc import init_anat_preproc_wf
from .segment import (
    PARC_DERIVATIVES,
    SEG_DERIVATIVES,
    init_parcellation_reports_wf,
    init_wholebrain_seg_derivatives_wf,
    init_wholebrain_seg_reports_wf,
    init_wholebrain_seg_wf,
    model_names,
)

LOGGER = logging.getLogger("arborseg")


def init_single_subject_wf(*, inputs: AnatInputs, bids_dir: Path, output_dir: Path, template: TemplateFiles,
                           preproc: PreprocConfig, omp_nthreads: int = 1, random_seed: int = 42,
                           segmentation: SegmentationConfig | None = None,
                           parcellation: SegmentationConfig | None = None,
                           cerebellum: CerebellumConfig | None = None, device: str = "auto",
                           name: str | None = None):
    """Preprocessing, derivatives and reportlets of one subject (and session).

    The segmentation branches connect to ``anat_preproc_wf.outputnode``; the whole-brain branch
    is added when ``segmentation.active`` and the cortical parcellation branch when
    ``parcellation.active`` (models available and not switched off). Both read the same inputs.
    The cerebellum branch (``cerebellum.active``) reads the cerebellum crop and the transforms.
    """
    if inputs.t1w is None:
        raise ValueError(f"{inputs.label}: no T1w image")
    wf = pe.Workflow(name=name or inputs.workflow_name)
    source_file = str(inputs.t1w)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = source_file

    anat_preproc_wf = init_anat_preproc_wf(
        template_target=str(template.target), template_reference=str(template.reference),
        template_mask=str(template.brain_mask), preproc=preproc, omp_nthreads=omp_nthreads, random_seed=random_seed)
    derivatives_wf = init_anat_derivatives_wf(output_dir=str(output_dir), source_file=source_file,
                                              source_uri=raw_uri(inputs.t1w, bids_dir), template=template.name,
                                              box_mm=CEREBELLUM_BOX_MM)
    reports_wf = init_anat_reports_wf(output_dir=str(output_dir), source_file=source_file, template=template.name,
                                      template_reference=str(template.reference),
                                      template_mask=str(template.brain_mask), box_mm=CEREBELLUM_BOX_MM)
    to_derivatives = ["t1w_preproc", "icv_mask", "brain_mask", "icv_ml", "brain_ml", "forward_transform",
                      "inverse_transform", "t1w_template", "registration_ncc", "cerebellum_crop"]
    to_reports = ["t1w_conformed", "t1w_preproc", "icv_mask", "brain_mask", "t1w_template"]
    wf.connect([
        (inputnode, anat_preproc_wf, [("t1w", "inputnode.t1w")]),
        (anat_preproc_wf, derivatives_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in to_derivatives]),
        (anat_preproc_wf, reports_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in to_reports]),
    ])
    seg_wf = None
    parc_active = parcellation is not None and parcellation.active
    if segmentation is not None and segmentation.active:
        fuse = parc_active and _can_fuse(segmentation, parcellation)
        seg_wf = _add_wholebrain_seg(wf, inputnode, anat_preproc_wf, inputs=inputs, bids_dir=bids_dir,
                                     output_dir=output_dir, segmentation=segmentation, omp_nthreads=omp_nthreads,
                                     random_seed=random_seed, device=device,
                                     parcellation=parcellation if fuse else None)
        seg_wf = seg_wf if fuse else None
    if parc_active:
        _add_parcellation(wf, inputnode, anat_preproc_wf, inputs=inputs, bids_dir=bids_dir, output_dir=output_dir,
                          parcellation=parcellation, omp_nthreads=omp_nthreads, random_seed=random_seed,
                          device=device, fused_in=seg_wf)
    if cerebellum is not None and cerebellum.active:
        _add_cerebellum(wf, inputnode, anat_preproc_wf, inputs=inputs, bids_dir=bids_dir, output_dir=output_dir,
                        template=template.name, cerebellum=cerebellum, omp_nthreads=omp_nthreads,
                        random_seed=random_seed, device=device)
    return wf


def _can_fuse(segmentation: SegmentationConfig, parcellation: SegmentationConfig) -> bool:
    """Whether one node can run and fuse both ensembles: the parcellation's protocol merges into the whole-brain
    one, and both branches have the same MC samples, test-time augmentation and refinement."""
    from bids_app.core.labels import ProtocolError, merge_chain

    settings = [(c.mc_samples, c.tta, c.refinement) for c in (segmentation, parcellation)]
    if settings[0] != settings[1]:
        LOGGER.info("the whole-brain and parcellation branches differ in MC samples, TTA or refinement (%s, %s): "
                    "the two ensembles run apart", *settings)
        return False
    try:
        merge_chain(parcellation.protocol or "dkt-aseg", segmentation.protocol or "aseg")
    except ProtocolError:
        LOGGER.info("the %s parcellation does not subdivide the %s protocol: the two ensembles run apart",
                    parcellation.protocol, segmentation.protocol)
        return False
    return True


def _add_wholebrain_seg(wf, inputnode, anat_preproc_wf, *, inputs: AnatInputs, bids_dir: Path, output_dir: Path,
                        segmentation: SegmentationConfig, omp_nthreads: int, random_seed: int, device: str,
                        parcellation: SegmentationConfig | None = None):
    """The whole-brain segmentation branch; with ``parcellation``, that ensemble runs in the same node and
    the two are fused (README "Cortical parcellation"). Returns the branch's workflow."""
    source_file = str(inputs.t1w)
    checkpoints = [str(c) for c in segmentation.checkpoints]
    parc_checkpoints = [str(c) for c in parcellation.checkpoints] if parcellation is not None else []
    seg_wf = init_wholebrain_seg_wf(checkpoints=checkpoints, mc_samples=segmentation.mc_samples, seed=random_seed,
                                    omp_nthreads=omp_nthreads, device=device, tta=segmentation.tta,
                                    refinement=segmentation.refinement, parc_checkpoints=parc_checkpoints)
    fine = segmentation.protocol or "aseg"
    seg_derivatives_wf = init_wholebrain_seg_derivatives_wf(
        output_dir=str(output_dir), source_file=source_file, source_uri=raw_uri(inputs.t1w, bids_dir),
        fine_protocol=fine, models=model_names(checkpoints), mc_samples=segmentation.mc_samples,
        tta=segmentation.tta, refinement=segmentation.refinement,
        fused_with=model_names(parc_checkpoints) if parc_checkpoints else ())
    seg_reports_wf = init_wholebrain_seg_reports_wf(output_dir=str(output_dir), source_file=source_file)
    derivative_fields = list(SEG_DERIVATIVES)
    if fine in ("aseg", "cerebrum7"):
        derivative_fields = [f for f in derivative_fields if not f.startswith("fine_")]
    wf.connect([
        (inputnode, seg_wf, [("t1w", "inputnode.source_file")]),
        (anat_preproc_wf, seg_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc"),
                                   ("outputnode.icv_mask", "inputnode.icv_mask"),
                                   ("outputnode.icv_ml", "inputnode.icv_ml")]),
        (seg_wf, seg_derivatives_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in derivative_fields]),
        (anat_preproc_wf, seg_reports_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc"),
                                           ("outputnode.icv_mask", "inputnode.icv_mask")]),
        (seg_wf, seg_reports_wf, [("outputnode.conformed_aseg_dseg", "inputnode.conformed_aseg_dseg"),
                                  ("outputnode.conformed_entropy", "inputnode.conformed_entropy")]),
    ])
    return seg_wf


def _add_parcellation(wf, inputnode, anat_preproc_wf, *, inputs: AnatInputs, bids_dir: Path, output_dir: Path,
                      parcellation: SegmentationConfig, omp_nthreads: int, random_seed: int, device: str,
                      fused_in=None) -> None:
    """The cortical parcellation's derivatives and reportlet. ``fused_in``: the whole-brain branch that
    runs it (its ``parc_*`` outputs); else (no whole-brain branch) its own segmentation node with
    ``fine_only`` (only the ``seg-<x>`` outputs)."""
    source_file = str(inputs.t1w)
    checkpoints = [str(c) for c in parcellation.checkpoints]
    protocol = parcellation.protocol or "dkt-aseg"
    if fused_in is not None:
        parc_wf, prefix = fused_in, "outputnode.parc_"
    else:
        parc_wf, prefix = init_wholebrain_seg_wf(
            checkpoints=checkpoints, mc_samples=parcellation.mc_samples, seed=random_seed,
            omp_nthreads=omp_nthreads, device=device, fine_only=True, name="parcellation_wf", tta=parcellation.tta,
            refinement=parcellation.refinement), "outputnode."
        wf.connect([
            (inputnode, parc_wf, [("t1w", "inputnode.source_file")]),
            (anat_preproc_wf, parc_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc"),
                                        ("outputnode.icv_mask", "inputnode.icv_mask"),
                                        ("outputnode.icv_ml", "inputnode.icv_ml")]),
        ])
    parc_derivatives_wf = init_wholebrain_seg_derivatives_wf(
        output_dir=str(output_dir), source_file=source_file, source_uri=raw_uri(inputs.t1w, bids_dir),
        fine_protocol=protocol, models=model_names(checkpoints), mc_samples=parcellation.mc_samples, fine_only=True,
        name="parcellation_derivatives_wf", tta=parcellation.tta,
        refinement=parcellation.refinement,
        fused_with=model_names(fused_in.get_node("segment").inputs.checkpoints) if fused_in is not None else ())
    parc_reports_wf = init_parcellation_reports_wf(output_dir=str(output_dir), source_file=source_file,
                                                   protocol=protocol)
    wf.connect([
        (parc_wf, parc_derivatives_wf, [(f"{prefix}{f}", f"inputnode.{f}") for f in PARC_DERIVATIVES]),
        (anat_preproc_wf, parc_reports_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc")]),
        (parc_wf, parc_reports_wf, [(f"{prefix}conformed_fine_dseg", "inputnode.conformed_fine_dseg")]),
    ])


def _add_cerebellum(wf, inputnode, anat_preproc_wf, *, inputs: AnatInputs, bids_dir: Path, output_dir: Path,
                    template: str, cerebellum: CerebellumConfig, omp_nthreads: int, random_seed: int,
                    device: str) -> None:
    """The cerebellum branch: cascade on the crop (+ atlas prior), derivatives, and reportlets when available."""
    from .cerebellum import (
        CEREBELLUM_DERIVATIVES,
        REPORTS_MODULE,
        cerebellum_model_names,
        image_model_info,
        init_cerebellum_derivatives_wf,
        init_cerebellum_image_derivatives_wf,
        init_cerebellum_wf,
        module_available,
    )

    source_file = str(inputs.t1w)
    hemis = [str(c) for c in cerebellum.hemisphere_checkpoints]
    lobes = [str(c) for c in cerebellum.lobule_checkpoints]
    superres = cerebellum.superres_active
    t2_source, t2_reason = cerebellum.t2_source(has_t2w=inputs.t2w is not None)
    if cerebellum.t2_mode == "real" and t2_source == "none":
        LOGGER.info("%s: no T2w, so no T2 stage in the cerebellum branch (--cerebellum-t2 real)", inputs.label)
    superres_ckpt = str(cerebellum.superres_checkpoint) if cerebellum.superres_checkpoint else None
    t2synth_ckpt = str(cerebellum.t2synth_checkpoint) if cerebellum.t2synth_checkpoint else None
    cer_wf = init_cerebellum_wf(
        hemisphere_checkpoints=hemis, lobule_checkpoints=lobes, mc_samples=cerebellum.mc_samples, seed=random_seed,
        omp_nthreads=omp_nthreads, device=device, use_prior=cerebellum.use_prior,
        library_dir=str(cerebellum.library_dir) if cerebellum.library_dir else None, n_atlases=cerebellum.n_atlases,
        prior_reason=cerebellum.prior_reason,
        population_prior=str(cerebellum.population_prior) if cerebellum.population_prior else None, superres=superres, superres_checkpoint=superres_ckpt,
        superres_reason=cerebellum.superres_reason, t2_source=t2_source, t2_reason=t2_reason,
        t2synth_checkpoint=t2synth_ckpt)
    cer_derivatives_wf = init_cerebellum_derivatives_wf(
        output_dir=str(output_dir), source_file=source_file, source_uri=raw_uri(inputs.t1w, bids_dir),
        template=template, models=cerebellum_model_names(hemis, lobes), mc_samples=cerebellum.mc_samples,
        prior_used=cerebellum.use_prior)
    fields = list(CEREBELLUM_DERIVATIVES) + (["prior_crop"] if cerebellum.use_prior else [])
    wf.connect([
        (inputnode, cer_wf, [("t1w", "inputnode.source_file")]),
        (anat_preproc_wf, cer_wf, [("outputnode.cerebellum_crop", "inputnode.cerebellum_crop"),
                                   ("outputnode.inverse_transform", "inputnode.inverse_transform"),
                                   ("outputnode.icv_ml", "inputnode.icv_ml")]),
        (cer_wf, cer_derivatives_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields]),
    ])
    if t2_source == "real":
        cer_wf.inputs.inputnode.t2w = str(inputs.t2w)
        wf.connect(anat_preproc_wf, "outputnode.forward_transform", cer_wf, "inputnode.forward_transform")
    image_fields = (["superres_crop"] if superres else []) + (["t2w_crop"] if t2_source != "none" else []) + \
        (["t2w_xfm"] if t2_source == "real" else [])
    if image_fields:
        image_derivatives_wf = init_cerebellum_image_derivatives_wf(
            output_dir=str(output_dir), source_file=source_file, template=template, superres=superres,
            t2_source=t2_source, t2w_uri=raw_uri(inputs.t2w, bids_dir) if t2_source == "real" else None,
            superres_model=image_model_info(superres_ckpt), t2synth_model=image_model_info(t2synth_ckpt))
        wf.connect([(cer_wf, image_derivatives_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in image_fields])])
    if module_available(REPORTS_MODULE):
        from .cerebellum_reports import init_cerebellum_reports_wf

        cer_reports_wf = init_cerebellum_reports_wf(output_dir=str(output_dir), source_file=source_file,
                                                    template=template, superres=superres, t2_source=t2_source,
                                                    name="cerebellum_reports_wf")
        wf.connect([
            (anat_preproc_wf, cer_reports_wf, [("outputnode.cerebellum_crop", "inputnode.t1w_crop")]),
            (cer_wf, cer_reports_wf, [("outputnode.dseg_crop", "inputnode.dseg_crop"),
                                      ("outputnode.entropy_crop", "inputnode.uncertainty"),
                                      ("outputnode.morph", "inputnode.morph_tsv"),
                                      ("outputnode.qc_json", "inputnode.qc_json")]),
        ])
        if superres:
            wf.connect(cer_wf, "outputnode.superres_crop", cer_reports_wf, "inputnode.superres_crop")
        if t2_source != "none":
            wf.connect(cer_wf, "outputnode.t2w_crop", cer_reports_wf, "inputnode.t2w_crop")


def init_arborseg_wf(*, subjects: list[AnatInputs], bids_dir: Path, output_dir: Path, work_dir: Path,
                     template: TemplateFiles, preproc: PreprocConfig, omp_nthreads: int = 1,
                     random_seed: int = 42, segmentation: SegmentationConfig | None = None,
                     parcellation: SegmentationConfig | None = None,
                     cerebellum: CerebellumConfig | None = None, device: str = "auto",
                     name: str = "arborseg_wf"):
    """All selected subjects/sessions side by side, cached under ``work_dir``."""
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    for inputs in subjects:
        wf.add_nodes([init_single_subject_wf(inputs=inputs, bids_dir=bids_dir, output_dir=output_dir,
                                             template=template, preproc=preproc, omp_nthreads=omp_nthreads,
                                             random_seed=random_seed, segmentation=segmentation,
                                             parcellation=parcellation, cerebellum=cerebellum,
                                             device=device)])
    return wf
