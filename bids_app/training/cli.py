"""``arborseg-train``: pack training data, train (one model or a cross-validation fold), export.

    arborseg-train prepare OUT --oasis DIR [--mindboggle DIR] [--synthseg DIR] [--protocol dkt-aseg]
    arborseg-train slim DATA OUT --folders oasis mindboggle [--init MANIFEST.json ...] [--max-mib 60]
    arborseg-train fit CONFIG.toml --data DIR --run RUN_DIR [--fold K] [--device cpu] [--threads N]
                                   [--iterations N] [--stop-after N] [--no-resume]
                                   [--time-budget SECONDS]
    arborseg-train folds CONFIG.toml --data DIR      # prints the test subjects of every fold
    arborseg-train export RUN_DIR/final STEM [--metrics METRICS.json] [--dtype float16] [--name NAME]
                          [--task TASK] [--model-version VERSION]
    arborseg-train calibrate-qc CV_DIR [CV_DIR...] --models MANIFEST.json [MANIFEST.json...] [--n-sd 2]
                                [--method NAME] [--folds K ...]

Runs resume from their last checkpoint when started again with the same ``--run`` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bids_app.errors import EXIT_USAGE, ArborSegError

log = logging.getLogger("arborseg.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arborseg-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="pack labelled images and label maps into compact arrays")
    p.add_argument("out", type=Path)
    p.add_argument("--oasis", type=Path, help="folder of OASIS-TRT-20 subjects (sub-XX/...)")
    p.add_argument("--mindboggle", type=Path, help="folder of Mindboggle-101 aparcNMMjt+aseg label maps")
    p.add_argument("--synthseg", type=Path, help="folder of SynthSeg training label maps (aseg protocol only)")
    p.add_argument("--protocol", default="dkt-aseg")
    p.add_argument("--voxel-size", type=int, default=2, help="integer block factor from 1 mm (default 2)")
    p.add_argument("--library", type=Path, help="cerebellum library folder (arborseg-build-library)")
    p.add_argument("--priors", type=Path, help="with --library: folder of <case>_prior.npy atlas priors")

    s = sub.add_parser("slim", help="a training-only copy of packed folders (no 1 mm evaluation arrays) and the "
                                    "models to start from, for a training machine that takes a small upload")
    s.add_argument("data", type=Path, help="folder holding the packed folders")
    s.add_argument("out", type=Path)
    s.add_argument("--folders", nargs="+", default=[], help="packed folders to copy (e.g. oasis mindboggle)")
    s.add_argument("--init", type=Path, nargs="+", default=[],
                   help="model manifests to copy to OUT/init/<name> (a config's init_from)")
    s.add_argument("--max-mib", type=float, help="fail when the copy is larger than this")

    f = sub.add_parser("fit", help="train one network")
    f.add_argument("config", type=Path)
    f.add_argument("--data", type=Path, required=True, help="folder holding the packed folders of the config")
    f.add_argument("--run", type=Path, required=True, help="run folder (checkpoints, log, final model)")
    f.add_argument("--fold", type=int, help="leave out the test subjects of this cross-validation fold")
    f.add_argument("--device", default="cpu")
    f.add_argument("--threads", type=int)
    f.add_argument("--iterations", type=int, help="override the configured number of iterations")
    f.add_argument("--stop-after", type=int, help="checkpoint and stop after this many iterations")
    f.add_argument("--no-resume", action="store_true")
    f.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train for about this long: the run is cut to the iterations that fit (schedule "
                        "stretched over them); the manifest records the count")

    k = sub.add_parser("folds", help="print the cross-validation folds")
    k.add_argument("config", type=Path)
    k.add_argument("--data", type=Path, required=True)

    c = sub.add_parser("cv", help="cross-validate trained fold models (and the JLF baseline, the QC study)")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--runs", type=Path, required=True, help="folder of <arch>-fold<k> run folders")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--archs", nargs="+", default=["unet", "cerebrum"])
    c.add_argument("--folds", type=int, nargs="+")
    c.add_argument("--k", type=int, default=3)
    c.add_argument("--mc-samples", type=int, default=15)
    c.add_argument("--single-mc", type=int, default=5, help="MC samples for each member alone")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--jlf-folds", type=int, nargs="*", default=[])
    c.add_argument("--jlf-subjects", type=int, default=5)
    c.add_argument("--max-subjects", type=int, help="test subjects per fold (default: all)")
    c.add_argument("--degrade-subjects", type=int, default=0, help="test subjects per fold also run degraded")
    c.add_argument("--subjects", nargs="+", help="only these test subjects (e.g. OASIS-TRT-20-4)")
    c.add_argument("--jlf-only", action="store_true", help="run only the joint label fusion peer (no networks)")
    c.add_argument("--tta", default="none", choices=["none", "flip", "shift", "flip-shift"],
                   help="test-time augmentation of every network run (default none)")
    c.add_argument("--refinement", default="none", choices=["intensity", "none"],
                   help="refinement of every network run's probabilities (default none)")
    c.add_argument("--parc-runs", type=Path, help="folder of <parc-arch>-fold<k> parcellation runs: also score "
                                                  "the pipeline's fusion of both ensembles (methods fused and "
                                                  "fused-parc)")
    c.add_argument("--parc-arch", default="cerebrum", help="architecture of the parcellation runs (default cerebrum)")

    m = sub.add_parser("cv-merge", help="combine partial cross-validation runs into one summary")
    m.add_argument("parts", type=Path, nargs="+")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--methods", nargs="+", help="keep only these methods' rows (e.g. jlf)")

    q = sub.add_parser("calibrate-qc", help="QC thresholds of an ensemble from its cross-validation QC study, "
                                            "written into the members' manifests")
    q.add_argument("parts", type=Path, nargs="+", help="output folders of `arborseg-train cv` for this ensemble")
    q.add_argument("--models", type=Path, nargs="+", required=True,
                   help="manifests (.json) of the ensemble's installed members")
    q.add_argument("--n-sd", type=float, default=2.0)
    q.add_argument("--modality", default="T1w")
    q.add_argument("--method", help="the model set of a study that compared several (cerebellum CV: e.g. population)")
    q.add_argument("--folds", type=int, nargs="+", help="only the QC-study rows of these folds (the folds "
                                                          "whose test subjects the ensemble never saw)")

    e = sub.add_parser("export", help="write a run's final model as an installable checkpoint")
    e.add_argument("final", type=Path)
    e.add_argument("stem", type=Path)
    e.add_argument("--metrics", type=Path, help="JSON object merged into the manifest's metrics")
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--name")
    e.add_argument("--task", help="manifest task: wholebrain, parcellation (the default ensembles) or another name (opt-in)")
    e.add_argument("--model-version", help="manifest version (default: the training config's `version`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "prepare":
            from .prepare import prepare, prepare_library

            if args.library is not None:
                index = prepare_library(args.out, args.library, factor=args.voxel_size, priors=args.priors)
                print(f"{len(index['cases'])} cases written to {args.out}")
                return 0
            index = prepare(args.out, oasis=args.oasis, mindboggle=args.mindboggle, synthseg=args.synthseg,
                            protocol=args.protocol, factor=args.voxel_size)
            print(f"{len(index['cases'])} cases written to {args.out}")
        elif args.command == "slim":
            from .prepare import slim_packs

            summary = slim_packs(args.data, args.out, args.folders, init=args.init, max_mib=args.max_mib)
            cases = ", ".join(f"{k} {v} cases" for k, v in summary["folders"].items()) or "no packed folders"
            print(f"{args.out}: {cases}, {len(summary['init'])} models to start from, "
                  f"{summary['bytes'] / 2**20:.1f} MiB")
        elif args.command == "fit":
            from .trainer import TrainConfig, fit, fit_segnet

            cfg = TrainConfig.from_toml(args.config, iterations=args.iterations)
            kwargs = dict(fold=args.fold, device=args.device, num_threads=args.threads, resume=not args.no_resume,
                          stop_after=args.stop_after)
            if cfg.architecture == "segnet":
                if args.time_budget is not None:
                    raise ValueError("--time-budget is not supported for SegNet runs")
                out = fit_segnet(cfg, args.data, args.run, **kwargs)
            else:
                out = fit(cfg, args.data, args.run, time_budget=args.time_budget, **kwargs)
            print(out)
        elif args.command == "folds":
            from .trainer import TrainConfig, fold_split, load_cases

            cfg = TrainConfig.from_toml(args.config)
            for i, subjects in enumerate(fold_split(load_cases(args.data, cfg.folders, cfg.protocol),
                                                    cfg.cv_folds, cfg.cv_seed)):
                print(f"fold {i}: {' '.join(subjects)}")
        elif args.command == "cv":
            from .crossval import run_cv

            summary = run_cv(args.data, args.runs, args.out, archs=args.archs, folds=args.folds, k=args.k,
                             mc_samples=args.mc_samples, threads=args.threads, jlf_folds=args.jlf_folds,
                             jlf_subjects=args.jlf_subjects, degrade_subjects=args.degrade_subjects,
                             single_mc=args.single_mc, max_subjects=args.max_subjects, subjects=args.subjects,
                             jlf_only=args.jlf_only, tta=args.tta, refinement=args.refinement,
                             parc_runs=args.parc_runs, parc_arch=args.parc_arch)
            for method, protocols in summary["methods"].items():
                print(method, " ".join(f"{p}={v['overall'].get('dice_mean')}" for p, v in protocols.items()))
        elif args.command == "cv-merge":
            from .crossval import merge_cv

            summary = merge_cv(args.parts, args.out, methods=args.methods)
            for method, protocols in summary["methods"].items():
                print(method, " ".join(f"{p}={v['overall'].get('dice_mean')}" for p, v in protocols.items()))
        elif args.command == "calibrate-qc":
            from .crossval import write_calibration

            cal = write_calibration(args.parts, args.models, n_sd=args.n_sd, modality=args.modality,
                                    method=args.method, folds=args.folds)
            for name, table in cal["protocols"].items():
                print(f"{name}: mean CV threshold {table['mean_cv_threshold_percent']:.3f} %")
            s = cal["study"]
            print(f"study: {s['clean_flagged']}/{s['clean_scans']} clean and {s['degraded_flagged']}/"
                  f"{s['degraded_scans']} degraded scans flagged; {s['dice']} passed {s['mean_dice_passed']}, "
                  f"flagged {s['mean_dice_flagged']}; r = {s['pearson_r_cv_vs_dice']}")
        elif args.command == "export":
            from bids_app.models.checkpoint import load_checkpoint, save_checkpoint

            model, manifest = load_checkpoint(args.final)
            fields = {k: v for k, v in manifest.items()
                      if k not in ("sha256", "format_version", "weights_dtype", "n_parameters")}
            if args.metrics:
                fields["metrics"] = {**fields.get("metrics", {}), **json.loads(args.metrics.read_text())}
            fields["name"] = args.name or args.stem.name
            if args.task:
                fields["task"] = args.task
            if args.model_version:
                fields["version"] = args.model_version
            save_checkpoint(model, args.stem, fields, dtype=args.dtype)
            print(f"{args.stem}.safetensors")
    except (ArborSegError, FileNotFoundError, ValueError) as exc:
        print(f"arborseg-train: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print("arborseg-train: interrupted (the run resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
