"""``arborseg-evaluate``: compare predicted label images with reference ones.

::

    arborseg-evaluate --pred a.nii.gz b.nii.gz --ref ra.nii.gz rb.nii.gz --protocol aseg \\
        [--pred-protocol dkt-aseg] [--ref-mapping freesurfer] [--subjects s1 s2] \\
        --out-tsv metrics.tsv --out-json summary.json

Predictions and references are matched in pairs (the n-th ``--pred`` with the n-th ``--ref``)
and must share their grid (shape, and affine within 1e-3). A prediction in a finer protocol
(``--pred-protocol``) is merged into ``--protocol`` through the merge tables; a reference in
another labelling (``--ref-mapping freesurfer``, ``aparcNMMjt+aseg``, ``synthseg``...) is mapped
into ``--protocol`` through the chain of mapping tables.

The TSV has one row per subject and structure (background left out) with Dice, HD95, ASSD,
volumetric similarity, F2, balanced accuracy and both volumes; the JSON has, per structure, the
mean and SD of every metric and the agreement (Lin's CCC, Pearson) of the volumes across
subjects, and the overall mean Dice. The functions :func:`evaluate_arrays`,
:func:`summarise_rows` and :func:`evaluate_pairs` do the same on arrays in-process.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import atomic_output
from .core.labels import (PROTOCOLS_DIR, Protocol, ProtocolError, load_mapping, load_protocol, map_labels,
                          merge_chain, merge_labels)
from .core.metrics import METRIC_KEYS, concordance_correlation, pearson, structure_metrics, summarise
from .errors import EXIT_INTERRUPTED, EXIT_PARTICIPANT_FAILED, EXIT_USAGE, ArborSegError, InputFileError

log = logging.getLogger(__name__)

#: Columns of the per-subject, per-structure TSV.
TSV_COLUMNS = ("subject", "label", "name") + METRIC_KEYS

HD95_DEFINITIONS = {
    "pooled": "95th percentile of the surface distances of both directions pooled (medpy hd95)",
    "max": "larger of the two directed 95th percentiles of the surface distances",
}

#: Fewest subjects for the volume agreement (CCC, Pearson) across subjects.
MIN_SUBJECTS_AGREEMENT = 3


class EvaluationUsageError(ArborSegError):
    """The options do not fit together (protocols without a mapping chain...)."""

    exit_code = EXIT_USAGE


class PairMismatchError(InputFileError):
    """A prediction and its reference are not on the same grid."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------------------------
# library functions
# --------------------------------------------------------------------------------------------

def _as_protocol(protocol: Protocol | str) -> Protocol:
    return protocol if isinstance(protocol, Protocol) else load_protocol(protocol)


def _check_in_protocol(labels: np.ndarray, protocol: Protocol) -> np.ndarray:
    known = set(protocol.indices)
    unknown = [int(v) for v in np.unique(labels) if int(v) not in known]
    if unknown:
        raise ProtocolError(f"labels {unknown[:12]} are not in protocol {protocol.name}")
    return labels


def prepare_prediction(pred_labels: np.ndarray, protocol: Protocol | str,
                       pred_protocol: str | None = None) -> np.ndarray:
    """Prediction label image in ``protocol``: merged from ``pred_protocol`` when that is another
    (finer) protocol, otherwise checked to hold only labels of ``protocol`` (``ProtocolError``)."""
    protocol = _as_protocol(protocol)
    if pred_protocol and pred_protocol != protocol.name:
        return merge_labels(pred_labels, load_protocol(pred_protocol), protocol)
    return _check_in_protocol(np.asarray(pred_labels), protocol)


def prepare_reference(ref_labels: np.ndarray, protocol: Protocol | str, ref_mapping: str | None = None,
                      unknown: str = "error") -> np.ndarray:
    """Reference label image in ``protocol``: mapped from the labelling ``ref_mapping`` through the
    chain of mapping tables (e.g. ``aparcNMMjt+aseg`` -> ``dkt-aseg`` -> ``aseg``) when given,
    otherwise checked to hold only labels of ``protocol``. ``unknown`` as in :func:`map_labels`."""
    protocol = _as_protocol(protocol)
    if ref_mapping and ref_mapping != protocol.name:
        out = np.asarray(ref_labels)
        chain = merge_chain(ref_mapping, protocol.name)
        for src, dst in zip(chain[:-1], chain[1:]):
            out = map_labels(out, load_mapping(src, dst), unknown=unknown)
        return out
    return _check_in_protocol(np.asarray(ref_labels), protocol)


def _structure_labels(protocol: Protocol, include_background: bool) -> list[int]:
    return [int(v) for v in protocol.indices if include_background or v != 0]


def evaluate_arrays(pred_labels: np.ndarray, ref_labels: np.ndarray, protocol: Protocol | str,
                    spacing: Sequence[float], subject: str, *, include_background: bool = False,
                    hd95_mode: str = "pooled") -> list[dict]:
    """Rows of metrics (``subject`` + :func:`structure_metrics` keys) of every structure of
    ``protocol`` (background, label 0, left out unless ``include_background``).

    Both images must already be in ``protocol`` (see :func:`prepare_prediction` and
    :func:`prepare_reference`); other values count as background.
    """
    protocol = _as_protocol(protocol)
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"{subject}: prediction {pred_labels.shape} and reference {ref_labels.shape} differ in shape")
    labels = _structure_labels(protocol, include_background)
    names = [protocol.name_of(v) for v in labels]
    rows = structure_metrics(pred_labels, ref_labels, labels, spacing, names, hd95_mode=hd95_mode)
    return [{"subject": str(subject), **row} for row in rows]


def _mean_dice_per_subject(rows: Sequence[dict]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for row in rows:
        if int(row["label"]) != 0:
            per.setdefault(row["subject"], []).append(float(row["dice"]))
    return {s: summarise(v, key=None)["mean"] for s, v in per.items()}


def summarise_rows(rows: Sequence[dict], protocol: Protocol | str, *, hd95_mode: str = "pooled") -> dict:
    """Summary of :func:`evaluate_arrays` rows of one or more subjects (NaN as None, JSON-ready).

    ``structures``: per structure, in protocol order, ``{"mean", "sd", "n"}`` of every metric
    (NaN ignored, sample SD) and, with at least :data:`MIN_SUBJECTS_AGREEMENT` subjects, the
    agreement of predicted and reference volumes across subjects (``volume_ccc``: Lin's
    concordance correlation; ``volume_pearson``), else None. ``overall``: mean Dice over
    structures of the per-structure mean Dice (background excluded), and the SD across subjects
    of the per-subject mean Dice.
    """
    protocol = _as_protocol(protocol)
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    by_label: dict[int, list[dict]] = {}
    for row in rows:
        by_label.setdefault(int(row["label"]), []).append(row)
    order = [v for v in protocol.indices if v in by_label] + sorted(set(by_label) - set(protocol.indices))
    structures = []
    for value in order:
        group = by_label[value]
        entry = {"label": int(value), "name": group[0]["name"], "n_subjects": len(group)}
        for key in METRIC_KEYS:
            entry[key] = summarise(group, key)
        agree = len(group) >= MIN_SUBJECTS_AGREEMENT
        pred_vol = [r["volume_pred_mm3"] for r in group]
        ref_vol = [r["volume_ref_mm3"] for r in group]
        entry["volume_ccc"] = concordance_correlation(pred_vol, ref_vol) if agree else None
        entry["volume_pearson"] = pearson(pred_vol, ref_vol) if agree else None
        structures.append(entry)
    structure_means = [s["dice"]["mean"] for s in structures if s["label"] != 0]
    per_subject = _mean_dice_per_subject(rows)
    overall_mean = summarise(structure_means, key=None)
    summary = {
        "protocol": protocol.name,
        "n_subjects": len(subjects),
        "subjects": subjects,
        "hd95_definition": HD95_DEFINITIONS.get(hd95_mode, hd95_mode),
        "overall": {
            "dice_mean": overall_mean["mean"],
            "dice_sd_across_subjects": summarise(per_subject.values(), key=None)["sd"],
            "n_structures": overall_mean["n"],
            "mean_dice_per_subject": per_subject,
        },
        "structures": structures,
    }
    return _json_ready(summary)


def evaluate_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
                   protocol: Protocol | str, *, pred_protocol: str | None = None,
                   ref_mapping: str | None = None, unknown_ref_labels: str = "error",
                   include_background: bool = False, hd95_mode: str = "pooled") -> tuple[list[dict], dict]:
    """``(rows, summary)`` of ``(subject, pred_labels, ref_labels, spacing)`` pairs.

    Each prediction goes through :func:`prepare_prediction` and each reference through
    :func:`prepare_reference` first; ``pairs`` may be a generator, so that only one pair is in
    memory at a time.
    """
    protocol = _as_protocol(protocol)
    rows: list[dict] = []
    for subject, pred, ref, spacing in pairs:
        pred = prepare_prediction(pred, protocol, pred_protocol)
        ref = prepare_reference(ref, protocol, ref_mapping, unknown_ref_labels)
        rows.extend(evaluate_arrays(pred, ref, protocol, spacing, subject,
                                    include_background=include_background, hd95_mode=hd95_mode))
    return rows, summarise_rows(rows, protocol, hd95_mode=hd95_mode)


def _json_ready(obj):
    """NaN/inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def load_label_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``(labels int32, affine, voxel size)`` of a 3D label NIfTI; ``InputFileError`` when unusable."""
    import nibabel as nb

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputFileError(path, f"cannot be read as a NIfTI image ({exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(path, f"a label image must be 3D, this one has shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data, atol=1e-3, rtol=0):
            raise InputFileError(path, "is not a label image (it has non-integer values)")
        data = rounded
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data.astype(np.int32, copy=False), np.asarray(img.affine, dtype=float), zooms


def check_same_grid(pred_path, pred_shape, pred_affine, ref_path, ref_shape, ref_affine, atol: float = 1e-3) -> None:
    """``PairMismatchError`` naming both files when the grids differ."""
    if tuple(pred_shape) != tuple(ref_shape):
        raise PairMismatchError(pred_path, f"shape {tuple(pred_shape)} differs from {tuple(ref_shape)} of the "
                                           f"reference {ref_path}")
    if not np.allclose(pred_affine, ref_affine, atol=atol, rtol=0):
        worst = float(np.abs(np.asarray(pred_affine) - np.asarray(ref_affine)).max())
        raise PairMismatchError(pred_path, f"affine differs from that of the reference {ref_path} "
                                           f"(by up to {worst:.4g}, more than {atol:g})")


def subject_names(pred_paths: Sequence[str | Path]) -> list[str]:
    """``sub-X[_ses-Y]`` of each prediction file name, or the file name without its extension;
    the full names where that would not tell the subjects apart."""
    def stem(p: Path) -> str:
        return re.sub(r"\.nii(\.gz)?$", "", p.name)

    paths = [Path(p) for p in pred_paths]
    names = []
    for p in paths:
        m = re.search(r"(sub-[A-Za-z0-9]+)(_ses-[A-Za-z0-9]+)?", p.name)
        names.append(m.group(0) if m else stem(p))
    if len(set(names)) < len(names):
        names = [stem(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def write_tsv(rows: Sequence[dict], path: str | Path) -> None:
    """Rows -> TSV (``n/a`` for NaN), written atomically."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if not math.isfinite(v) else format(float(v), ".10g")
        return str(v)

    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for row in rows:
            writer.writerow([fmt(row[c]) for c in TSV_COLUMNS])


def write_json(summary: dict, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _known(kind: str) -> list[str]:
    if kind == "protocols":
        return sorted(p.name.replace("_dseg.tsv", "") for p in PROTOCOLS_DIR.glob("*_dseg.tsv"))
    return sorted({p.stem.split("_to_")[0] for p in (PROTOCOLS_DIR / "mappings").glob("*_to_*.tsv")})


def get_parser() -> argparse.ArgumentParser:
    protocols = _known("protocols")
    parser = argparse.ArgumentParser(prog="arborseg-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", nargs="+", type=Path, required=True, metavar="NIFTI",
                        help="predicted label images")
    parser.add_argument("--ref", nargs="+", type=Path, required=True, metavar="NIFTI",
                        help="reference label images, in the order of --pred")
    parser.add_argument("--protocol", required=True, choices=protocols,
                        help="label protocol in which the images are compared")
    parser.add_argument("--pred-protocol", choices=protocols,
                        help="protocol of the predictions when finer than --protocol (merged into it)")
    parser.add_argument("--ref-mapping", metavar="NAME",
                        help="labelling of the references, mapped into --protocol through the mapping tables "
                             f"(one of: {', '.join(sorted(set(_known('mappings')) | set(protocols)))})")
    parser.add_argument("--unknown-ref-labels", choices=("error", "zero"), default="error",
                        help="reference labels missing from the mapping tables: stop (default) or set to 0")
    parser.add_argument("--subjects", nargs="+", metavar="ID", help="subject names, in the order of --pred "
                        "(default: the sub-X[_ses-Y] part of the prediction file names)")
    parser.add_argument("--hd95", choices=tuple(HD95_DEFINITIONS), default="pooled",
                        help="HD95 definition: pooled (medpy, default) or max of the two directed percentiles")
    parser.add_argument("--out-tsv", type=Path, help="per-subject, per-structure metrics")
    parser.add_argument("--out-json", type=Path, help="summary across subjects")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _load_pairs(opts, protocol: Protocol, subjects: Sequence[str]):
    """Generator of ``(subject, pred, ref, spacing)`` in ``protocol``; errors name the file."""
    for subject, pred_path, ref_path in zip(subjects, opts.pred, opts.ref):
        pred, pred_affine, _ = load_label_image(pred_path)
        ref, ref_affine, spacing = load_label_image(ref_path)
        check_same_grid(pred_path, pred.shape, pred_affine, ref_path, ref.shape, ref_affine)
        try:
            pred = prepare_prediction(pred, protocol, opts.pred_protocol)
        except ProtocolError as exc:
            hint = "" if opts.pred_protocol else " (set --pred-protocol?)"
            raise InputFileError(pred_path, f"{exc}{hint}") from None
        try:
            ref = prepare_reference(ref, protocol, opts.ref_mapping, opts.unknown_ref_labels)
        except ProtocolError as exc:
            hint = "" if opts.ref_mapping else " (set --ref-mapping?)"
            raise InputFileError(ref_path, f"{exc}{hint}") from None
        log.info("%s: %s vs %s", subject, pred_path, ref_path)
        yield subject, pred, ref, spacing


def main(argv: list[str] | None = None) -> int:
    from .cli.run import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    opts = parser.parse_args(argv)
    if len(opts.pred) != len(opts.ref):
        parser.error(f"{len(opts.pred)} --pred images but {len(opts.ref)} --ref images; they are matched in pairs")
    if opts.subjects is not None:
        if len(opts.subjects) != len(opts.pred):
            parser.error(f"{len(opts.subjects)} --subjects for {len(opts.pred)} image pairs")
        if len(set(opts.subjects)) != len(opts.subjects):
            parser.error("--subjects are not unique")
    if opts.out_tsv is None and opts.out_json is None:
        parser.error("nothing to write: give --out-tsv and/or --out-json")
    setup_logging(opts.verbose)
    try:
        protocol = load_protocol(opts.protocol)
        try:
            if opts.pred_protocol:
                merge_chain(opts.pred_protocol, protocol.name)
            if opts.ref_mapping:
                merge_chain(opts.ref_mapping, protocol.name)
        except ProtocolError as exc:
            raise EvaluationUsageError(str(exc)) from None
        subjects = opts.subjects or subject_names(opts.pred)
        rows: list[dict] = []
        for subject, pred, ref, spacing in _load_pairs(opts, protocol, subjects):
            subject_rows = evaluate_arrays(pred, ref, protocol, spacing, subject, hd95_mode=opts.hd95)
            dice_s = summarise(subject_rows, "dice")
            log.info("%s: mean Dice %s over the %d of %d structures present", subject, _fmt(dice_s["mean"]),
                     dice_s["n"], len(subject_rows))
            rows.extend(subject_rows)
        summary = summarise_rows(rows, protocol, hd95_mode=opts.hd95)
        if opts.out_tsv:
            write_tsv(rows, opts.out_tsv)
            log.info("wrote %s", opts.out_tsv)
        if opts.out_json:
            write_json(summary, opts.out_json)
            log.info("wrote %s", opts.out_json)
        overall = summary["overall"]
        log.info("%d subjects, %s: mean Dice %s (SD across subjects %s)", len(subjects), protocol.name,
                 _fmt(overall["dice_mean"]), _fmt(overall["dice_sd_across_subjects"]))
        return 0
    except ArborSegError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        log.error("unexpected error: %s: %s (run with -v for the traceback)", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EXIT_PARTICIPANT_FAILED


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
