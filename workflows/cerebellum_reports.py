"""Reportlets of the cerebellum branch (lobules in the MNI cerebellum crop), written to ``sub-<label>/figures/``.

The subject report (``bids_app/reports/build.py``) finds them by their entities
(:func:`bids_app.reports.lobules.figure_entities`) together with the branch's derivatives
(``_space-<tpl>_seg-cerebellum_dseg``, ``_seg-cerebellum_morph.tsv``, ``_seg-cerebellum_qc.json``), and
renders the "Cerebellar lobules" HTML section and ``<label>_seg-cerebellum_report.pdf``.
"""

from __future__ import annotations

import re

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.interfaces.bids import DerivativesDataSink
from bids_app.interfaces.reports import ImagePairRPT, LobuleMosaicRPT, LobuleRenderRPT, LobuleVolumesRPT, MapRPT
from bids_app.reports.lobules import DEFAULT_UNCERTAINTY_DESC, PROTOCOL, figure_entities

#: fields of the inputnode
CEREBELLUM_REPORT_INPUTS = ("t1w_crop", "dseg_crop", "uncertainty", "morph_tsv", "qc_json", "superres_crop",
                            "t2w_crop")
#: right-hand label of the T1w | T2w figure for each T2 source
T2_LABELS = {"real": "the subject's T2w (rigidly registered)", "synthetic": "synthetic T2w (from the T1w)"}


def init_cerebellum_reports_wf(*, output_dir: str, source_file: str, template: str, protocol: str = PROTOCOL,
                               uncertainty_desc: str | None = DEFAULT_UNCERTAINTY_DESC, uncertainty_unit: str = "nats",
                               superres: bool = False, t2_source: str = "none", name: str = "cerebellum_reports_wf"):
    """Lobule reportlets: fills/outlines mosaic, surface overview, volume bars and (optionally) the
    uncertainty map; with the image stages, the side-by-side figures T1w crop | super-resolved T1w
    (``superres``: ``inputnode.superres_crop``, with a zoomed detail) and T1w crop | T2w
    (``t2_source`` "real" or "synthetic": ``inputnode.t2w_crop``).

    ``inputnode``: ``t1w_crop`` (T1w of the crop), ``dseg_crop`` (lobule labels on the crop grid),
    ``morph_tsv`` (``_seg-cerebellum_morph.tsv``), ``qc_json`` (optional: subtitle of the volume
    bars) and ``uncertainty`` (an uncertainty map on the crop grid, by default the MC-dropout
    entropy in nats, ``desc-entropy``): required while ``uncertainty_desc`` names it; with
    ``uncertainty_desc=None`` the field is ignored and no uncertainty figure is drawn.

    Figures (``<source>`` = the entities of ``source_file``)::

        figures/<source>_space-<tpl>_seg-cerebellum_dseg.svg
        figures/<source>_space-<tpl>_seg-cerebellum_desc-render_dseg.png
        figures/<source>_seg-cerebellum_desc-volumes_dseg.svg
        figures/<source>_space-<tpl>_seg-cerebellum_desc-<uncertainty_desc>_uncertainty.svg
        figures/<source>_space-<tpl>_seg-cerebellum_desc-superres_T1w.svg     (superres)
        figures/<source>_space-<tpl>_seg-cerebellum_desc-t2_T2w.svg           (a T2 source)
    """
    if uncertainty_desc is not None and not re.fullmatch(r"[a-zA-Z0-9]+", str(uncertainty_desc)):
        raise ValueError(f"uncertainty_desc must be a BIDS label (letters and digits), got {uncertainty_desc!r}")
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(CEREBELLUM_REPORT_INPUTS)), name="inputnode")
    if t2_source not in ("real", "synthetic", "none"):
        raise ValueError(f"t2_source must be real, synthetic or none, got {t2_source!r}")
    outputnode = pe.Node(niu.IdentityInterface(fields=["mosaic", "render", "volumes", "uncertainty", "superres",
                                                       "t2"]),
                         name="outputnode")
    figures = figure_entities(template, uncertainty_desc=uncertainty_desc or "none")

    def sink(node_name, key):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=source_file,
                                           entities=dict(figures[key])),
                       name=node_name, run_without_submitting=True)

    lobules_rpt = pe.Node(LobuleMosaicRPT(protocol=protocol), name="lobules_rpt")
    render_rpt = pe.Node(LobuleRenderRPT(protocol=protocol), name="render_rpt")
    volumes_rpt = pe.Node(LobuleVolumesRPT(protocol=protocol), name="volumes_rpt")
    ds_lobules = sink("ds_lobules_rpt", "mosaic")
    ds_render = sink("ds_render_rpt", "render")
    ds_volumes = sink("ds_volumes_rpt", "volumes")
    wf.connect([
        (inputnode, lobules_rpt, [("t1w_crop", "in_file"), ("dseg_crop", "dseg")]),
        (inputnode, render_rpt, [("dseg_crop", "dseg")]),
        (inputnode, volumes_rpt, [("morph_tsv", "morph_tsv"), ("qc_json", "qc_json")]),
        (lobules_rpt, ds_lobules, [("out_report", "in_file")]),
        (render_rpt, ds_render, [("out_report", "in_file")]),
        (volumes_rpt, ds_volumes, [("out_report", "in_file")]),
        (ds_lobules, outputnode, [("out_file", "mosaic")]),
        (ds_render, outputnode, [("out_file", "render")]),
        (ds_volumes, outputnode, [("out_file", "volumes")]),
    ])
    if uncertainty_desc:
        uncertainty_rpt = pe.Node(MapRPT(cmap="inferno", unit=uncertainty_unit,
                                         title=f"Cerebellar lobules: uncertainty ({uncertainty_desc})"),
                                  name="uncertainty_rpt")
        ds_uncertainty = sink("ds_uncertainty_rpt", "uncertainty")
        wf.connect([
            (inputnode, uncertainty_rpt, [("uncertainty", "in_file"), ("dseg_crop", "bbox_file")]),
            (uncertainty_rpt, ds_uncertainty, [("out_report", "in_file")]),
            (ds_uncertainty, outputnode, [("out_file", "uncertainty")]),
        ])
    if superres:
        superres_rpt = pe.Node(ImagePairRPT(first_label="T1w crop (1 mm)", second_label="super-resolved T1w (x2)",
                                            title="Cerebellum crop: super-resolution", detail="sagittal",
                                            note_from="superres"),
                               name="superres_rpt")
        ds_superres = sink("ds_superres_rpt", "superres")
        wf.connect([
            (inputnode, superres_rpt, [("t1w_crop", "first"), ("superres_crop", "second"), ("qc_json", "qc_json")]),
            (superres_rpt, ds_superres, [("out_report", "in_file")]),
            (ds_superres, outputnode, [("out_file", "superres")]),
        ])
    if t2_source != "none":
        t2_rpt = pe.Node(ImagePairRPT(first_label="T1w crop", second_label=T2_LABELS[t2_source],
                                      title="Cerebellum crop: T1w and T2w", note_from="t2"), name="t2_rpt")
        ds_t2 = sink("ds_t2_rpt", "t2")
        wf.connect([
            (inputnode, t2_rpt, [("t1w_crop", "first"), ("t2w_crop", "second"), ("qc_json", "qc_json")]),
            (t2_rpt, ds_t2, [("out_report", "in_file")]),
            (ds_t2, outputnode, [("out_file", "t2")]),
        ])
    return wf
