"""``arborseg-demo``: generate the phantom BIDS dataset and run ArborSeg on it, end to end.

The demo needs nothing from the network: the phantom dataset is generated here, and when the
MNI152NLin6Asym template is not available locally (``TEMPLATEFLOW_HOME``), a phantom template in
TemplateFlow layout is generated too and used instead (the log says which).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ..errors import ArborSegError

LOGGER = logging.getLogger("arborseg")

PHANTOM_TEMPLATE = "ArborSegPhantom"


def write_phantom_templateflow(home: Path, *, name: str = PHANTOM_TEMPLATE, target_res_mm: float = 2.0,
                               reference_res_mm: float = 1.0, seed: int = 1234) -> Path:
    """A TemplateFlow-style template made from the phantom (an average-shaped, noise-free head).

    Writes ``tpl-<name>/tpl-<name>_res-02_T1w.nii.gz`` (whole head, registration target),
    ``_res-01_desc-brain_T1w`` and ``_res-01_desc-brain_mask`` (the intracranial contents). The
    ``res`` labels name the roles; the voxel sizes are ``target_res_mm``/``reference_res_mm``.
    """
    import nibabel as nb

    from ..core.files import save_atomic
    from ..core.phantom import LABELS, make_label_phantom, render_contrast

    folder = Path(home) / f"tpl-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    inside = [LABELS[k] for k in ("csf", "gm", "wm", "ventricles", "cerebellum_gm", "cerebellum_wm", "brainstem",
                                  "deep_gm")]
    for res_mm, files in ((target_res_mm, ("res-02_T1w",)), (reference_res_mm, ("res-01_desc-brain_T1w",
                                                                                  "res-01_desc-brain_mask"))):
        labels, affine = make_label_phantom(voxel_size=res_mm, seed=seed)
        t1w = render_contrast(labels, contrast="T1w", voxel_size=res_mm, seed=seed, noise_sigma=0.0,
                              bias_amplitude=0.0)
        brain = np.isin(labels, inside)
        for stem in files:
            if stem.endswith("mask"):
                data = brain.astype(np.uint8)
            elif "desc-brain" in stem:
                data = np.where(brain, t1w, 0).astype(np.float32)
            else:
                data = t1w.astype(np.float32)
            img = nb.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            save_atomic(img, folder / f"tpl-{name}_{stem}.nii.gz")
    (folder / "template_description.json").write_text(
        '{"Name": "ArborSeg phantom template", "Identifier": "%s", "License": "CC0"}\n' % name)
    return folder


def _template_available(name: str) -> bool:
    """Whether ``name`` is available locally (no download is attempted)."""
    from ..resources import Places, resolve_template

    try:
        resolve_template(name, places=Places(offline=True))
        return True
    except ArborSegError:
        return False


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arborseg-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", nargs="?", type=Path, default=Path("arborseg-demo"),
                        help="folder for the demo dataset, outputs and work dir (default: ./arborseg-demo)")
    parser.add_argument("--n-subjects", type=int, default=2, help="phantom subjects to generate (default 2)")
    parser.add_argument("--voxel-size", type=float, default=1.0,
                        help="voxel size of the generated phantom images and of the conformed space (mm)")
    parser.add_argument("--nprocs", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--phantom-template", action="store_true",
                        help="use the generated phantom template even when MNI152NLin6Asym is available")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..core.phantom import write_demo_dataset
    from .run import main as arborseg_main
    from .run import setup_logging

    opts = get_parser().parse_args(argv)
    setup_logging(0)
    dest = opts.dest.expanduser().resolve()
    bids_dir, out_dir, work_dir = dest / "bids", dest / "derivatives", dest / "work"
    if (bids_dir / "dataset_description.json").is_file():
        LOGGER.info("re-using the phantom dataset in %s", bids_dir)
    else:
        LOGGER.info("generating %d phantom subjects (T1w + T2w) in %s", opts.n_subjects, bids_dir)
        write_demo_dataset(bids_dir, n_subjects=opts.n_subjects, voxel_size=opts.voxel_size, seed=0)
    common = ["-w", str(work_dir)]
    if opts.nprocs:
        common += ["--nprocs", str(opts.nprocs)]
    if not opts.phantom_template and _template_available("MNI152NLin6Asym"):
        LOGGER.info("template: MNI152NLin6Asym (TemplateFlow)")
    else:
        home = dest / "templateflow"
        if not (home / f"tpl-{PHANTOM_TEMPLATE}").is_dir():
            LOGGER.info("MNI152NLin6Asym is not available offline; generating the phantom template in %s", home)
            write_phantom_templateflow(home)
        common += ["--template", PHANTOM_TEMPLATE, "--templateflow-home", str(home)]
    voxel = ["--voxel-size", str(max(opts.voxel_size, 0.5))]
    code = arborseg_main([str(bids_dir), str(out_dir), "participant", *common, *voxel])
    group_code = arborseg_main([str(bids_dir), str(out_dir), "group", *common])
    reports = sorted(out_dir.glob("sub-*.html"))
    LOGGER.info("subject reports: %s", ", ".join(str(p) for p in reports))
    LOGGER.info("open the group report: %s", out_dir / "group.html")
    sys.stdout.write(f"{out_dir / 'group.html'}\n")
    return code or group_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
