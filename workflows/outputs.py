"""Writing derivatives and reportlets of the anatomical workflow."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.bids import derivative_path, source_entities
from bids_app.core.crop import CEREBELLUM_BOX_MM
from bids_app.interfaces.bids import DerivativesDataSink
from bids_app.interfaces.reports import BeforeAfterRPT, CropBoxRPT, MosaicRPT, RegistrationRPT


def _meta(volume_ml=None, ncc=None, extra=None):
    """Sidecar metadata built from values known only at run time (runs inside a Function node)."""
    meta = dict(extra or {})
    if volume_ml is not None:
        meta["VolumeML"] = round(float(volume_ml), 2)
    if ncc is not None:
        meta["RegistrationNCC"] = round(float(ncc), 4)
    return meta


def _uri(source_file: str, **entities) -> str:
    ents = source_entities(source_file)
    ents.update(entities)
    return "bids::" + derivative_path(ents)


def init_anat_derivatives_wf(*, output_dir: str, source_file: str, source_uri: str, template: str,
                             box_mm=CEREBELLUM_BOX_MM, name: str = "anat_derivatives_wf"):
    """Write the anatomical derivatives with BIDS names and ``Sources`` in every sidecar."""
    wf = pe.Workflow(name=name)
    fields = ["t1w_preproc", "icv_mask", "brain_mask", "icv_ml", "brain_ml", "forward_transform",
              "inverse_transform", "t1w_template", "registration_ncc", "cerebellum_crop"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    preproc_uri = _uri(source_file, desc="preproc", suffix="T1w", extension=".nii.gz")
    xfm_uri = _uri(source_file, **{"from": "T1w", "to": template, "mode": "image", "suffix": "xfm",
                                   "extension": ".mat"})
    template_uri = _uri(source_file, space=template, desc="preproc", suffix="T1w", extension=".nii.gz")

    def sink(name, entities, sources, meta=None):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=entities,
                                           sources=sources, meta_dict=meta or {}), name=name, run_without_submitting=True)

    ds_t1w = sink("ds_t1w_preproc", {"desc": "preproc", "suffix": "T1w"}, [source_uri], {
        "Description": "Conformed (RAS+, isotropic), denoised, N4-corrected twice, intensity-normalised T1w",
        "SkullStripped": False, "IntensityNormalisation": "99th percentile inside the brain mask = 1.0"})
    ds_icv = sink("ds_icv_mask", {"label": "ICV", "suffix": "mask"}, [preproc_uri, xfm_uri])
    ds_brain = sink("ds_brain_mask", {"desc": "brain", "suffix": "mask"}, [preproc_uri, xfm_uri])
    ds_fwd = sink("ds_forward_xfm", {"from": "T1w", "to": template, "mode": "image", "suffix": "xfm"},
                  [preproc_uri], {"Type": "affine", "Software": "ANTs", "Format": "ITK MatlabTransformIO"})
    ds_inv = sink("ds_inverse_xfm", {"from": template, "to": "T1w", "mode": "image", "suffix": "xfm"},
                  [preproc_uri], {"Type": "affine", "Software": "ANTs", "Format": "ITK MatlabTransformIO"})
    ds_tpl = sink("ds_t1w_template", {"space": template, "desc": "preproc", "suffix": "T1w"}, [preproc_uri, xfm_uri])
    ds_crop = sink("ds_cerebellum_crop", {"space": template, "desc": "cerebellum", "suffix": "T1w"}, [template_uri],
                   {"Description": "Cerebellum region cropped from the template-space T1w, zero outside the intracranial mask",
                    "CropBoxMM": [list(b) for b in box_mm]})

    icv_meta = pe.Node(niu.Function(function=_meta, input_names=["volume_ml", "ncc", "extra"],
                                    output_names=["meta"]), name="icv_meta")
    icv_meta.inputs.extra = {"Type": "ICV"}
    brain_meta = pe.Node(niu.Function(function=_meta, input_names=["volume_ml", "ncc", "extra"],
                                      output_names=["meta"]), name="brain_meta")
    brain_meta.inputs.extra = {"Type": "Brain"}
    tpl_meta = pe.Node(niu.Function(function=_meta, input_names=["volume_ml", "ncc", "extra"],
                                    output_names=["meta"]), name="template_meta")
    tpl_meta.inputs.extra = {"Description": f"Preprocessed T1w resampled to {template} (affine)"}

    wf.connect([
        (inputnode, ds_t1w, [("t1w_preproc", "in_file")]),
        (inputnode, icv_meta, [("icv_ml", "volume_ml")]),
        (inputnode, brain_meta, [("brain_ml", "volume_ml")]),
        (inputnode, tpl_meta, [("registration_ncc", "ncc")]),
        (inputnode, ds_icv, [("icv_mask", "in_file")]),
        (icv_meta, ds_icv, [("meta", "meta_dict")]),
        (inputnode, ds_brain, [("brain_mask", "in_file")]),
        (brain_meta, ds_brain, [("meta", "meta_dict")]),
        (inputnode, ds_fwd, [("forward_transform", "in_file")]),
        (inputnode, ds_inv, [("inverse_transform", "in_file")]),
        (inputnode, ds_tpl, [("t1w_template", "in_file")]),
        (tpl_meta, ds_tpl, [("meta", "meta_dict")]),
        (inputnode, ds_crop, [("cerebellum_crop", "in_file")]),
    ])
    return wf


def init_anat_reports_wf(*, output_dir: str, source_file: str, template: str, template_reference: str,
                         template_mask: str, box_mm=CEREBELLUM_BOX_MM, name: str = "anat_reports_wf"):
    """Reportlets of the anatomical workflow, written to ``sub-<label>/figures/``."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_conformed", "t1w_preproc", "icv_mask", "brain_mask",
                                                      "t1w_template"]), name="inputnode")

    def sink(name, entities):
        ents = {"datatype": "figures", "extension": ".svg"}
        ents.update(entities)
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file, entities=ents),
                       name=name, run_without_submitting=True)

    conform_rpt = pe.Node(MosaicRPT(title="Input T1w, conformed to RAS+ (before preprocessing)"),
                          name="conform_rpt")
    preproc_rpt = pe.Node(BeforeAfterRPT(before_label="conformed input", after_label="preprocessed"),
                          name="preproc_rpt")
    masks_rpt = pe.Node(MosaicRPT(contour_colors=["#ff453a", "#ffd60a"], contour_labels=["intracranial", "brain"],
                                  title="Intracranial (red) and brain (yellow) masks"), name="masks_rpt")
    registration_rpt = pe.Node(RegistrationRPT(template_file=template_reference, template_mask=template_mask),
                               name="registration_rpt")
    crop_rpt = pe.Node(CropBoxRPT(box_mm=[list(b) for b in box_mm], title="Cerebellum crop box"),
                       name="crop_rpt")
    merge_masks = pe.Node(niu.Merge(2), name="merge_masks", run_without_submitting=True)

    ds_conform = sink("ds_conform_rpt", {"desc": "conform", "suffix": "T1w"})
    ds_preproc = sink("ds_preproc_rpt", {"desc": "preproc", "suffix": "T1w"})
    ds_masks = sink("ds_masks_rpt", {"desc": "brain", "suffix": "mask"})
    ds_registration = sink("ds_registration_rpt", {"space": template, "suffix": "T1w"})
    ds_crop = sink("ds_crop_rpt", {"space": template, "desc": "cerebellum", "suffix": "T1w"})

    wf.connect([
        (inputnode, conform_rpt, [("t1w_conformed", "in_file")]),
        (inputnode, preproc_rpt, [("t1w_conformed", "before"), ("t1w_preproc", "after")]),
        (inputnode, merge_masks, [("icv_mask", "in1"), ("brain_mask", "in2")]),
        (inputnode, masks_rpt, [("t1w_preproc", "in_file")]),
        (merge_masks, masks_rpt, [("out", "contour_files")]),
        (inputnode, registration_rpt, [("t1w_template", "warped_file")]),
        (inputnode, crop_rpt, [("t1w_template", "in_file")]),
        (conform_rpt, ds_conform, [("out_report", "in_file")]),
        (preproc_rpt, ds_preproc, [("out_report", "in_file")]),
        (masks_rpt, ds_masks, [("out_report", "in_file")]),
        (registration_rpt, ds_registration, [("out_report", "in_file")]),
        (crop_rpt, ds_crop, [("out_report", "in_file")]),
    ])
    return wf
