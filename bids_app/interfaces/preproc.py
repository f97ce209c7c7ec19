"""Nipype interfaces of the preprocessing stages: each ``_run_interface`` calls one file adapter.

``num_threads`` is a ``nohash`` trait: changing it never invalidates the cache in the work dir.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..core import crop as _crop
from ..core import files


class _ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads for this node")


def _set_threads(n: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(int(n), 1))


def _out(name: str) -> str:
    return os.path.abspath(name)


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw anatomical image")
    voxel_size = traits.Float(1.0, usedefault=True, desc="isotropic voxel size (mm)")
    crop_margin_mm = traits.Float(10.0, usedefault=True, desc="margin kept around the head (mm)")


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="conformed image (RAS+, isotropic, float32)")
    warnings = traits.List(traits.Str, desc="problems found that did not stop the run")


class Conform(SimpleInterface):
    """Validate an anatomical image and conform it to an axis-aligned RAS+ isotropic grid."""

    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_interface(self, runtime):
        out, warnings = files.conform_file(self.inputs.in_file, out_file=_out("conformed.nii.gz"),
                                           voxel_size=self.inputs.voxel_size,
                                           crop_margin_mm=self.inputs.crop_margin_mm)
        self._results.update(out_file=out, warnings=warnings)
        return runtime


class _DenoiseInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True)
    patch_radius = traits.Int(1, usedefault=True)
    search_radius = traits.Int(2, usedefault=True)
    noise_model = traits.Enum("Rician", "Gaussian", usedefault=True)


class _OutFileSpec(TraitedSpec):
    out_file = File(exists=True)


class Denoise(SimpleInterface):
    """Adaptive non-local means denoising (Rician) inside the head."""

    input_spec = _DenoiseInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads)
        self._results["out_file"] = files.denoise_file(
            self.inputs.in_file, out_file=_out("denoised.nii.gz"), patch_radius=self.inputs.patch_radius,
            search_radius=self.inputs.search_radius, noise_model=self.inputs.noise_model)
        return runtime


class _N4InputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, desc="estimate the field inside this mask (default: the head)")
    shrink_factor = traits.Int(4, usedefault=True)
    iterations = traits.List(traits.Int, [50, 50, 30], usedefault=True)
    spline_distance_mm = traits.Float(100.0, usedefault=True)
    convergence = traits.Float(1e-6, usedefault=True)


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image")
    bias_file = File(exists=True, desc="estimated bias field")


class N4BiasCorrection(SimpleInterface):
    """N4 bias-field correction (ANTs)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads)
        out, field = files.n4_file(
            self.inputs.in_file, out_file=_out("corrected.nii.gz"), bias_file=_out("bias.nii.gz"),
            mask_file=self.inputs.mask_file or None, shrink_factor=self.inputs.shrink_factor,
            iterations=self.inputs.iterations, spline_distance_mm=self.inputs.spline_distance_mm,
            convergence=self.inputs.convergence)
        self._results.update(out_file=out, bias_file=field)
        return runtime


class _RegisterInputSpec(_ThreadedInputSpec):
    moving_file = File(exists=True, mandatory=True, desc="subject image")
    fixed_file = File(exists=True, mandatory=True, desc="template image")
    random_seed = traits.Int(42, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="subject -> template (ITK .mat)")
    inverse_transform = File(exists=True, desc="template -> subject (ITK .mat)")


class AffineRegistration(SimpleInterface):
    """Affine registration of the subject to the template (ANTs)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads)
        fwd, inv = files.register_file(self.inputs.moving_file, self.inputs.fixed_file,
                                       forward_file=_out("from-T1w_to-template_xfm.mat"),
                                       inverse_file=_out("from-template_to-T1w_xfm.mat"),
                                       random_seed=self.inputs.random_seed)
        self._results.update(forward_transform=fwd, inverse_transform=inv)
        return runtime


class _ApplyInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True)
    reference_file = File(exists=True, mandatory=True, desc="defines the output grid")
    transform_file = File(exists=True, mandatory=True)
    interpolation = traits.Enum("linear", "nearestNeighbor", "bSpline", "lanczosWindowedSinc", usedefault=True)
    invert = traits.Bool(False, usedefault=True)


class ApplyTransform(SimpleInterface):
    """Resample an image onto a reference grid through an affine transform."""

    input_spec = _ApplyInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads)
        self._results["out_file"] = files.apply_transform_file(
            self.inputs.in_file, self.inputs.reference_file, self.inputs.transform_file,
            out_file=_out("resampled.nii.gz"), interpolation=self.inputs.interpolation, invert=self.inputs.invert)
        return runtime


class _MasksInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    prior_file = File(exists=True, mandatory=True, desc="template brain mask on the subject grid (0-1)")


class _MasksOutputSpec(TraitedSpec):
    icv_mask = File(exists=True)
    brain_mask = File(exists=True)
    icv_ml = traits.Float()
    brain_ml = traits.Float()


class BrainMasks(SimpleInterface):
    """Intracranial and brain masks from the template prior and a tissue classification."""

    input_spec = _MasksInputSpec
    output_spec = _MasksOutputSpec

    def _run_interface(self, runtime):
        icv, brain, icv_ml, brain_ml = files.brain_masks_file(
            self.inputs.in_file, self.inputs.prior_file, icv_file=_out("icv_mask.nii.gz"),
            brain_file=_out("brain_mask.nii.gz"))
        self._results.update(icv_mask=icv, brain_mask=brain, icv_ml=icv_ml, brain_ml=brain_ml)
        return runtime


class _NormaliseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    percentile = traits.Float(99.0, usedefault=True)


class NormaliseIntensity(SimpleInterface):
    """Scale intensities so that a high percentile inside the brain is 1.0."""

    input_spec = _NormaliseInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = files.normalise_file(
            self.inputs.in_file, self.inputs.mask_file, out_file=_out("normalised.nii.gz"),
            percentile=self.inputs.percentile)
        return runtime


class _CropInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    box_mm = traits.List(traits.List(traits.Float, minlen=2, maxlen=2), minlen=3, maxlen=3,
                          value=[list(b) for b in _crop.CEREBELLUM_BOX_MM], usedefault=True, desc="world box (RAS mm)")
    mask_file = File(exists=True, desc="mask on the grid of in_file: zero outside it")


class CropBox(SimpleInterface):
    """Crop an image on an axis-aligned grid to a box in world coordinates."""

    input_spec = _CropInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        self._results["out_file"] = files.crop_file(self.inputs.in_file, out_file=_out("cropped.nii.gz"),
                                                    box_mm=self.inputs.box_mm,
                                                    mask_file=self.inputs.mask_file or None)
        return runtime


class _QualityInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="subject image in template space")
    template_file = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)


class _QualityOutputSpec(TraitedSpec):
    ncc = traits.Float(desc="correlation with the template inside its brain mask")


class RegistrationQuality(SimpleInterface):
    """How well the subject matches the template after registration (for reports and group QC)."""

    input_spec = _QualityInputSpec
    output_spec = _QualityOutputSpec

    def _run_interface(self, runtime):
        self._results["ncc"] = files.registration_quality(self.inputs.in_file, self.inputs.template_file,
                                                          self.inputs.template_mask)
        return runtime
