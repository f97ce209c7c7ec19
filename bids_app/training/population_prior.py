"""The population lobule prior: a probabilistic atlas of the cerebellar lobules on the MNI cerebellum crop.

The pipeline's crop is the T1w affinely registered to MNI152NLin6Asym, and the library's cases are on that same
grid, so the fraction of library cases giving each lobule at each voxel is a prior that needs no further
registration. It is what the branch feeds the lobule models when no library is given (the subject-specific atlas
prior needs one): on the fold-0 test subjects its own argmax scores a mean lobule Dice of about 0.64 against the
silver labels, more than the CPU-trained network that sees the image alone.

``python -m bids_app.training.population_prior LIBRARY --out PRIOR.nii.gz [--exclude-subjects S ...]
[--cases-dir DIR]`` writes

* ``PRIOR.nii.gz``: 4D (X, Y, Z, 27) in the ``lobules`` order (background first), uint8 with a scale factor,
  from every case of the subjects not excluded (mirrored copies included, so the atlas is symmetric), and its
  sidecar ``PRIOR.json`` (``"kind": "population"``, the cases, the licence);
* with ``--cases-dir``, ``<case>_prior.npy`` for every library case (side-free 13 classes, float16, the layout
  ``arborseg-train prepare --priors`` reads): for a case of an included subject the atlas of the *other*
  included subjects (leave-subject-out, as a new subject would see it), for an excluded subject the full atlas.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.atlas_library import prior_image, sidecar_path
from bids_app.bids import atomic_write_json
from bids_app.core.atlas_fusion import population_prior
from bids_app.core.files import save_atomic
from bids_app.core.labels import load_protocol

from .library import read_index

log = logging.getLogger(__name__)

KIND = "population"


def build_population_prior(library_dir: Path, out_file: Path, *, exclude_subjects=(), cases_dir: Path | None = None,
                           licence: str = "CC BY-NC-SA 4.0 (derived from OASIS-TRT-20 labels and Park 2014 lobules)"
                           ) -> dict:
    """Write the population prior (and the per-case training priors); returns the sidecar's content."""
    from bids_app.models.cascade import fold_prior

    library_dir = Path(library_dir)
    index = read_index(library_dir)
    protocol = load_protocol("lobules")
    values = list(protocol.indices)
    excluded = set(exclude_subjects)
    cases = index["cases"]
    unknown = excluded - {c["subject"] for c in cases}
    if unknown:
        raise ValueError(f"{library_dir}: no library case of the excluded subject(s) {', '.join(sorted(unknown))}")
    used = [c for c in cases if c["subject"] not in excluded]
    if not used:
        raise ValueError(f"{library_dir}: every case is excluded; nothing to build a population prior from")
    t0 = time.perf_counter()
    labels = {c["case"]: np.asarray(nib.load(str(library_dir / c["dseg"])).dataobj) for c in cases}
    affine = nib.load(str(library_dir / used[0]["dseg"])).affine
    prior = population_prior((labels[c["case"]] for c in used), values)
    save_atomic(prior_image(prior, affine), out_file)
    sidecar = {
        "kind": KIND, "protocol": protocol.name, "space": index.get("space"), "n_cases": len(used),
        "cases": [c["case"] for c in used], "subjects": sorted({c["subject"] for c in used}),
        "excluded_subjects": sorted(excluded), "library_format_version": index.get("format_version"),
        "Description": "Probabilistic atlas of the cerebellar lobules on the MNI cerebellum crop: the fraction of "
                       "the library's cases (silver labels, on the affine template grid) giving each label",
        "licence": licence,
    }
    atomic_write_json(sidecar_path(out_file), sidecar)
    log.info("population prior of %d cases (%d subjects) -> %s", len(used), len(sidecar["subjects"]), out_file)
    if cases_dir is not None:
        cases_dir = Path(cases_dir)
        cases_dir.mkdir(parents=True, exist_ok=True)
        full13 = fold_prior(prior)
        for case in cases:
            if case["subject"] in excluded:
                own = full13
            else:
                others = [labels[c["case"]] for c in used if c["subject"] != case["subject"]]
                own = fold_prior(population_prior(others, values))
            np.save(cases_dir / f"{case['case']}_prior.npy", own.astype(np.float16))
        log.info("%d leave-subject-out case priors -> %s", len(cases), cases_dir)
    log.info("done in %.0f s", time.perf_counter() - t0)
    return sidecar


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bids_app.training.population_prior",
                                     description="Build the population lobule prior (probabilistic atlas on the "
                                                 "MNI cerebellum crop) from a cerebellum library.")
    parser.add_argument("library", type=Path, help="cerebellum library folder (arborseg-build-library)")
    parser.add_argument("--out", type=Path, required=True, help="output .nii.gz (its .json sidecar is written too)")
    parser.add_argument("--exclude-subjects", nargs="*", default=[], help="leave these subjects out (test folds)")
    parser.add_argument("--cases-dir", type=Path, help="also write <case>_prior.npy training priors here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        build_population_prior(args.library, args.out, exclude_subjects=args.exclude_subjects,
                               cases_dir=args.cases_dir)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
