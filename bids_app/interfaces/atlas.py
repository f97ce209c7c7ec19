"""Nipype interface of the atlas prior (DeepCERES-style multi-atlas fusion on the cerebellum crop).

``_run_interface`` only calls :func:`bids_app.atlas_library.atlas_prior_file`. ``num_threads`` is
``nohash`` (changing it never invalidates the cache); it sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
for ANTs, which ITK reads once per process. Note that the cache key holds the library's path, not
its content: rebuilding a library in the same folder needs a fresh work directory.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)

from ..core.atlas_fusion import DEFAULT_D, DEFAULT_N, DEFAULT_PRESET, DEFAULT_SCALE, SYN_PRESETS


class _AtlasPriorInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="cerebellum crop of the template-space T1w (library grid)")
    library_dir = Directory(exists=True, mandatory=True, desc="cerebellum library (folder with library.json)")
    n_atlases = traits.Int(DEFAULT_N, usedefault=True, desc="library cases registered and fused")
    d = traits.Float(DEFAULT_D, usedefault=True, desc="DeepCERES' weight coefficient d")
    intensity_scale = traits.Float(DEFAULT_SCALE, usedefault=True,
                                   desc="intensities are multiplied by this before the weights (p99 = 1 -> 100)")
    syn_preset = traits.Enum(DEFAULT_PRESET, *[p for p in SYN_PRESETS if p != DEFAULT_PRESET], usedefault=True,
                             desc="ANTs SyN configuration")
    exclude_subjects = traits.List(Str, desc="library subjects left out (all their cases)")
    random_seed = traits.Int(42, usedefault=True, desc="seed of ANTs")
    t2_file = File(exists=True, desc="T2w on the crop grid: the vote weighs T1w and T2w differences")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads of ANTs")


class _AtlasPriorOutputSpec(TraitedSpec):
    out_prior = File(exists=True, desc="4D prior on the crop grid, one volume per lobules label (background first)")
    out_json = File(exists=True, desc="sidecar: selected cases, distances, parameters, timings")


class AtlasPrior(SimpleInterface):
    """Subject-specific atlas prior of the cerebellum crop from a labelled library."""

    input_spec = _AtlasPriorInputSpec
    output_spec = _AtlasPriorOutputSpec

    def _run_interface(self, runtime):
        from nipype.interfaces.base import isdefined

        from ..atlas_library import atlas_prior_file

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(int(self.inputs.num_threads), 1))
        exclude = list(self.inputs.exclude_subjects) if isdefined(self.inputs.exclude_subjects) else []
        out_prior, out_json = atlas_prior_file(
            self.inputs.in_file, self.inputs.library_dir, out_file=os.path.abspath("atlas_prior.nii.gz"),
            json_file=os.path.abspath("atlas_prior.json"), n=int(self.inputs.n_atlases), d=float(self.inputs.d),
            scale=float(self.inputs.intensity_scale), preset=self.inputs.syn_preset,
            random_seed=int(self.inputs.random_seed), exclude_subjects=exclude,
            t2_file=self.inputs.t2_file if isdefined(self.inputs.t2_file) else None)
        self._results.update(out_prior=out_prior, out_json=out_json)
        return runtime
