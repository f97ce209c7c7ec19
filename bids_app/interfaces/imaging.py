"""Nipype interfaces of the image stages of the cerebellum branch: x2 super-resolution, T2 synthesis, and
the subject's own T2w brought onto the crop.

:class:`SuperResolution` and :class:`T2Synthesis` call
:func:`bids_app.models.image_files.image_task_files` (which calls
:func:`bids_app.models.imaging.image_file`) in a fresh Python process (``python -m
bids_app.models.image_files``), as the segmentation interfaces do: PyTorch's OpenMP thread pool
hangs in a process forked from one that already used it, which Nipype's MultiProc workers may be.
``isolate=False`` runs it in the node's own process instead (tests, debugging). Without
``checkpoint`` the installed model of the task is used; when there is none the node fails with one
line saying so and which option switches the stage off.

:class:`RealT2w` only calls :func:`bids_app.core.t2.t2w_crop_file` (ANTs, no PyTorch).

``num_threads``, ``device`` and ``isolate`` are ``nohash``: changing them never invalidates the
cache. Every output is written atomically.
"""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .cerebellum import run_isolated


class _ImageTaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="cerebellum crop of the template-space T1w (1 mm, normalised, zero outside the brain)")
    checkpoint = File(exists=True, desc="manifest (.json) of the model (default: the installed model of the task)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads of PyTorch")
    device = traits.Enum("auto", "cpu", "cuda", "mps", usedefault=True, nohash=True, desc="where the network runs")
    isolate = traits.Bool(True, usedefault=True, nohash=True, desc="run in a fresh Python process")


class _ImageTaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the network's output image")
    out_json = File(exists=True, desc="summary: model, version, seconds, shape, voxel size, checkpoint, device")


class _ImageTask(SimpleInterface):
    input_spec = _ImageTaskInputSpec
    output_spec = _ImageTaskOutputSpec
    #: manifest task, output file name and what the stage is called in error messages
    _task = ""
    _out_name = ""
    _what = ""

    def _run_interface(self, runtime):
        spec = {
            "task": self._task, "in_file": os.path.abspath(self.inputs.in_file),
            "out_file": os.path.abspath(self._out_name),
            "json_file": os.path.abspath(self._out_name.replace(".nii.gz", ".json")),
            "checkpoint": os.path.abspath(self.inputs.checkpoint) if isdefined(self.inputs.checkpoint) else None,
            "device": self.inputs.device, "num_threads": int(self.inputs.num_threads),
        }
        if self.inputs.isolate:
            out = run_isolated("bids_app.models.image_files", spec, runtime.cwd, self._what)
        else:
            from ..models.image_files import image_task_files

            out = json.loads(json.dumps(image_task_files(**spec)))
        self._results.update(out_file=out["out_file"], out_json=out["out_json"])
        return runtime


class SuperResolution(_ImageTask):
    """x2 super-resolution of the cerebellum crop: 0.5 mm, same field of view (``task: "superres"``)."""

    _task = "superres"
    _out_name = "superres.nii.gz"
    _what = "super-resolution"


class T2Synthesis(_ImageTask):
    """Synthetic T2w on the grid of the cerebellum crop, predicted from the T1w (``task: "t2synth"``)."""

    _task = "t2synth"
    _out_name = "t2synth.nii.gz"
    _what = "T2 synthesis"


class _RealT2wInputSpec(BaseInterfaceInputSpec):
    t2w_file = File(exists=True, mandatory=True, desc="the subject's raw T2w")
    t1w_file = File(exists=True, mandatory=True, desc="the raw T1w of the same session (registration target)")
    crop_file = File(exists=True, mandatory=True, desc="cerebellum crop of the template-space T1w (output grid)")
    forward_transform = File(exists=True, mandatory=True, desc="T1w -> template affine of the preprocessing (ITK .mat)")
    random_seed = traits.Int(42, usedefault=True, desc="seed of ANTs")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads of ANTs")


class _RealT2wOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the T2w on the crop grid, zero outside the brain, 99th percentile = 1")
    out_transform = File(exists=True, desc="T2w -> T1w rigid transform (ITK .mat; maps T1w points to the T2w)")
    out_json = File(exists=True, desc="summary: the T2w's file name, translation and rotation of the registration")


class RealT2w(SimpleInterface):
    """The subject's T2w rigidly registered to the T1w and resampled onto the cerebellum crop (ANTs)."""

    input_spec = _RealT2wInputSpec
    output_spec = _RealT2wOutputSpec

    def _run_interface(self, runtime):
        from ..core.t2 import t2w_crop_file

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(int(self.inputs.num_threads), 1))
        out, xfm, summary = t2w_crop_file(
            self.inputs.t2w_file, self.inputs.t1w_file, self.inputs.crop_file, self.inputs.forward_transform,
            out_file=os.path.abspath("t2w_crop.nii.gz"), transform_file=os.path.abspath("from-T2w_to-T1w_xfm.mat"),
            json_file=os.path.abspath("t2w_crop.json"), random_seed=int(self.inputs.random_seed))
        self._results.update(out_file=out, out_transform=xfm, out_json=summary)
        return runtime
