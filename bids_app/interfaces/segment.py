"""Nipype interface of the whole-brain segmentation (MC-dropout ensemble) and its QC.

The work is :func:`bids_app.models.segment_files.segment_files`, run in a fresh Python process
(``python -m bids_app.models.segment_files``): PyTorch's OpenMP thread pool hangs in a process
forked from one that already used it, which Nipype's MultiProc workers may be. ``isolate=False``
runs it in the node's own process instead (tests, debugging).

``parc_checkpoints`` runs the cortical parcellation ensemble in the same node and fuses the two
(:func:`bids_app.models.segment.fuse_parcellation`): its outputs are the ``parc_*`` fields.

``fine_only=True`` is a cortical parcellation node on its own: only the models' own protocol is written
(``fine_*`` outputs and ``qc_json``); the aseg/CEREBRUM 7/probseg/entropy outputs stay undefined.

``num_threads`` and ``device`` are ``nohash``: changing them never invalidates the cache. The
checkpoints are hashed by their manifest's content, which holds the weights' SHA-256.
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
    traits,
)


class _SegmentInputSpec(BaseInterfaceInputSpec):
    t1w_preproc = File(exists=True, mandatory=True, desc="preprocessed T1w in the conformed T1w space")
    icv_mask = File(exists=True, mandatory=True, desc="intracranial mask on the same grid")
    icv_ml = traits.Float(desc="intracranial volume (mL); default: from the mask")
    source_file = File(exists=True, mandatory=True, desc="the raw T1w: its grid is the native space of the outputs")
    checkpoints = traits.List(File(exists=True), minlen=1, mandatory=True, desc="model manifests (.json)")
    mc_samples = traits.Int(15, usedefault=True, desc="Monte-Carlo dropout samples")
    tta = traits.Enum("none", "flip", "shift", "flip-shift", usedefault=True,
                      desc="test-time augmentation: the MC samples spread over these views")
    refinement = traits.Enum("none", "intensity", usedefault=True,
                             desc="refinement of the probabilities with the image's own intensities")
    seed = traits.Int(42, usedefault=True, desc="seed of the dropout masks")
    modality = Str("T1w", usedefault=True, desc="selects the QC threshold")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads of PyTorch")
    device = traits.Enum("auto", "cpu", "cuda", "mps", usedefault=True, nohash=True, desc="where the networks run")
    isolate = traits.Bool(True, usedefault=True, nohash=True, desc="run in a fresh Python process")
    parc_checkpoints = traits.List(File(exists=True), desc="cortical parcellation manifests (.json): that ensemble "
                                   "runs in this node too and the two are fused (parc_* outputs)")
    fine_only = traits.Bool(False, usedefault=True,
                            desc="write only the models' own protocol (cortical parcellation): no aseg, "
                                 "CEREBRUM 7, probseg or entropy outputs")


class _SegmentOutputSpec(TraitedSpec):
    fine_protocol = Str(desc="label protocol of the models")
    fine_dseg = File(exists=True, desc="labels of the fine protocol, native T1w grid")
    aseg_dseg = File(exists=True, desc="aseg labels, native T1w grid")
    cerebrum7_dseg = File(exists=True, desc="CEREBRUM 7-class labels, native T1w grid")
    fine_dseg_tsv = File(exists=True, desc="dseg.tsv of the fine protocol")
    aseg_dseg_tsv = File(exists=True)
    cerebrum7_dseg_tsv = File(exists=True)
    probseg_cerebrum7 = traits.List(File(exists=True), desc="one probability map per CEREBRUM class (native)")
    probseg_labels = traits.List(Str, desc="abbreviation of each probseg's class")
    entropy = File(exists=True, desc="predictive entropy (nats), native T1w grid")
    fine_morph = File(exists=True, desc="morphometry table of the fine protocol")
    aseg_morph = File(exists=True)
    cerebrum7_morph = File(exists=True)
    qc_json = File(exists=True, desc="MC-dropout QC summary")
    conformed_fine_dseg = File(exists=True, desc="labels on the conformed grid (reports)")
    conformed_aseg_dseg = File(exists=True)
    conformed_cerebrum7_dseg = File(exists=True)
    conformed_entropy = File(exists=True)
    mean_cv_percent = traits.Float(desc="mean volume CV over the structures (%), NaN if undefined")
    qc_flag = Str(desc="pass or warn")
    parc_fine_protocol = Str(desc="label protocol of the fused parcellation ensemble")
    parc_fine_dseg = File(exists=True, desc="parcellation labels, native T1w grid")
    parc_fine_dseg_tsv = File(exists=True)
    parc_fine_morph = File(exists=True)
    parc_qc_json = File(exists=True, desc="MC-dropout QC of the parcellation ensemble")
    parc_conformed_fine_dseg = File(exists=True)
    parc_mean_cv_percent = traits.Float()
    parc_qc_flag = Str()


def _run_isolated(spec: dict, cwd: str, what: str = "whole-brain segmentation") -> dict:
    spec_file = os.path.join(cwd, "segment_spec.json")
    out_file = os.path.join(cwd, "segment_outputs.json")
    with open(spec_file, "w") as fh:
        json.dump(spec, fh, indent=2)
    if os.path.exists(out_file):
        os.unlink(out_file)
    proc = subprocess.run([sys.executable, "-m", "bids_app.models.segment_files", spec_file, out_file],
                          capture_output=True, text=True, cwd=cwd)
    with open(os.path.join(cwd, "segment.log"), "w") as fh:
        fh.write(proc.stderr)
    if proc.returncode != 0 or not os.path.exists(out_file):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR: ")), lines[-1] if lines else "")
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}): "
                           f"{last.removeprefix('ERROR: ') or 'no message'}")
    with open(out_file) as fh:
        return json.load(fh)


def _fine_results(out: dict) -> dict:
    """The ``fine_*`` / QC outputs of one ensemble's part of :func:`~bids_app.models.segment_files.segment_files`."""
    fine = out["fine_protocol"]
    return dict(fine_protocol=fine, fine_dseg=out["dseg"][fine], fine_dseg_tsv=out["dseg_tsv"][fine],
                fine_morph=out["morph"][fine], qc_json=out["qc_json"], conformed_fine_dseg=out["conformed_dseg"][fine],
                mean_cv_percent=float("nan") if out["mean_cv_percent"] is None else float(out["mean_cv_percent"]),
                qc_flag=out["qc_flag"])


class WholeBrainSegmentation(SimpleInterface):
    """Whole-brain labels (fine protocol, aseg, CEREBRUM 7), probability maps, entropy, volumes and QC.

    With ``fine_only`` (cortical parcellation): the fine protocol's labels, tables and QC only.
    """

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        from nipype.interfaces.base import isdefined

        spec = {
            "t1w_preproc": self.inputs.t1w_preproc, "icv_mask": self.inputs.icv_mask,
            "source_file": self.inputs.source_file, "checkpoints": [str(c) for c in self.inputs.checkpoints],
            "out_dir": os.path.abspath("segmentation"), "mc_samples": int(self.inputs.mc_samples),
            "tta": self.inputs.tta, "refinement": self.inputs.refinement,
            "seed": int(self.inputs.seed), "device": self.inputs.device, "num_threads": int(self.inputs.num_threads),
            "modality": self.inputs.modality,
            "icv_ml": float(self.inputs.icv_ml) if isdefined(self.inputs.icv_ml) else None,
            "fine_only": bool(self.inputs.fine_only),
            "parc_checkpoints": [str(c) for c in self.inputs.parc_checkpoints]
            if isdefined(self.inputs.parc_checkpoints) else [],
        }
        what = "cortical parcellation" if self.inputs.fine_only else "whole-brain segmentation"
        if self.inputs.isolate:
            out = _run_isolated(spec, runtime.cwd, what)
        else:
            from ..models.segment_files import segment_files

            out = json.loads(json.dumps(segment_files(**spec)))
        self._results.update(_fine_results(out))
        if "parcellation" in out:
            self._results.update({f"parc_{k}": v for k, v in _fine_results(out["parcellation"]).items()})
        if not self.inputs.fine_only:
            self._results.update(
                aseg_dseg=out["dseg"]["aseg"], cerebrum7_dseg=out["dseg"]["cerebrum7"],
                aseg_dseg_tsv=out["dseg_tsv"]["aseg"], cerebrum7_dseg_tsv=out["dseg_tsv"]["cerebrum7"],
                probseg_cerebrum7=out["probseg"], probseg_labels=out["probseg_labels"], entropy=out["entropy"],
                aseg_morph=out["morph"]["aseg"], cerebrum7_morph=out["morph"]["cerebrum7"],
                conformed_aseg_dseg=out["conformed_dseg"]["aseg"],
                conformed_cerebrum7_dseg=out["conformed_dseg"]["cerebrum7"],
                conformed_entropy=out["conformed_entropy"],
            )
        return runtime
