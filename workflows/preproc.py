"""Preprocessing stages of the anatomical workflow: one ``init_*_wf`` factory per stage.

Each factory takes explicit keyword arguments, has an ``inputnode`` and an ``outputnode`` and
nodes whose results are cached in the work directory.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.config import PreprocConfig
from bids_app.core.crop import CEREBELLUM_BOX_MM
from bids_app.interfaces.preproc import (
    AffineRegistration,
    ApplyTransform,
    BrainMasks,
    Conform,
    CropBox,
    Denoise,
    N4BiasCorrection,
    NormaliseIntensity,
    RegistrationQuality,
)


def init_conform_wf(*, voxel_size: float = 1.0, crop_margin_mm: float = 10.0, name: str = "conform_wf"):
    """Validate the T1w and resample it to an axis-aligned RAS+ isotropic grid (the "T1w space")."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file", "warnings"]), name="outputnode")
    conform = pe.Node(Conform(voxel_size=voxel_size, crop_margin_mm=crop_margin_mm), name="conform")
    wf.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, outputnode, [("out_file", "out_file"), ("warnings", "warnings")]),
    ])
    return wf


def init_denoise_wf(*, patch_radius: int = 1, search_radius: int = 2, noise_model: str = "Rician",
                    omp_nthreads: int = 1, name: str = "denoise_wf"):
    """Non-local means denoising (Rician model) inside the head."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file"]), name="outputnode")
    denoise = pe.Node(Denoise(patch_radius=patch_radius, search_radius=search_radius, noise_model=noise_model,
                              num_threads=omp_nthreads), name="denoise", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, denoise, [("in_file", "in_file")]),
        (denoise, outputnode, [("out_file", "out_file")]),
    ])
    return wf


def init_n4_wf(*, masked: bool, shrink_factor: int = 4, iterations=(50, 50, 30), spline_distance_mm: float = 100.0,
               convergence: float = 1e-6, omp_nthreads: int = 1, name: str = "n4_wf"):
    """N4 bias-field correction; ``masked=True`` estimates the field inside ``inputnode.mask_file``."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "mask_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file", "bias_file"]), name="outputnode")
    n4 = pe.Node(N4BiasCorrection(shrink_factor=shrink_factor, iterations=list(iterations),
                                  spline_distance_mm=spline_distance_mm, convergence=convergence,
                                  num_threads=omp_nthreads), name="n4", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, n4, [("in_file", "in_file")]),
        (n4, outputnode, [("out_file", "out_file"), ("bias_file", "bias_file")]),
    ])
    if masked:
        wf.connect(inputnode, "mask_file", n4, "mask_file")
    return wf


def init_template_registration_wf(*, template_target: str, random_seed: int = 42, omp_nthreads: int = 1,
                                  name: str = "template_registration_wf"):
    """Affine registration of the bias-corrected T1w to the template's whole-head T1w."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["moving"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["forward_transform", "inverse_transform"]), name="outputnode")
    register = pe.Node(AffineRegistration(fixed_file=template_target, random_seed=random_seed,
                                          num_threads=omp_nthreads), name="register", n_procs=omp_nthreads)
    wf.connect([
        (inputnode, register, [("moving", "moving_file")]),
        (register, outputnode, [("forward_transform", "forward_transform"),
                                ("inverse_transform", "inverse_transform")]),
    ])
    return wf


def init_brain_mask_wf(*, template_mask: str, omp_nthreads: int = 1, name: str = "brain_mask_wf"):
    """Intracranial and brain masks: the template mask mapped back to the subject, then refined."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "inverse_transform"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["icv_mask", "brain_mask", "icv_ml", "brain_ml"]),
                         name="outputnode")
    prior = pe.Node(ApplyTransform(in_file=template_mask, interpolation="linear", num_threads=omp_nthreads),
                    name="map_prior")
    masks = pe.Node(BrainMasks(), name="masks")
    wf.connect([
        (inputnode, prior, [("in_file", "reference_file"), ("inverse_transform", "transform_file")]),
        (inputnode, masks, [("in_file", "in_file")]),
        (prior, masks, [("out_file", "prior_file")]),
        (masks, outputnode, [("icv_mask", "icv_mask"), ("brain_mask", "brain_mask"),
                             ("icv_ml", "icv_ml"), ("brain_ml", "brain_ml")]),
    ])
    return wf


def init_intensity_normalisation_wf(*, percentile: float = 99.0, name: str = "intensity_normalisation_wf"):
    """Scale the bias-corrected T1w so that the ``percentile`` inside the brain is 1.0."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "brain_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file"]), name="outputnode")
    normalise = pe.Node(NormaliseIntensity(percentile=percentile), name="normalise")
    wf.connect([
        (inputnode, normalise, [("in_file", "in_file"), ("brain_mask", "mask_file")]),
        (normalise, outputnode, [("out_file", "out_file")]),
    ])
    return wf


def init_template_resampling_wf(*, template_reference: str, template_mask: str, omp_nthreads: int = 1,
                                name: str = "template_resampling_wf"):
    """The preprocessed T1w on the template's 1 mm grid, and how well it matches the template."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "forward_transform"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file", "ncc"]), name="outputnode")
    resample = pe.Node(ApplyTransform(reference_file=template_reference, interpolation="bSpline",
                                      num_threads=omp_nthreads), name="resample")
    quality = pe.Node(RegistrationQuality(template_file=template_reference, template_mask=template_mask),
                      name="quality")
    wf.connect([
        (inputnode, resample, [("in_file", "in_file"), ("forward_transform", "transform_file")]),
        (resample, quality, [("out_file", "in_file")]),
        (resample, outputnode, [("out_file", "out_file")]),
        (quality, outputnode, [("ncc", "ncc")]),
    ])
    return wf


def init_cerebellum_crop_wf(*, box_mm=CEREBELLUM_BOX_MM, template_reference: str | None = None,
                            omp_nthreads: int = 1, name: str = "cerebellum_crop_wf"):
    """The cerebellum box cut out of the template-space T1w: the input of the cerebellum branch.

    With ``template_reference``, the intracranial mask (``mask_file``, native space) is carried to
    the template through ``forward_transform`` and everything outside it is zeroed, so that the
    branch sees the brain as its networks and library saw it (skull-stripped), whatever the head
    coverage of the scan.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "mask_file", "forward_transform"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file"]), name="outputnode")
    crop = pe.Node(CropBox(box_mm=[list(b) for b in box_mm]), name="crop")
    wf.connect([
        (inputnode, crop, [("in_file", "in_file")]),
        (crop, outputnode, [("out_file", "out_file")]),
    ])
    if template_reference:
        mask = pe.Node(ApplyTransform(reference_file=template_reference, interpolation="nearestNeighbor",
                                      num_threads=omp_nthreads), name="mask_to_template")
        wf.connect([
            (inputnode, mask, [("mask_file", "in_file"), ("forward_transform", "transform_file")]),
            (mask, crop, [("out_file", "mask_file")]),
        ])
    return wf


def init_anat_preproc_wf(*, template_target: str, template_reference: str, template_mask: str,
                         preproc: PreprocConfig, omp_nthreads: int = 1, random_seed: int = 42,
                         name: str = "anat_preproc_wf"):
    """The classical preprocessing chain of DESIGN.md, stage by stage.

    conform -> denoise -> N4 -> affine to template -> ICV/brain masks -> N4 inside the ICV ->
    intensity normalisation -> template-space T1w -> cerebellum crop.

    ``outputnode`` is where the segmentation branches attach: the whole-brain branch reads
    ``t1w_preproc``/``brain_mask``/``icv_mask`` (native T1w space), the cerebellum branch reads
    ``cerebellum_crop`` and the transforms.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "t1w_conformed", "t1w_preproc", "icv_mask", "brain_mask", "icv_ml", "brain_ml", "forward_transform",
        "inverse_transform", "t1w_template", "registration_ncc", "cerebellum_crop", "warnings",
    ]), name="outputnode")

    conform_wf = init_conform_wf(voxel_size=preproc.voxel_size, crop_margin_mm=preproc.crop_margin_mm)
    n4_kwargs = dict(shrink_factor=preproc.n4_shrink_factor, iterations=preproc.n4_iterations,
                     spline_distance_mm=preproc.n4_spline_distance_mm, convergence=preproc.n4_convergence,
                     omp_nthreads=omp_nthreads)
    n4_wf = init_n4_wf(masked=False, name="n4_wf", **n4_kwargs)
    registration_wf = init_template_registration_wf(template_target=template_target, random_seed=random_seed,
                                                    omp_nthreads=omp_nthreads)
    brain_mask_wf = init_brain_mask_wf(template_mask=template_mask, omp_nthreads=omp_nthreads)
    n4_masked_wf = init_n4_wf(masked=True, name="n4_masked_wf", **n4_kwargs)
    normalise_wf = init_intensity_normalisation_wf(percentile=preproc.normalise_percentile)
    resampling_wf = init_template_resampling_wf(template_reference=template_reference, template_mask=template_mask,
                                                omp_nthreads=omp_nthreads)
    crop_wf = init_cerebellum_crop_wf(template_reference=template_reference, omp_nthreads=omp_nthreads)

    wf.connect(inputnode, "t1w", conform_wf, "inputnode.in_file")
    if preproc.denoise:
        denoise_wf = init_denoise_wf(patch_radius=preproc.denoise_patch_radius,
                                     search_radius=preproc.denoise_search_radius,
                                     noise_model=preproc.denoise_noise_model, omp_nthreads=omp_nthreads)
        wf.connect([
            (conform_wf, denoise_wf, [("outputnode.out_file", "inputnode.in_file")]),
            (denoise_wf, n4_wf, [("outputnode.out_file", "inputnode.in_file")]),
        ])
    else:
        wf.connect(conform_wf, "outputnode.out_file", n4_wf, "inputnode.in_file")
    wf.connect([
        (n4_wf, registration_wf, [("outputnode.out_file", "inputnode.moving")]),
        (n4_wf, brain_mask_wf, [("outputnode.out_file", "inputnode.in_file")]),
        (registration_wf, brain_mask_wf, [("outputnode.inverse_transform", "inputnode.inverse_transform")]),
        (n4_wf, n4_masked_wf, [("outputnode.out_file", "inputnode.in_file")]),
        (brain_mask_wf, n4_masked_wf, [("outputnode.icv_mask", "inputnode.mask_file")]),
        (n4_masked_wf, normalise_wf, [("outputnode.out_file", "inputnode.in_file")]),
        (brain_mask_wf, normalise_wf, [("outputnode.brain_mask", "inputnode.brain_mask")]),
        (normalise_wf, resampling_wf, [("outputnode.out_file", "inputnode.in_file")]),
        (registration_wf, resampling_wf, [("outputnode.forward_transform", "inputnode.forward_transform")]),
        (resampling_wf, crop_wf, [("outputnode.out_file", "inputnode.in_file")]),
        (brain_mask_wf, crop_wf, [("outputnode.icv_mask", "inputnode.mask_file")]),
        (registration_wf, crop_wf, [("outputnode.forward_transform", "inputnode.forward_transform")]),
        (conform_wf, outputnode, [("outputnode.out_file", "t1w_conformed"), ("outputnode.warnings", "warnings")]),
        (normalise_wf, outputnode, [("outputnode.out_file", "t1w_preproc")]),
        (brain_mask_wf, outputnode, [("outputnode.icv_mask", "icv_mask"), ("outputnode.brain_mask", "brain_mask"),
                                     ("outputnode.icv_ml", "icv_ml"), ("outputnode.brain_ml", "brain_ml")]),
        (registration_wf, outputnode, [("outputnode.forward_transform", "forward_transform"),
                                       ("outputnode.inverse_transform", "inverse_transform")]),
        (resampling_wf, outputnode, [("outputnode.out_file", "t1w_template"), ("outputnode.ncc", "registration_ncc")]),
        (crop_wf, outputnode, [("outputnode.out_file", "cerebellum_crop")]),
    ])
    return wf
