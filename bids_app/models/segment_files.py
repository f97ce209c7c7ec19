"""File adapter of the whole-brain segmentation: NIfTI files in, label maps, tables and QC out.

:func:`segment_files` reads the conformed T1w and its intracranial mask, runs
:func:`bids_app.models.segment.segment_volume`, and writes into ``out_dir``:

* on the conformed grid (for the reports): ``conformed_<protocol>_dseg.nii.gz`` for the fine
  protocol, ``aseg`` and ``cerebrum7``, and ``conformed_entropy.nii.gz``;
* on the native grid of the raw T1w (the derivatives): ``<protocol>_dseg.nii.gz`` (argmax on the
  conformed grid, then nearest neighbour through the two affines), one
  ``cerebrum7_label-<abbreviation>_probseg.nii.gz`` per CEREBRUM class and ``entropy.nii.gz``
  (linear);
* ``<protocol>_morph.tsv`` (volumes from the conformed labels, see
  :mod:`bids_app.core.morphometry`), ``<protocol>_dseg.tsv`` (the protocol tables) and ``qc.json``.

Voxels outside the intracranial mask are background in every label map and probability map
(:func:`bids_app.models.segment.segment_volume` with ``mask``).

The intensity refinement (``refinement="intensity"``) needs the T1w's own detail at the conformed
resolution: when a voxel edge of the raw T1w is coarser than the models' grid (thick slices, the
``InputResolution`` warning) it is skipped, with a warning; the QC JSON's ``Refinement`` says what
ran and ``RefinementSkipped`` why not (in the cross-validation, simulated 5 mm slices lost 0.001 to
0.011 aseg Dice with it).

``fine_only=True`` (the cortical parcellation ensemble) writes only the models' own protocol:
its label maps, ``dseg.tsv``, ``morph.tsv`` and ``qc.json`` (with the deep-structure QC when the
protocol merges into ``deep14``); no coarser protocols, probability maps or entropy.

``parc_checkpoints`` (the pipeline's default when both branches run) also runs the cortical
parcellation ensemble, unrefined like this one, fuses the two
(:func:`bids_app.models.segment.fuse_parcellation`: the refinement then runs once, on the fused
whole-brain probabilities) and writes the parcellation's ``fine_only`` outputs into
``out_dir/parcellation``.

Memory: the fine protocol's probabilities on the conformed grid, plus one conformed and one
native volume at a time; the probabilities are released before the label maps are resampled.
With ``parc_checkpoints``, both ensembles' probabilities are held during the fusion.

``python -m bids_app.models.segment_files SPEC.json OUTPUTS.json`` runs it in a fresh process
(what the Nipype interface does): PyTorch's OpenMP thread pool does not survive ``fork()``, so a
network must not run in a worker forked from a process that already used it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bids import atomic_write_json, atomic_write_text, seg_entity
from ..core import images
from ..core.conform import input_resolution
from ..core.files import save_atomic
from ..core.labels import ProtocolError, load_protocol, merge_chain
from ..core.morphometry import morphometry_rows, write_morphometry_tsv
from ..core.resample import resample_to_grid
from .segment import (COARSE_PROTOCOLS, _voxel_triplet, coarse_cv, coarse_labels, coarse_probability, coarse_thresholds,
                      fuse_parcellation, read_manifests, segment_volume, structure_flag)

log = logging.getLogger(__name__)

#: the protocol whose classes get one probseg file each
PROBSEG_PROTOCOL = "cerebrum7"
#: the protocol of the deep grey-matter QC summary
DEEP_PROTOCOL = "deep14"


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _dseg_tsv(protocol) -> str:
    rows = protocol.to_tsv_rows()
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def structure_rows(protocol, cv: Sequence[float], thresholds: Sequence[float]) -> list[dict]:
    """QC JSON rows of a protocol's structures (background left out): CV, threshold, flag."""
    out = []
    for k, (index, name) in enumerate(zip(protocol.indices, protocol.names)):
        if k == 0 and index == 0:
            continue
        out.append({"index": int(index), "name": name, "cv_percent": _num(cv[k]),
                    "qc_threshold_percent": _num(thresholds[k]),
                    "qc_flag": structure_flag(float(cv[k]), float(thresholds[k]))})
    return out


def calibration_summary(result) -> dict:
    """The QC JSON's account of where the thresholds came from."""
    cal = result.qc_calibration
    if not cal:
        return {"Calibrated": False,
                "Method": f"default threshold for {result.modality} (no calibration for this ensemble)"}
    return {"Calibrated": True, "Method": cal.get("method"), "Source": cal.get("source"),
            "MCSamples": cal.get("mc_samples"), "TestTimeAugmentation": cal.get("tta", "none"),
            "Study": cal.get("study")}


def refinement_for_input(refinement: str, zooms: Sequence[float], checkpoints: Sequence[str]) -> tuple[str, str | None]:
    """The refinement to run for a raw T1w with voxel sizes ``zooms``, and why it was skipped (None: it was not).

    ``intensity`` becomes ``none`` when the thickest voxel edge is coarser than the models' coarsest
    grid: the conformed image then holds interpolated, not measured, detail along that axis.
    """
    if refinement == "none":
        return refinement, None
    model_voxel = max(max(_voxel_triplet(m["voxel_size_mm"])) for m in read_manifests(checkpoints))
    geometry = input_resolution(zooms, model_voxel)  # the same rule as the QC's InputResolution warning
    if geometry["Flag"] == "warn":
        return "none", (f"the intensity refinement was skipped: the raw T1w's voxels are {geometry['ThickestMM']:.2f} "
                        f"mm thick, coarser than the models' {model_voxel:.2f} mm grid, so its conformed intensities "
                        "do not hold the detail the refinement relies on")
    return refinement, None


def segment_files(t1w_preproc: str, icv_mask: str, source_file: str, checkpoints: Sequence[str], *, out_dir: str,
                  mc_samples: int = 15, seed: int = 42, device: str = "auto", num_threads: int | None = None,
                  modality: str = "T1w", icv_ml: float | None = None, fine_only: bool = False,
                  tta: str = "none", refinement: str = "none", parc_checkpoints: Sequence[str] = ()) -> dict:
    """Segment, write every output into ``out_dir``; returns the paths and the QC summary (JSON-friendly).

    ``fine_only``: only the models' own protocol (see the module docstring). ``parc_checkpoints``:
    a cortical parcellation ensemble run and fused with this one
    (:func:`bids_app.models.segment.fuse_parcellation`); its outputs are written into
    ``out_dir/parcellation`` as with ``fine_only`` and returned under ``"parcellation"``.
    """
    import nibabel as nb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = nb.load(str(t1w_preproc))
    vox = tuple(float(v) for v in images.zooms_of(conf))
    mask = np.asarray(nb.load(str(icv_mask)).dataobj) > 0.5
    if mask.shape != conf.shape[:3]:
        raise ValueError(f"{icv_mask}: shape {mask.shape} differs from the T1w's {conf.shape[:3]}")
    image = np.asarray(conf.dataobj, dtype=np.float32) * mask
    if icv_ml is None or not icv_ml > 0:
        icv_ml = float(mask.sum()) * float(np.prod(vox)) / 1000.0

    native = nb.load(str(source_file))
    refinement, skipped = refinement_for_input(refinement, images.zooms_of(native),
                                               list(checkpoints) + list(parc_checkpoints))
    if skipped:
        log.warning("%s: %s", source_file, skipped)
    common = dict(mc_samples=mc_samples, seed=seed, device=device, num_threads=num_threads, modality=modality,
                  image_voxel_mm=vox, mask=mask, tta=tta)
    parc = None
    if parc_checkpoints:
        if fine_only:
            raise ValueError("parc_checkpoints cannot be fused into a fine_only (parcellation) run")
        parc = segment_volume(image, list(parc_checkpoints), refinement="none", **common)
        result = segment_volume(image, list(checkpoints), refinement="none", **common)
        fuse_parcellation(result, parc, image, mask=mask, refinement=refinement)
        parc.probabilities = None  # its labels are taken; only the whole-brain probabilities are written
    else:
        result = segment_volume(image, list(checkpoints), refinement=refinement, **common)
    del image, mask
    place = dict(conf=conf, native=native, vox=vox, icv_ml=icv_ml, source_file=source_file, skipped=skipped)
    outputs = _write_outputs(result, out, fine_only=fine_only, **place)
    if parc is not None:
        outputs["parcellation"] = _write_outputs(parc, out / "parcellation", fine_only=True, **place)
    return outputs


def _write_outputs(result, out: Path, *, conf, native, vox, icv_ml: float, source_file: str, fine_only: bool,
                   skipped: str | None) -> dict:
    """Every output of one ensemble's result into ``out`` (see the module docstring); the paths and QC summary."""
    out.mkdir(parents=True, exist_ok=True)
    fine = result.protocol
    protocols = [fine]
    if not fine_only:
        protocols += [load_protocol(name) for name in COARSE_PROTOCOLS if name != fine.name]
    outputs: dict[str, Any] = {"fine_protocol": fine.name, "protocols": [p.name for p in protocols],
                               "fine_only": bool(fine_only), "dseg": {}, "dseg_tsv": {}, "conformed_dseg": {},
                               "morph": {}}

    # labels (conformed grid), QC, tables
    labels: dict[str, np.ndarray] = {}
    qc_protocols: dict[str, dict] = {}
    for protocol in protocols:
        if protocol.name == fine.name:
            cv, mcv, flag = result.cv_percent, result.mean_cv_percent, result.qc_flag
            labels[protocol.name] = result.labels
        else:
            cv, mcv, flag = coarse_cv(result, protocol)
            labels[protocol.name] = coarse_labels(result, protocol)
        limit, thresholds = coarse_thresholds(result, protocol)
        flags = [structure_flag(float(c), float(t)) for c, t in zip(cv, thresholds)]
        rows = morphometry_rows(labels[protocol.name], vox, icv_ml, protocol, cv_percent=cv, qc_flags=flags)
        name = protocol.name
        outputs["morph"][name] = write_morphometry_tsv(rows, out / f"{name}_morph.tsv")
        outputs["dseg_tsv"][name] = str(atomic_write_text(out / f"{name}_dseg.tsv", _dseg_tsv(protocol)))
        outputs["conformed_dseg"][name] = save_atomic(images.like(conf, labels[name], dtype=np.int16),
                                                      out / f"conformed_{name}_dseg.nii.gz")
        qc_protocols[name] = {"Segmentation": seg_entity(name), "MeanCVPercent": _num(mcv),
                              "QCThresholdPercent": _num(limit), "QCFlag": flag,
                              "Structures": structure_rows(protocol, cv, thresholds)}
    deep = None
    try:
        merge_chain(fine.name, DEEP_PROTOCOL)
        deep_protocol = load_protocol(DEEP_PROTOCOL)
        cv, mcv, flag = coarse_cv(result, deep_protocol)
        limit, thresholds = coarse_thresholds(result, deep_protocol)
        deep = {"Segmentation": seg_entity(DEEP_PROTOCOL), "MeanCVPercent": _num(mcv),
                "QCThresholdPercent": _num(limit), "QCFlag": flag,
                "Structures": structure_rows(deep_protocol, cv, thresholds)}
    except ProtocolError:
        log.info("protocol %s does not merge into %s: no deep-structure QC", fine.name, DEEP_PROTOCOL)

    # native grid of the raw T1w
    n_shape, n_affine = tuple(int(s) for s in native.shape[:3]), np.asarray(native.affine, dtype=float)
    model_voxel = max(max(v) for v in result.model_voxel_sizes_mm) if result.model_voxel_sizes_mm else max(vox)
    geometry = input_resolution(images.zooms_of(native), model_voxel)
    if geometry["Flag"] == "warn":
        log.warning("%s: %s", source_file, geometry["Reason"])

    def to_native(data: np.ndarray, order: int, dtype) -> Any:
        return images.new_image(resample_to_grid(data, conf.affine, n_shape, n_affine, order=order, dtype=dtype),
                                n_affine, dtype=dtype)

    outputs["probseg"], outputs["probseg_labels"] = [], []
    if not fine_only:
        probseg = load_protocol(PROBSEG_PROTOCOL)
        for position, (index, abbreviation) in enumerate(zip(probseg.indices, probseg.abbreviations)):
            if position == 0 and index == 0:
                continue
            prob = coarse_probability(result, probseg, position)
            path = out / f"{probseg.name}_label-{abbreviation}_probseg.nii.gz"
            outputs["probseg"].append(save_atomic(to_native(prob, 1, np.float32), path))
            outputs["probseg_labels"].append(abbreviation)
            del prob
    result.probabilities = None  # the largest array: gone before the label maps are resampled

    for protocol in protocols:
        name = protocol.name
        outputs["dseg"][name] = save_atomic(to_native(labels[name], 0, np.int16), out / f"{name}_dseg.nii.gz")
    if not fine_only:
        outputs["conformed_entropy"] = save_atomic(images.like(conf, result.entropy, dtype=np.float32),
                                                   out / "conformed_entropy.nii.gz")
        outputs["entropy"] = save_atomic(to_native(result.entropy, 1, np.float32), out / "entropy.nii.gz")

    models = []
    for manifest in result.manifests:
        models.append({"Name": manifest.get("name"), "Version": manifest.get("version"),
                       "Architecture": manifest.get("architecture"), "VoxelSizeMM": manifest.get("voxel_size_mm"),
                       "LabelProtocol": manifest.get("label_protocol", {}).get("name"),
                       "SHA256": manifest.get("sha256")})
    what = "cortical parcellation" if fine_only else "whole-brain segmentation"
    qc = {
        "Description": f"Monte-Carlo dropout quality control of the {what}: coefficient of "
                       "variation (CV) of every structure's volume over the MC samples",
        "Task": "parcellation" if fine_only else "wholebrain",
        "Models": models, "MCSamples": result.n_samples, "Seed": result.seed, "Modality": result.modality,
        "TestTimeAugmentation": result.tta, "Refinement": result.refinement,
        "RefinementSkipped": skipped, "Fusion": result.fusion, "LabelProtocol": fine.name,
        "MeanCVPercent": _num(result.mean_cv_percent),
        "QCThresholdPercent": result.qc_threshold, "QCFlag": result.qc_flag,
        "QCCalibration": calibration_summary(result),
        "Deep14MeanCVPercent": deep["MeanCVPercent"] if deep else None,
        "ICVML": round(float(icv_ml), 3), "VoxelSizeMM": list(vox), "InputResolution": geometry,
        "Protocols": dict(qc_protocols, **({DEEP_PROTOCOL: deep} if deep else {})),
        "TimingsSeconds": {k: round(float(v), 3) for k, v in result.timings.items()},
    }
    outputs["qc_json"] = str(atomic_write_json(out / "qc.json", qc))
    outputs["mean_cv_percent"] = _num(result.mean_cv_percent)
    outputs["qc_flag"] = result.qc_flag
    return outputs


def spec_main(argv: Sequence[str] | None, module: str, function) -> int:
    """``python -m <module> SPEC.json OUTPUTS.json``: ``function(**spec)`` in this fresh process, its
    outputs written to OUTPUTS.json; exit 1 with the error on the last line of stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        sys.stderr.write(f"usage: python -m {module} SPEC.json OUTPUTS.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        spec = json.loads(Path(argv[0]).read_text())
        outputs = function(**spec)
        atomic_write_json(Path(argv[1]), outputs)
    except Exception as exc:  # the parent turns the last line into the node's error
        import traceback

        traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"ERROR: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bids_app.models.segment_files SPEC.json OUTPUTS.json``; exit 1 with one line on failure."""
    return spec_main(argv, "bids_app.models.segment_files", segment_files)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
