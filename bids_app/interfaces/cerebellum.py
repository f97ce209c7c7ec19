"""Nipype interface of the cerebellum cascade (hemispheres -> lobules) with its MC-dropout QC.

The work is :func:`bids_app.models.cascade.cerebellum_files`, run in a fresh Python process
(``python -m bids_app.models.cascade``): PyTorch's OpenMP thread pool hangs in a process forked
from one that already used it, which Nipype's MultiProc workers may be (as for the whole-brain
interface, :mod:`bids_app.interfaces.segment`). ``isolate=False`` runs it in the node's own
process instead (tests, debugging).

``num_threads``, ``device`` and ``isolate`` are ``nohash``: changing them never invalidates the
cache. The checkpoints are hashed by their manifest's content, which holds the weights' SHA-256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)


class _CerebellumInputSpec(BaseInterfaceInputSpec):
    crop_t1w = File(exists=True, mandatory=True, desc="cerebellum crop of the template-space T1w (normalised)")
    source_file = File(exists=True, mandatory=True, desc="the raw T1w: its grid is the native space of the outputs")
    inverse_transform = File(exists=True, mandatory=True, desc="template -> T1w affine (ITK .mat)")
    icv_ml = traits.Float(desc="intracranial volume (mL), for the ICV fractions")
    prior_file = File(exists=True, desc="atlas prior: 4D, one volume per lobules class, on the crop grid")
    prior_json = File(exists=True, desc="summary of the atlas fusion (copied into the QC JSON)")
    prior_reason = Str("", usedefault=True, desc="why no atlas prior is given (recorded in the QC JSON)")
    hemisphere_checkpoints = traits.List(File(exists=True), minlen=1, mandatory=True,
                                         desc="manifests (.json) of the hemisphere models (net 1)")
    lobule_checkpoints = traits.List(File(exists=True), minlen=1, mandatory=True,
                                     desc="manifests (.json) of the lobule models (net 2)")
    mc_samples = traits.Int(15, usedefault=True, desc="Monte-Carlo dropout samples of each network")
    seed = traits.Int(42, usedefault=True, desc="seed of the dropout masks")
    modality = Str("T1w", usedefault=True, desc="selects the QC threshold")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads of PyTorch")
    device = traits.Enum("auto", "cpu", "cuda", "mps", usedefault=True, nohash=True, desc="where the networks run")
    isolate = traits.Bool(True, usedefault=True, nohash=True, desc="run in a fresh Python process")


class _CerebellumOutputSpec(TraitedSpec):
    dseg_crop = File(exists=True, desc="lobule labels on the crop grid (template space)")
    probseg_crop = File(exists=True, desc="4D probabilities, one volume per lobules class, crop grid")
    entropy_crop = File(exists=True, desc="predictive entropy (nats), crop grid")
    dseg = File(exists=True, desc="lobule labels on the grid of the raw T1w")
    morph = File(exists=True, desc="morphometry table (native volumes)")
    dseg_tsv = File(exists=True, desc="dseg.tsv of the lobules protocol")
    qc_json = File(exists=True, desc="MC-dropout QC summary")
    prior_used = traits.Bool(desc="whether the lobule models took the atlas prior")
    mean_cv_percent = traits.Float(desc="mean volume CV over the structures (%), NaN if undefined")
    qc_flag = Str(desc="pass or warn")


def run_isolated(module: str, spec: dict, cwd: str, what: str) -> dict:
    """``python -m <module> SPEC.json OUTPUTS.json`` in ``cwd``; the log goes to ``<cwd>/<stem>.log``."""
    stem = module.rsplit(".", 1)[-1]
    spec_file = os.path.join(cwd, f"{stem}_spec.json")
    out_file = os.path.join(cwd, f"{stem}_outputs.json")
    with open(spec_file, "w") as fh:
        json.dump(spec, fh, indent=2)
    if os.path.exists(out_file):
        os.unlink(out_file)
    proc = subprocess.run([sys.executable, "-m", module, spec_file, out_file], capture_output=True, text=True,
                          cwd=cwd)
    with open(os.path.join(cwd, f"{stem}.log"), "w") as fh:
        fh.write(proc.stderr)
    if proc.returncode != 0 or not os.path.exists(out_file):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR: ")), lines[-1] if lines else "")
        message = last.removeprefix("ERROR: ") or "no message"
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}): {message}")
    with open(out_file) as fh:
        return json.load(fh)


class CerebellumSegmentation(SimpleInterface):
    """Cerebellar lobules (crop and native grids), probabilities, entropy, native volumes and QC."""

    input_spec = _CerebellumInputSpec
    output_spec = _CerebellumOutputSpec

    def _run_interface(self, runtime):
        def opt(value):
            return str(value) if isdefined(value) else None

        spec = {
            "crop_t1w": self.inputs.crop_t1w, "source_file": self.inputs.source_file,
            "inverse_transform": self.inputs.inverse_transform,
            "hemisphere_checkpoints": [str(c) for c in self.inputs.hemisphere_checkpoints],
            "lobule_checkpoints": [str(c) for c in self.inputs.lobule_checkpoints],
            "out_dir": os.path.abspath("cerebellum"), "prior_file": opt(self.inputs.prior_file),
            "prior_json": opt(self.inputs.prior_json), "prior_reason": self.inputs.prior_reason,
            "mc_samples": int(self.inputs.mc_samples), "seed": int(self.inputs.seed), "device": self.inputs.device,
            "num_threads": int(self.inputs.num_threads), "modality": self.inputs.modality,
            "icv_ml": float(self.inputs.icv_ml) if isdefined(self.inputs.icv_ml) else None,
        }
        if self.inputs.isolate:
            out = run_isolated("bids_app.models.cascade", spec, runtime.cwd, "cerebellum segmentation")
        else:
            from ..models.cascade import cerebellum_files

            out = json.loads(json.dumps(cerebellum_files(**spec)))
        self._results.update(
            dseg_crop=out["crop_dseg"], probseg_crop=out["crop_probseg"], entropy_crop=out["crop_entropy"],
            dseg=out["dseg"], morph=out["morph"], dseg_tsv=out["dseg_tsv"], qc_json=out["qc_json"],
            prior_used=bool(out["prior_used"]), qc_flag=out["qc_flag"],
            mean_cv_percent=float("nan") if out["mean_cv_percent"] is None else float(out["mean_cv_percent"]),
        )
        return runtime
