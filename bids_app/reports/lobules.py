"""The cerebellar-lobule part of the reports: reportlets, the subject-report section and its names.

The cerebellum branch works in the MNI cerebellum crop (``space-<template>``, 1 mm, lobules
protocol: 13 structures per side, see ``bids_app/data/protocols/lobules_dseg.tsv``). This module
draws its figures and assembles the "Cerebellar lobules" section of the subject report (HTML, and
the PDF of :mod:`bids_app.reports.pdf`) from the derivatives alone, so ``--reports-only`` works too.

Names (``<source>`` = ``sub-X[_ses-Y][_acq-..][_run-..]``, ``<tpl>`` = the template)::

    anat/<source>_space-<tpl>_seg-cerebellum_dseg.nii.gz       lobule labels in the crop
    anat/<source>_seg-cerebellum_morph.tsv                     volumes (columns of core/morphometry.py)
    anat/<source>_seg-cerebellum_qc.json                       MC-dropout QC (keys as seg-wholebrain_qc.json)
    figures/<source>_space-<tpl>_seg-cerebellum_dseg.svg                 fills + outlines mosaic
    figures/<source>_space-<tpl>_seg-cerebellum_desc-render_dseg.png     3D-looking surface overview
    figures/<source>_seg-cerebellum_desc-volumes_dseg.svg                left/right volume bars
    figures/<source>_space-<tpl>_seg-cerebellum_desc-<x>_uncertainty.svg uncertainty map (optional)
    figures/<source>_space-<tpl>_seg-cerebellum_desc-superres_T1w.svg    T1w crop | super-resolved (optional)
    figures/<source>_space-<tpl>_seg-cerebellum_desc-t2_T2w.svg          T1w crop | T2w (optional)
    <label>_seg-cerebellum_report.pdf  (next to <label>.html, at the root of the output folder)

QC JSON keys read besides the whole-brain ones (``Models``, ``LabelProtocol``, ``MCSamples``,
``Seed``, ``MeanCVPercent``, ``QCThresholdPercent``, ``QCFlag``): ``atlas_prior`` (or
``AtlasPrior``): ``{"used": bool, "reason": str, "library": str, "n_cases": int}`` (or a bare
bool); ``t2`` (or ``T2``): ``"real" | "synthetic" | "none"`` with ``t2_details``: ``{"file": str,
"model": str, "version": str, "reason": str}`` (or ``t2`` as that object with a ``source``); and
``superres``: a bool with ``superres_details``: ``{"model", "version", "voxel_size_mm", "reason"}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..bids import derivative_path, source_entities
from ..core.qc_calibration import origin_text

LOGGER = logging.getLogger(__name__)

__all__ = [
    "SEGMENTATION", "PROTOCOL", "PDF_SUFFIX", "cerebellum_files", "figure_entities", "lobule_colors",
    "lobule_legend", "lobule_section", "lobule_pdf_path", "plot_lobule_mosaic", "plot_lobule_overview",
    "plot_lobule_volumes", "atlas_prior_line", "t2_line", "superres_line", "split_name",
]

#: ``seg-<label>`` of every cerebellum derivative and figure
SEGMENTATION = "cerebellum"
#: label protocol of the lobule maps
PROTOCOL = "lobules"
#: name of the PDF next to ``<label>.html``: ``<label>_seg-cerebellum_report.pdf``
PDF_SUFFIX = "_seg-cerebellum_report.pdf"
#: ``desc`` of the uncertainty figure when the workflow is not told otherwise
DEFAULT_UNCERTAINTY_DESC = "entropy"
#: rows whose ``qc_flag`` is this are highlighted
FLAGGED = "warn"

CAPTIONS = {
    "render": "Overview: the lit outer surface of the lobule labels seen from four sides (ray-cast rendering of "
              "the label map, not a slice). Colours as in the legend; the left and right lobules share a colour.",
    "mosaic": "Lobules (semi-transparent fills and outlines) on the T1w in the {template} cerebellum crop: "
              "sagittal, coronal and axial slices spread over the labelled region.",
    "volumes": "Volumes of the left (to the left) and right (to the right) lobules; whiskers: the volume's "
               "standard deviation over the Monte-Carlo dropout samples (volume x CV). Red-edged bars are "
               "flagged by the QC.",
    "uncertainty": "Voxel-wise uncertainty of the lobule segmentation ({desc}) over the crop: bright where the "
                   "networks disagree, normally only along the boundaries between lobules.",
    "superres": "The T1w in the {template} cerebellum crop (left) and its x2 super-resolution (right) on the same "
                "slices, with a zoomed detail of the middle sagittal slice. {line}",
    "t2": "The T1w in the {template} cerebellum crop (left) and the T2w of the cerebellum branch (right) on the "
          "same slices. {line}",
}


# --------------------------------------------------------------------------- names
def _source_entities(source_file: str | os.PathLike) -> dict[str, Any]:
    return source_entities(str(source_file))


def cerebellum_files(output_dir: str | os.PathLike, source_file: str | os.PathLike,
                     template: str) -> dict[str, Path]:
    """Paths of the cerebellum derivatives the section is built from (``dseg``, ``morph``, ``qc``)."""
    ents = _source_entities(source_file)

    def path(**entities) -> Path:
        return Path(output_dir) / derivative_path({**ents, **entities})

    return {
        "dseg": path(space=template, segmentation=SEGMENTATION, suffix="dseg", extension=".nii.gz"),
        "morph": path(segmentation=SEGMENTATION, suffix="morph", extension=".tsv"),
        "qc": path(segmentation=SEGMENTATION, suffix="qc", extension=".json"),
    }


def figure_entities(template: str, uncertainty_desc: str = DEFAULT_UNCERTAINTY_DESC) -> dict[str, dict[str, Any]]:
    """Entities of the lobule reportlets under ``figures/`` (add the source's entities)."""
    base = {"datatype": "figures", "segmentation": SEGMENTATION}
    return {
        "render": {**base, "space": template, "desc": "render", "suffix": "dseg", "extension": ".png"},
        "mosaic": {**base, "space": template, "suffix": "dseg", "extension": ".svg"},
        "volumes": {**base, "desc": "volumes", "suffix": "dseg", "extension": ".svg"},
        "uncertainty": {**base, "space": template, "desc": uncertainty_desc, "suffix": "uncertainty",
                        "extension": ".svg"},
        "superres": {**base, "space": template, "desc": "superres", "suffix": "T1w", "extension": ".svg"},
        "t2": {**base, "space": template, "desc": "t2", "suffix": "T2w", "extension": ".svg"},
    }


def lobule_pdf_path(output_dir: str | os.PathLike, label: str) -> Path:
    """``<output_dir>/<label>_seg-cerebellum_report.pdf`` (``label``: ``sub-01`` or ``sub-01_ses-A``)."""
    return Path(output_dir) / f"{label}{PDF_SUFFIX}"


# ------------------------------------------------------------------ label table
def split_name(name: str) -> tuple[str | None, str]:
    """``Left-Cerebellum-Lobule-Crus-I`` -> ``("Left", "Crus I")``; ``...-White-Matter`` -> ``"white matter"``."""
    side = None
    for s in ("Left", "Right"):
        if name.startswith(s + "-"):
            side, name = s, name[len(s) + 1:]
            break
    name = re.sub(r"^Cerebellum-", "", name)
    name = re.sub(r"^Lobule-", "", name)
    name = name.replace("Crus-", "Crus ").replace("White-Matter", "white matter")
    return side, name


def display_name(name: str) -> str:
    side, part = split_name(name)
    return f"{side} {part}" if side else part


def lobule_colors(protocol: str = PROTOCOL) -> dict[int, str]:
    """Label value -> colour (the ``color`` column of the protocol's ``dseg.tsv``)."""
    from ..core.labels import load_protocol

    prot = load_protocol(protocol)
    return {int(i): str(c) for i, c in zip(prot.indices, prot.colors) if c and int(i) != 0}


def lobule_legend(protocol: str = PROTOCOL) -> list[tuple[str, str]]:
    """Legend entries ``(name, colour)``: one per lobule when its left and right share a colour."""
    from ..core.labels import load_protocol

    prot = load_protocol(protocol)
    parts: dict[str, list[tuple[str | None, str]]] = {}
    for index, name, color in zip(prot.indices, prot.names, prot.colors or [""] * len(prot.indices)):
        if int(index) == 0:
            continue
        side, part = split_name(name)
        parts.setdefault(part, []).append((side, str(color or "#ffd60a")))
    entries = []
    for part, items in parts.items():
        if len({c for _, c in items}) == 1:
            entries.append((part, items[0][1]))
        else:
            entries.extend((f"{side} {part}" if side else part, color) for side, color in items)
    return entries


# ------------------------------------------------------------------------- figures
def plot_lobule_mosaic(t1w: Any, dseg: Any, out_file: str | os.PathLike, *, protocol: str = PROTOCOL,
                       fill_alpha: float = 0.35, title: str | None = "Cerebellar lobules") -> Path:
    """Fills and outlines of the lobules on the crop T1w (sagittal, coronal, axial), with the legend."""
    from .reportlets import plot_label_overlay

    return plot_label_overlay(t1w, dseg, out_file, colors=lobule_colors(protocol), legend=lobule_legend(protocol),
                              fill_alpha=fill_alpha, title=title)


def plot_lobule_overview(dseg: Any, out_file: str | os.PathLike, *, protocol: str = PROTOCOL,
                         title: str | None = "Cerebellar lobules: surface overview") -> Path:
    """The 3D-looking overview (posterior, superior, inferior and left views), with the legend."""
    from .reportlets import plot_label_render

    return plot_label_render(dseg, out_file, colors=lobule_colors(protocol), legend=lobule_legend(protocol),
                             title=title)


def _read_json(path: str | os.PathLike | None) -> dict:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        LOGGER.warning("cannot read the cerebellum QC file %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        LOGGER.warning("cerebellum QC file %s: expected a JSON object, got %s", path, type(data).__name__)
        return {}
    return data


def plot_lobule_volumes(morph_tsv: str | os.PathLike, out_file: str | os.PathLike, *,
                        qc_json: str | os.PathLike | None = None, protocol: str = PROTOCOL,
                        title: str | None = None) -> Path:
    """Left/right ("butterfly") bars of the lobule volumes of a ``_morph.tsv``, in the protocol's
    colours, with the MC-dropout spread (volume x CV) as whiskers and QC-flagged bars edged in red.
    Structures without a side are drawn on the right half."""
    from ..core.morphometry import read_morphometry_tsv
    from . import reportlets as rl

    out_file = Path(out_file)
    rl._fmt(out_file)
    try:
        rows = read_morphometry_tsv(morph_tsv)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{morph_tsv}: not a readable _morph.tsv ({exc})") from exc
    colors = lobule_colors(protocol)
    qc = _read_json(qc_json)
    parts: dict[str, dict[str, dict]] = {}
    for row in rows:
        side, part = split_name(str(row.get("name") or row.get("index")))
        parts.setdefault(part, {})[side or "Right"] = row
    names = list(parts)
    n = max(len(names), 1)
    row_in = 0.26
    bottom_in = 0.78  # tick labels, axis label and the footnote under the bars
    fig_h = 0.62 + n * row_in + bottom_in
    fig = rl._new_figure(rl._FIG_WIDTH_IN, fig_h)
    ax = fig.add_axes((1.55 / rl._FIG_WIDTH_IN, bottom_in / fig_h, 1 - 2.25 / rl._FIG_WIDTH_IN, n * row_in / fig_h))
    ax.set_facecolor(rl.BG)
    ax.set_gid("volumes-axes")
    for key, spine in ax.spines.items():
        spine.set_visible(key == "bottom")
        spine.set_color(rl.MUTED)
    ax.tick_params(axis="x", colors=rl.FG, labelsize=rl._FONT)
    ax.tick_params(axis="y", colors=rl.FG, labelsize=rl._FONT, length=0)
    biggest = 0.0
    n_flagged = 0
    flagged_parts = set()
    for y, part in enumerate(names):
        for side, sign in (("Left", -1.0), ("Right", 1.0)):
            row = parts[part].get(side)
            if row is None:
                continue
            vol = row.get("volume_mm3")
            if vol is None or not math.isfinite(vol):
                continue
            cv = row.get("mc_cv_percent")
            err = vol * cv / 100.0 if cv is not None and math.isfinite(cv) else None
            flagged = str(row.get("qc_flag") or "").lower() == FLAGGED
            n_flagged += flagged
            if flagged:
                flagged_parts.add(part)
            color = colors.get(int(row.get("index") or 0), "#ffd60a")
            bar = ax.barh([y], [sign * vol], height=0.72, color=color, alpha=0.9,
                          edgecolor=rl.QC_FLAG_COLOR if flagged else rl.BG, linewidth=1.6 if flagged else 0.3,
                          xerr=None if err is None else [err], ecolor=rl.FG,
                          error_kw={"elinewidth": 0.7, "capsize": 2})
            bar.patches[0].set_gid(f"volumes-bar-{side.lower()}-{y}")
            biggest = max(biggest, vol + (err or 0.0))
        ai = next((r.get("asymmetry_index") for r in parts[part].values() if r.get("asymmetry_index") is not None),
                  None)
        if ai is not None:
            ax.text(1.01, y, f"AI {ai:+.3f}", transform=ax.get_yaxis_transform(), ha="left", va="center",
                    color=rl.MUTED, fontsize=rl._FONT - 1)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names or [""])
    for tick, part in zip(ax.get_yticklabels(), names):
        if part in flagged_parts:  # visible even when the flagged structure has no volume
            tick.set_color(rl.QC_FLAG_COLOR)
            tick.set_fontweight("bold")
    ax.axvline(0.0, color=rl.MUTED, lw=0.8)
    if biggest > 0:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.set_xlim(-1.08 * biggest, 1.08 * biggest)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, symmetric=True, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):,.0f}"))
    else:
        ax.set_xlim(-1.0, 1.0)
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no labelled voxels: every volume is 0", transform=ax.transAxes, ha="center",
                va="center", color=rl.MUTED, fontsize=rl._FONT + 1)
    ax.set_xlabel("volume (mm\u00b3)   \u2190 left | right \u2192", color=rl.FG, fontsize=rl._FONT + 1)
    flag = qc.get("QCFlag")
    mean_cv = qc.get("MeanCVPercent")
    sub = []
    if mean_cv is not None:
        try:
            sub.append(f"mean CV {float(mean_cv):.2f} %")
        except (TypeError, ValueError):
            pass
    if flag:
        sub.append(f"QC {str(flag).upper()}")
    sub.append(f"{n_flagged} flagged")
    fig.text(0.02, 1 - 0.1 / fig_h, title or "Lobule volumes", ha="left", va="top", color=rl.FG,
             fontsize=rl._FONT + 2, fontweight="bold")
    fig.text(0.98, 1 - 0.1 / fig_h, ", ".join(sub), ha="right", va="top", color=rl.MUTED, fontsize=rl._FONT)
    fig.text(0.02, 0.05 / fig_h, "Whiskers: volume x MC-dropout CV. Red edge and red name: QC flag (warn). "
             "AI: (L - R) / mean.",
             ha="left", va="bottom", color=rl.MUTED, fontsize=rl._FONT - 1)
    return rl._write_figure(fig, out_file)


# ------------------------------------------------------------------- QC sentences
def _get(data: Any, *keys: str) -> Any:
    if not isinstance(data, Mapping):
        return None
    for key in keys:
        if key in data and data[key] is not None:
            return data[key]
    return None


def atlas_prior_line(qc: Mapping[str, Any]) -> str:
    """One sentence: whether the subject-specific atlas prior, the population prior or none was used
    (``atlas_prior`` of the QC JSON)."""
    prior = _get(qc, "atlas_prior", "AtlasPrior")
    if prior is None:
        return "Atlas prior: not recorded in the QC file."
    if isinstance(prior, bool):
        return "Atlas prior: used." if prior else "Atlas prior: not used."
    if not isinstance(prior, Mapping):
        return f"Atlas prior: {prior}."
    used = _get(prior, "used", "Used")
    reason = _get(prior, "reason", "Reason")
    details = _get(prior, "details", "Details")  # the atlas fusion's own summary, when it wrote one
    sources = [prior] + ([details] if isinstance(details, Mapping) else [])
    library = next((v for d in sources if (v := _get(d, "library", "Library", "library_dir", "LibraryDir"))), None)
    n_cases = next((v for d in sources if (v := _get(d, "n_cases", "NCases", "n_atlases", "NAtlases",
                                                     "n_selected", "NSelected")) is not None), None)
    if n_cases is None:
        listed = next((v for d in sources if isinstance(v := _get(d, "cases", "Cases", "selected", "Selected"),
                                                        (list, tuple))), None)
        n_cases = len(listed) if listed is not None else None
    kind = next((v for d in sources if (v := _get(d, "kind", "Kind"))), None)
    if used and kind == "population":
        text = "Atlas prior: the population prior (a probabilistic atlas"
        text += f" of {n_cases} library cases" if n_cases is not None else ""
        text += " on the template crop, the same for every subject), not a subject-specific one"
        return text + (f" ({reason})." if reason else ".")
    if used:
        facts = [f"{n_cases} library cases" if n_cases is not None else "",
                 f"library {library}" if library else ""]
        facts = [f for f in facts if f]
        text = "Atlas prior: used (a subject-specific prior registered and fused from a labelled library"
        text += f"; {', '.join(facts)})" if facts else ")"
        return text + (f"; {reason}." if reason else ".")
    return f"Atlas prior: not used ({reason})." if reason else "Atlas prior: not used."


def _details(qc: Mapping[str, Any], value: Any, *keys: str) -> dict:
    """The ``*_details`` object of a stage, updated with the stage's own value when that is an object."""
    details = _get(qc, *keys)
    info = dict(details) if isinstance(details, Mapping) else {}
    if isinstance(value, Mapping):
        info.update(value)
    return info


def _model(info: Mapping[str, Any]) -> str:
    model = _get(info, "model", "Model", "name", "Name")
    version = _get(info, "version", "Version")
    return f"{model}{f' {version}' if version else ''}" if model else ""


def t2_line(qc: Mapping[str, Any]) -> str | None:
    """One sentence on the T2w of the cerebellum branch (the subject's own, synthetic, or none and why), or
    None when the QC JSON does not say."""
    t2 = _get(qc, "t2", "T2", "t2_source", "T2Source")
    if t2 is None:
        return None
    info = _details(qc, t2, "t2_details", "T2Details")
    source = _get(info, "source", "Source", "kind", "Kind") if isinstance(t2, Mapping) else t2
    file = _get(info, "file", "File", "path", "Path")
    reason = _get(info, "reason", "Reason")
    model = _model(info)
    kind = str(source or "").strip().lower()
    name = Path(str(file)).name if file else None
    if kind in ("real", "acquired", "measured", "t2w", "input"):
        text = f"T2: the subject's T2w{f' {name}' if name else ''}, rigidly registered to the T1w"
    elif kind in ("synthetic", "synth", "synthesised", "synthesized", "predicted"):
        text = f"T2: synthetic T2w from the T1w{f' by {model}' if model else ''}{f' ({name})' if name else ''}"
    elif kind in ("none", "no", "false", ""):
        text = "T2: not run" if reason else "T2: none used"
    else:
        text = f"T2: {source}{f' ({name})' if name else ''}"
    return text + (f" ({reason})." if reason else ".")


def superres_line(qc: Mapping[str, Any]) -> str | None:
    """One sentence on the x2 super-resolution of the crop (model, voxel size, or why it did not run), or None
    when the QC JSON does not say."""
    superres = _get(qc, "superres", "SuperResolution")
    if superres is None:
        return None
    info = _details(qc, superres, "superres_details", "SuperResolutionDetails")
    used = _get(info, "used", "Used") if isinstance(superres, Mapping) else superres
    if not used or str(used).lower() in ("false", "no", "none"):
        reason = _get(info, "reason", "Reason")
        return f"Super-resolution: not run ({reason})." if reason else "Super-resolution: not run."
    voxel = _get(info, "voxel_size_mm", "VoxelSizeMM")
    size = ""
    if isinstance(voxel, (list, tuple)) and voxel:
        values = sorted({round(float(v), 3) for v in voxel})
        size = f" ({values[0]:g} mm)" if len(values) == 1 else f" ({' x '.join(f'{float(v):g}' for v in voxel)} mm)"
    model = _model(info)
    return f"Super-resolution: the T1w crop x2{size}{f' by {model}' if model else ''}."


def _qc_sentence(qc: Mapping[str, Any]) -> str:
    models = [m.get("Name") if isinstance(m, Mapping) else str(m) for m in (qc.get("Models") or [])]
    parts = []
    if models:
        parts.append(f"Ensemble of {len(models)} model(s) ({', '.join(str(m) for m in models)})")
    if qc.get("LabelProtocol"):
        parts.append(f"{qc.get('LabelProtocol')} protocol")
    if qc.get("MCSamples") is not None:
        seed = f" (seed {qc.get('Seed')})" if qc.get("Seed") is not None else ""
        parts.append(f"{qc.get('MCSamples')} Monte-Carlo dropout samples{seed}")
    text = ", ".join(parts)
    mean_cv = qc.get("MeanCVPercent")
    if mean_cv is not None or qc.get("QCFlag"):
        cv = "undefined" if mean_cv is None else f"{_num(mean_cv, 3)} %"
        thr = qc.get("QCThresholdPercent")
        text += (". " if text else "") + f"Mean volume CV {cv}"
        if thr is not None:
            calibrated = bool((qc.get("QCCalibration") or {}).get("Calibrated"))
            text += f" against a threshold of {_num(thr, 2)} % ({origin_text(calibrated)})"
        text += f": QC {str(qc.get('QCFlag') or 'n/a').upper()}"
    return text + "." if text else ""


def _num(value: Any, digits: int) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


# ------------------------------------------------------------------------ section
def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        num = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(num):
        return "n/a"
    return format(num, fmt)


def volume_table(rows: Sequence[Mapping[str, Any]], protocol: str = PROTOCOL) -> dict:
    """The section table (schema of ``reports/report.py``) of a cerebellum ``_morph.tsv``."""
    colors = lobule_colors(protocol)
    out = []
    for row in rows:
        idx = row.get("index")
        icv = row.get("volume_icv_fraction")
        out.append({
            "cells": [display_name(str(row.get("name") or idx)), _cell(row.get("volume_mm3"), ",.0f"),
                      "n/a" if icv is None else _cell(100.0 * float(icv), ".4f"),
                      _cell(row.get("asymmetry_index"), "+.3f"), _cell(row.get("mc_cv_percent"), ".2f"),
                      str(row.get("qc_flag") or "n/a")],
            "flagged": str(row.get("qc_flag") or "").lower() == FLAGGED,
            "color": colors.get(int(idx)) if isinstance(idx, int) else None,
        })
    return {
        "caption": "Volumes of the lobules in the MNI cerebellum crop with their Monte-Carlo dropout QC. % ICV: "
                   "percentage of the intracranial volume; AI: asymmetry index (L - R) / mean, on both rows of a "
                   "pair; CV: coefficient of variation of the volume over the MC-dropout samples. Rows whose CV "
                   "exceeds the threshold (or that are absent from every sample) are highlighted.",
        "columns": ["Lobule", "Volume (mm\u00b3)", "% ICV", "AI", "CV (%)", "QC"],
        "numeric": [False, True, True, True, True, False],
        "rows": out,
    }


def _totals(rows: Sequence[Mapping[str, Any]]) -> str:
    total = left = right = 0.0
    for row in rows:
        vol = row.get("volume_mm3")
        if vol is None or not math.isfinite(vol):
            continue
        total += vol
        side, _ = split_name(str(row.get("name") or ""))
        left += vol if side == "Left" else 0.0
        right += vol if side == "Right" else 0.0
    if not total:
        return ""
    return (f"Total labelled cerebellum {total / 1000:.1f} mL (left {left / 1000:.1f} mL, right "
            f"{right / 1000:.1f} mL).")


def lobule_section(output_dir: str | os.PathLike, source_file: str | os.PathLike | None, template: str, *,
                   protocol: str = PROTOCOL) -> dict | None:
    """The "Cerebellar lobules" section of the subject report, or None when no cerebellum derivative
    (lobule ``dseg``, ``_morph.tsv`` or QC JSON) exists for ``source_file``.

    Keys (the section schema of :func:`bids_app.reports.report.render_subject_report`): ``title``,
    ``kind`` ("lobules"), ``description``, ``notes`` (atlas prior, T2, super-resolution, totals),
    ``reportlets`` (overview, mosaic, volumes, uncertainty, T1w | super-resolved T1w, T1w | T2w:
    those that exist), ``table`` (None without a ``_morph.tsv``), and ``qc_flag``, ``n_flagged``,
    ``atlas_prior``, ``t2``, ``superres`` for the PDF.
    """
    if not source_file:
        return None
    from ..core.morphometry import read_morphometry_tsv

    output_dir = Path(output_dir)
    files = cerebellum_files(output_dir, source_file, template)
    if not any(p.is_file() for p in files.values()):
        return None
    qc = _read_json(files["qc"]) if files["qc"].is_file() else {}
    rows: list[dict] = []
    if files["morph"].is_file():
        try:
            rows = read_morphometry_tsv(files["morph"])
        except (OSError, ValueError, KeyError) as exc:
            LOGGER.warning("cannot read %s: %s", files["morph"], exc)
    ents = _source_entities(source_file)
    reportlets = []
    figures = figure_entities(template, uncertainty_desc="__DESC__")
    for key in ("render", "mosaic", "volumes"):
        rel = derivative_path({**ents, **figures[key]})
        if (output_dir / rel).is_file():
            reportlets.append({"path": rel, "caption": CAPTIONS[key].format(template=template)})
    pattern = derivative_path({**ents, **figures["uncertainty"]})
    for file in sorted((output_dir / Path(pattern).parent).glob(Path(pattern).name.replace("__DESC__", "*"))):
        desc = re.search(r"_desc-([a-zA-Z0-9]+)_", file.name)
        reportlets.append({"path": (Path(pattern).parent / file.name).as_posix(),
                           "caption": CAPTIONS["uncertainty"].format(desc=desc.group(1) if desc else "map")})
    t2 = t2_line(qc)
    superres = superres_line(qc)
    for key, line in (("superres", superres), ("t2", t2)):
        rel = derivative_path({**ents, **figures[key]})
        if (output_dir / rel).is_file():
            reportlets.append({"path": rel, "caption": CAPTIONS[key].format(template=template, line=line or "")
                               .strip()})
    description = "Cerebellar lobules (CERES/DeepCERES protocol after Park et al. 2014: 13 structures per side) " \
                  f"segmented in the {template} cerebellum crop."
    qc_text = _qc_sentence(qc)
    if qc_text:
        description += " " + qc_text
    elif not files["qc"].is_file():
        description += " No QC file was found."
    notes = [atlas_prior_line(qc)]
    notes += [line for line in (t2, superres) if line]
    totals = _totals(rows)
    if totals:
        notes.append(totals)
    table = volume_table(rows, protocol) if rows else None
    n_flagged = sum(r["flagged"] for r in table["rows"]) if table else 0
    if not rows:
        notes.append("No volume table (_seg-cerebellum_morph.tsv) was found.")
    return {
        "title": "Cerebellar lobules", "kind": "lobules", "description": description, "notes": notes,
        "reportlets": reportlets, "table": table, "qc_flag": str(qc.get("QCFlag") or "n/a"), "n_flagged": n_flagged,
        "atlas_prior": notes[0], "t2": t2, "superres": superres,
    }
