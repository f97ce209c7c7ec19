"""Nipype interfaces that draw reportlets (figures of the subject report)."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the reportlet (SVG)")


def _load(path):
    import nibabel as nb

    return nb.load(path)


class _MosaicInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    contour_files = InputMultiObject(File(exists=True), desc="masks drawn as contours")
    contour_colors = traits.List(Str, desc="one colour per contour")
    contour_labels = traits.List(Str, desc="one legend label per contour")
    title = Str("", usedefault=True)


class MosaicRPT(SimpleInterface):
    """Sagittal/coronal/axial mosaic with mask contours."""

    input_spec = _MosaicInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_mosaic

        masks = list(self.inputs.contour_files or [])
        colors = list(self.inputs.contour_colors or []) or ["#ff3b30", "#ffd60a", "#32d74b"][: len(masks)]
        labels = list(self.inputs.contour_labels or []) or [os.path.basename(m) for m in masks]
        contours = [(_load(m), c, lab) for m, c, lab in zip(masks, colors, labels)]
        out = os.path.abspath("mosaic.svg")
        plot_mosaic(_load(self.inputs.in_file), out, contours=contours, title=self.inputs.title or None,
                    bbox_from=contours[0][0] if contours else None)
        self._results["out_report"] = out
        return runtime


class _BeforeAfterInputSpec(BaseInterfaceInputSpec):
    before = File(exists=True, mandatory=True)
    after = File(exists=True, mandatory=True)
    before_label = Str("before", usedefault=True)
    after_label = Str("after", usedefault=True)


class BeforeAfterRPT(SimpleInterface):
    """A flicker SVG: the image before a stage, and after it on mouse hover."""

    input_spec = _BeforeAfterInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_before_after

        out = os.path.abspath("before_after.svg")
        plot_before_after(_load(self.inputs.before), _load(self.inputs.after), out,
                          labels=(self.inputs.before_label, self.inputs.after_label))
        self._results["out_report"] = out
        return runtime


class _RegistrationInputSpec(BaseInterfaceInputSpec):
    warped_file = File(exists=True, mandatory=True, desc="subject in template space")
    template_file = File(exists=True, mandatory=True)
    template_mask = File(exists=True)


class RegistrationRPT(SimpleInterface):
    """Template edges over the subject in template space (flicker on hover)."""

    input_spec = _RegistrationInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_registration

        out = os.path.abspath("registration.svg")
        mask = _load(self.inputs.template_mask) if self.inputs.template_mask else None
        plot_registration(_load(self.inputs.warped_file), _load(self.inputs.template_file), out,
                          template_mask=mask, flicker=True)
        self._results["out_report"] = out
        return runtime


class _CropBoxInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image in template space")
    box_mm = traits.List(traits.List(traits.Float, minlen=2, maxlen=2), minlen=3, maxlen=3,
                          mandatory=True)
    title = Str("", usedefault=True)


class CropBoxRPT(SimpleInterface):
    """The cerebellum crop box drawn on the subject in template space."""

    input_spec = _CropBoxInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_crop_box

        out = os.path.abspath("crop_box.svg")
        plot_crop_box(_load(self.inputs.in_file), self.inputs.box_mm, out, title=self.inputs.title or None)
        self._results["out_report"] = out
        return runtime


class _SegmentationInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="anatomical image")
    dseg = File(exists=True, mandatory=True, desc="label image")
    protocol = Str(mandatory=True, desc="label protocol of dseg: its colour column colours the outlines")
    include = traits.List(traits.Int, desc="label values to outline (default: all); others are left out")
    title = Str("", usedefault=True)


class SegmentationRPT(SimpleInterface):
    """Outlines of every structure, in the protocol's colours, on the anatomical mosaic."""

    input_spec = _SegmentationInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..core.labels import load_protocol
        from ..reports.reportlets import plot_segmentation

        protocol = load_protocol(self.inputs.protocol)
        colors = {int(i): c for i, c in zip(protocol.indices, protocol.colors) if c}
        out = os.path.abspath("segmentation.svg")
        dseg = _load(self.inputs.dseg)
        if isdefined(self.inputs.include) and self.inputs.include:
            import nibabel as nb
            import numpy as np

            data = np.asarray(dseg.dataobj)
            data = np.where(np.isin(data, [int(v) for v in self.inputs.include]), data, 0).astype(np.int16)
            dseg = nb.Nifti1Image(data, dseg.affine)
        plot_segmentation(_load(self.inputs.in_file), dseg, out, colors=colors, title=self.inputs.title or None)
        self._results["out_report"] = out
        return runtime


class _MapInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="parametric map")
    bbox_file = File(exists=True, desc="mask whose bounding box the slices span")
    cmap = Str("inferno", usedefault=True)
    unit = Str("", usedefault=True)
    title = Str("", usedefault=True)


class MapRPT(SimpleInterface):
    """Mosaic of a parametric map (e.g. the segmentation entropy) in a colour map."""

    input_spec = _MapInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_map

        out = os.path.abspath("map.svg")
        bbox = _load(self.inputs.bbox_file) if self.inputs.bbox_file else None
        plot_map(_load(self.inputs.in_file), out, cmap=self.inputs.cmap, unit=self.inputs.unit,
                 title=self.inputs.title or None, bbox_from=bbox)
        self._results["out_report"] = out
        return runtime


class _LobuleMosaicInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w of the cerebellum crop")
    dseg = File(exists=True, mandatory=True, desc="lobule labels on the crop grid")
    protocol = Str("lobules", usedefault=True, desc="label protocol of dseg (colours and legend)")
    fill_alpha = traits.Range(0.0, 1.0, 0.35, usedefault=True, desc="opacity of the fills (0: outlines only)")
    title = Str("Cerebellar lobules", usedefault=True)


class LobuleMosaicRPT(SimpleInterface):
    """Semi-transparent fills and outlines of the lobules on the crop T1w, with a legend (SVG)."""

    input_spec = _LobuleMosaicInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.lobules import plot_lobule_mosaic

        out = os.path.abspath("lobules.svg")
        plot_lobule_mosaic(_load(self.inputs.in_file), _load(self.inputs.dseg), out, protocol=self.inputs.protocol,
                           fill_alpha=self.inputs.fill_alpha, title=self.inputs.title or None)
        self._results["out_report"] = out
        return runtime


class _LobuleRenderInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True, desc="lobule labels")
    protocol = Str("lobules", usedefault=True, desc="label protocol of dseg (colours and legend)")
    title = Str("Cerebellar lobules: surface overview", usedefault=True)


class _PNGReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the reportlet (PNG)")


class LobuleRenderRPT(SimpleInterface):
    """3D-looking overview of the lobules: their lit surface from four sides (PNG)."""

    input_spec = _LobuleRenderInputSpec
    output_spec = _PNGReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.lobules import plot_lobule_overview

        out = os.path.abspath("lobules_render.png")
        plot_lobule_overview(_load(self.inputs.dseg), out, protocol=self.inputs.protocol,
                             title=self.inputs.title or None)
        self._results["out_report"] = out
        return runtime


class _LobuleVolumesInputSpec(BaseInterfaceInputSpec):
    morph_tsv = File(exists=True, mandatory=True, desc="_seg-cerebellum_morph.tsv")
    qc_json = File(exists=True, desc="cerebellum QC JSON (mean CV and flag in the subtitle)")
    protocol = Str("lobules", usedefault=True, desc="label protocol of the table (colours)")
    title = Str("Lobule volumes", usedefault=True)


class LobuleVolumesRPT(SimpleInterface):
    """Left/right bars of the lobule volumes with their MC-dropout spread and QC flags (SVG)."""

    input_spec = _LobuleVolumesInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.lobules import plot_lobule_volumes

        out = os.path.abspath("lobule_volumes.svg")
        qc = self.inputs.qc_json if isdefined(self.inputs.qc_json) else None
        plot_lobule_volumes(self.inputs.morph_tsv, out, qc_json=qc, protocol=self.inputs.protocol,
                            title=self.inputs.title or None)
        self._results["out_report"] = out
        return runtime


class _ImagePairInputSpec(BaseInterfaceInputSpec):
    first = File(exists=True, mandatory=True, desc="the image on the left (its content sets the slices)")
    second = File(exists=True, mandatory=True, desc="the image on the right (same world space, any grid)")
    first_label = Str("first", usedefault=True)
    second_label = Str("second", usedefault=True)
    title = Str("", usedefault=True)
    detail = traits.Enum(None, "sagittal", "coronal", "axial", usedefault=True,
                         desc="view of a zoomed detail row (None: no detail)")
    note = Str("", usedefault=True, desc="a line under the panels (e.g. which model made the second image)")
    qc_json = File(exists=True, desc="cerebellum QC JSON: with note_from, the line under the panels comes from it")
    note_from = traits.Enum(None, "t2", "superres", usedefault=True,
                            desc="the stage of the QC JSON whose sentence is the note (bids_app.reports.lobules)")


class ImagePairRPT(SimpleInterface):
    """Two images side by side on the same slices (e.g. the T1w crop and its super-resolved version) (SVG)."""

    input_spec = _ImagePairInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_image_pair

        note = self.inputs.note or None
        if self.inputs.note_from and isdefined(self.inputs.qc_json):
            from ..reports import lobules

            qc = lobules._read_json(self.inputs.qc_json)
            line = lobules.t2_line(qc) if self.inputs.note_from == "t2" else lobules.superres_line(qc)
            note = line or note
        out = os.path.abspath("image_pair.svg")
        plot_image_pair(self.inputs.first, self.inputs.second, out,
                        labels=(self.inputs.first_label, self.inputs.second_label), title=self.inputs.title or None,
                        detail=self.inputs.detail, note=note)
        self._results["out_report"] = out
        return runtime
