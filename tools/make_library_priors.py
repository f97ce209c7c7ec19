"""Leave-subject-out atlas priors of every library case, for training the lobule networks that take the prior.

For each non-mirrored case the prior is computed exactly as the pipeline computes it for a new subject
(:func:`bids_app.core.atlas_fusion.atlas_prior`, default N and preset) with every case of the same subject
(its mirrored twin included) left out, folded to the 13 side-free classes (:func:`bids_app.models.cascade.fold_prior`)
and saved as ``<case>_prior.npy`` (float16); the mirrored case gets the mirrored prior. The prior's own
labels (its argmax: atlas fusion alone, the classical peer of the cross-validation) and its time are saved as
``<case>_atlas_dseg.npy`` / ``<case>_atlas.json``.

For a cross-validation fold, ``--exclude-subjects`` names the fold's test subjects: they are taken out of
every case's atlas pool, so no test subject's labels reach a training input. Their cases get the population
prior of the other subjects instead (no registration): the pack keeps every subject, so ``arborseg-train fit
--fold K`` draws the same folds, and leaves those cases out of training.

Usage: python tools/make_library_priors.py LIBRARY OUT_DIR [--exclude-subjects S [S ...]]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_app.atlas_library import read_library  # noqa: E402
from bids_app.core.atlas_fusion import atlas_prior, population_prior  # noqa: E402
from bids_app.core.labels import load_protocol  # noqa: E402
from bids_app.core.lobules import mirror_lr  # noqa: E402
from bids_app.models.cascade import fold_prior  # noqa: E402


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="make_library_priors.py", description=__doc__.split("\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--exclude-subjects", nargs="+", default=[], metavar="SUBJECT",
                        help="left out of every atlas pool and given no prior (a fold's test subjects)")
    args = parser.parse_args(argv)
    library_dir, out = args.library, args.out
    library = read_library(library_dir)
    import json

    all_cases = json.loads((library_dir / "library.json").read_text())["cases"]
    unknown = set(args.exclude_subjects) - {c["subject"] for c in all_cases}
    if unknown:
        parser.error(f"{library_dir}: no library case of {', '.join(sorted(unknown))}")
    out.mkdir(parents=True, exist_ok=True)
    excluded = list(args.exclude_subjects)
    cases = [c for c in all_cases if not c["mirrored"] and c["subject"] not in excluded]
    if excluded:
        protocol = load_protocol("lobules")
        kept = [np.asarray(nib.load(str(library_dir / c["dseg"])).dataobj) for c in all_cases
                if c["subject"] not in excluded]
        filler = fold_prior(population_prior(kept, list(protocol.indices))).astype(np.float16)
        for case in all_cases:
            if case["subject"] in excluded:
                np.save(out / f"{case['case']}_prior.npy", filler)
        logging.info("%d cases of the excluded subjects get the population prior of the %d others",
                     sum(c["subject"] in excluded for c in all_cases), len(kept))
    for i, case in enumerate(cases, 1):
        target = out / f"{case['case']}_prior.npy"
        if target.is_file():
            continue
        t0 = time.perf_counter()
        img = nib.load(str(library_dir / case["t1w"]))
        res = atlas_prior(img, library, exclude_subjects=[case["subject"], *excluded])
        prior13 = fold_prior(res.probabilities)
        mirrored = np.stack([mirror_lr(p, img.affine) for p in prior13])
        np.save(out / f"{case['case']}-mirror_prior.npy", mirrored.astype(np.float16))
        np.save(out / f"{case['case']}_atlas_dseg.npy", load_protocol(res.protocol).to_labels(np.argmax(res.probabilities, axis=0)))
        with open(out / f"{case['case']}_atlas.json", "w") as handle:
            json.dump({"seconds": time.perf_counter() - t0, "selected": list(map(str, res.selected)),
                       "excluded_subjects": [case["subject"], *excluded]}, handle)
        np.save(target, prior13.astype(np.float16))
        logging.info("[%d/%d] %s prior in %.1f s", i, len(cases), case["case"], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
