"""Entry point of the ``arborseg`` command."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_PARTICIPANT_FAILED, ArborSegError, DatasetError, ResourceError

LOGGER = logging.getLogger("arborseg")


def setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s | %(levelname)-7s | %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for name in ("bids", "bidsschematools"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def build_config(opts, argv: list[str]):
    """Resolve the parsed options into a frozen :class:`RunConfig`; refuse unsafe locations."""
    from ..bids import load_bids_filters, strip_prefix
    from ..config import CerebellumConfig, PreprocConfig, RunConfig, SegmentationConfig

    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    work_dir = (opts.work_dir or Path("work")).expanduser().resolve()
    if output_dir == bids_dir:
        raise DatasetError(f"{output_dir}: the output directory cannot be the input dataset itself; "
                           f"use e.g. {bids_dir / 'derivatives' / 'arborseg'}")
    if _inside(output_dir, bids_dir) and not _inside(output_dir, bids_dir / "derivatives"):
        raise DatasetError(f"{output_dir}: the output directory is inside the input dataset; only "
                           f"{bids_dir / 'derivatives'}/... is allowed there")
    if _inside(work_dir, bids_dir) and not _inside(work_dir, output_dir):
        raise DatasetError(f"{work_dir}: the work directory is inside the input dataset; pass -w/--work-dir "
                           f"with a folder elsewhere")
    if _inside(bids_dir, output_dir):
        raise DatasetError(f"{output_dir}: the output directory contains the input dataset")
    nprocs = opts.nprocs or os.cpu_count() or 1
    omp = opts.omp_nthreads or min(nprocs, 8)
    if opts.device == "cuda":
        _require_cuda()
    elif opts.device == "mps":
        _require_mps()
    preproc = PreprocConfig(voxel_size=opts.voxel_size, denoise=not opts.no_denoise)
    if opts.analysis_level == "participant" and not opts.reports_only:
        segmentation = segmentation_config(opts)
        parcellation = parcellation_config(opts)
        _check_no_collision(segmentation, parcellation)
        cerebellum = cerebellum_config(opts)
    else:
        segmentation = SegmentationConfig(enabled=not opts.no_seg, **inference_options(opts))
        parcellation = SegmentationConfig(enabled=not (opts.no_seg or opts.no_parc), **inference_options(opts),
                                          task="parcellation",
                                          switched_off_by="--no-seg" if opts.no_seg else "--no-parc")
        cerebellum = CerebellumConfig(enabled=not opts.no_cerebellum, mc_samples=opts.mc_samples,
                                      superres=not opts.no_superres, t2_mode=opts.cerebellum_t2)
    return RunConfig(
        bids_dir=bids_dir, output_dir=output_dir, analysis_level=opts.analysis_level, work_dir=work_dir,
        participant_label=strip_prefix(opts.participant_label, "sub-"),
        session_label=strip_prefix(opts.session_label, "ses-"),
        bids_filters=load_bids_filters(opts.bids_filter_file),
        skip_bids_validation=opts.skip_bids_validation, nprocs=nprocs, omp_nthreads=omp, mem_gb=opts.mem_gb,
        device=opts.device, random_seed=opts.random_seed, stop_on_first_crash=opts.stop_on_first_crash,
        reports_only=opts.reports_only, template=opts.template,
        templateflow_home=opts.templateflow_home.expanduser().resolve() if opts.templateflow_home else None,
        atlas_dir=opts.atlas_dir.expanduser().resolve() if opts.atlas_dir else None,
        cache_dir=(opts.cache_dir or work_dir / "cache").expanduser().resolve(), offline=opts.offline,
        plugin=opts.plugin, plugin_args=dict(opts.plugin_args or {}), umask=opts.umask,
        verbosity=opts.verbose, preproc=preproc, segmentation=segmentation,
        parcellation=parcellation, cerebellum=cerebellum, version=__version__,
        command=" ".join(shlex.quote(a) for a in ["arborseg", *argv]), run_uuid=_run_id(),
    ), opts.clean_workdir


def resolved_tta(opts) -> str:
    """``--tta``, else the default test-time augmentation, or the largest one the MC samples allow."""
    from ..models.segment import DEFAULT_TTA, TTA_VIEWS

    if getattr(opts, "tta", None):
        return opts.tta
    return next(name for name in (DEFAULT_TTA, "flip", "none") if len(TTA_VIEWS[name]) <= opts.mc_samples)


def inference_options(opts) -> dict:
    """The segmentation branches' shared settings: MC samples, test-time augmentation, refinement."""
    from ..core.refinement import DEFAULT_REFINEMENT

    return {"mc_samples": opts.mc_samples, "tta": resolved_tta(opts),
            "refinement": getattr(opts, "refinement", None) or DEFAULT_REFINEMENT}


def segmentation_config(opts):
    """The whole-brain branch: ``--no-seg``, ``--seg-models`` (checked now) or the installed models.

    A checkpoint that cannot be used is a :class:`~bids_app.models.checkpoint.ModelError` (exit
    code 4) before any work. No torch is imported here.
    """
    from ..config import SegmentationConfig
    from ..models.segment import default_wholebrain_models, validate_wholebrain_checkpoints

    if opts.no_seg:
        return SegmentationConfig(enabled=False, **inference_options(opts))
    if opts.seg_models:
        paths, origin = list(opts.seg_models), "--seg-models"
    else:
        paths, origin = default_wholebrain_models(), "installed"
        if not paths:
            return SegmentationConfig(enabled=True, **inference_options(opts))
    manifests, protocol = validate_wholebrain_checkpoints(paths)
    return SegmentationConfig(enabled=True, checkpoints=tuple(manifests), origin=origin, protocol=protocol,
                              **inference_options(opts))


def parcellation_config(opts):
    """The cortical parcellation branch: ``--no-seg``/``--no-parc``, ``--parc-models`` (checked now) or the
    installed models whose manifest says ``"task": "parcellation"``.

    Without either, the branch is absent (one log line, one line in the report). A checkpoint that
    cannot be used is a :class:`~bids_app.models.checkpoint.ModelError` (exit code 4) before any work.
    """
    from ..config import SegmentationConfig
    from ..models.segment import PARCELLATION_TASK, default_parcellation_models, validate_parcellation_checkpoints

    if opts.no_seg or opts.no_parc:
        return SegmentationConfig(enabled=False, **inference_options(opts),
                                  task=PARCELLATION_TASK,
                                  switched_off_by="--no-seg" if opts.no_seg else "--no-parc")
    if opts.parc_models:
        paths, origin = list(opts.parc_models), "--parc-models"
    else:
        paths, origin = default_parcellation_models(), "installed"
        if not paths:
            return SegmentationConfig(enabled=True, **inference_options(opts),
                                      task=PARCELLATION_TASK)
    manifests, protocol = validate_parcellation_checkpoints(paths)
    return SegmentationConfig(enabled=True, checkpoints=tuple(manifests), origin=origin, protocol=protocol,
                              **inference_options(opts), task=PARCELLATION_TASK)


def cerebellum_config(opts):
    """The cerebellum branch: ``--no-cerebellum``, ``--cerebellum-models`` (checked now) or the installed models
    whose manifest task is ``cerebellum-hemispheres``/``cerebellum-lobules``; the atlas prior when a library is
    given (``--library-dir``/``$ARBORSEG_LIBRARY_DIR``, checked now), else the shipped population prior for
    lobule models that take it (template MNI152NLin6Asym).

    Installed models missing (or only one of the two tasks): the branch is skipped with a warning. A checkpoint
    or a library that cannot be used, or lobule models that all need a prior without a library, is an error
    (exit code 4) before any work. No torch is imported here.
    """
    from ..config import CerebellumConfig
    from ..models.cascade import (CEREBELLUM_TASKS, default_cerebellum_models, installed_tasks,
                                  population_prior_status, select_cerebellum_models)

    library = opts.library_dir.expanduser().resolve() if opts.library_dir else None
    common = {"mc_samples": opts.mc_samples, "n_atlases": opts.n_atlases, "library_dir": library,
              **image_models(opts)}
    if opts.no_cerebellum:
        return CerebellumConfig(enabled=False, **common)
    if opts.cerebellum_models:
        paths, origin = list(opts.cerebellum_models), "--cerebellum-models"
    else:
        paths, origin = default_cerebellum_models(), "installed"
        missing = [task for task in CEREBELLUM_TASKS if task not in installed_tasks(paths)]
        if missing:
            why = "" if len(missing) == len(CEREBELLUM_TASKS) else (
                f"no installed cerebellum model has the task {' nor '.join(missing)} (bids_app/data/models/ or "
                "$ARBORSEG_MODELS_DIR); pass --cerebellum-models to use your own")
            return CerebellumConfig(enabled=True, missing=why, **common)
    prior_available, reason = _library_status(library, opts.template)
    population, _why = population_prior_status(opts.template)
    models = select_cerebellum_models(paths, prior_available=prior_available, prior_reason=reason,
                                      population_available=population is not None)
    return CerebellumConfig(enabled=True, hemisphere_checkpoints=models.hemispheres,
                            lobule_checkpoints=models.lobules, origin=origin, use_prior=models.prior,
                            prior_reason=models.reason, population_prior=population if models.population else None,
                            **common)


def image_models(opts) -> dict:
    """The image stages of the cerebellum branch: ``--no-superres``, ``--cerebellum-t2`` and the installed
    super-resolution / T2-synthesis models (a stage without a model is skipped, and the report says why)."""
    from ..models.imaging import default_image_model

    superres = not opts.no_superres
    t2_mode = opts.cerebellum_t2
    superres_model = default_image_model("superres") if superres else None
    t2synth_model = default_image_model("t2synth") if t2_mode in ("auto", "synth") else None
    return {"superres": superres, "superres_checkpoint": Path(superres_model).resolve() if superres_model else None,
            "t2_mode": t2_mode, "t2synth_checkpoint": Path(t2synth_model).resolve() if t2synth_model else None}


def _library_status(library, template: str) -> tuple[bool, str]:
    """``(prior available, why not)``; a library that cannot be used is an error (exit code 4) naming the file."""
    import importlib.util

    if library is None:
        return False, "no cerebellum library given (--library-dir or $ARBORSEG_LIBRARY_DIR)"
    if any(importlib.util.find_spec(m) is None for m in ("bids_app.interfaces.atlas", "bids_app.atlas_library")):
        return False, "the atlas fusion (bids_app.interfaces.atlas) is not available in this ArborSeg build"
    from ..atlas_library import LIBRARY_SPACE, read_library

    read_library(library)  # LibraryError (exit code 4): the file and the problem
    if template != LIBRARY_SPACE:
        return False, (f"the library {library} is in {LIBRARY_SPACE} space and this run's template is {template}: "
                       f"the crops do not share a grid")
    return True, ""


def _check_no_collision(segmentation, parcellation) -> None:
    """Both branches would write the same ``seg-<x>`` files (a whole-brain ensemble in the parcellation's protocol)."""
    from ..bids import seg_entity
    from ..models.checkpoint import ModelError

    if segmentation.active and parcellation.active and segmentation.protocol == parcellation.protocol:
        raise ModelError(f"the whole-brain models ({segmentation.origin}) use the parcellation's protocol "
                         f"{parcellation.protocol!r}: both would write the seg-{seg_entity(parcellation.protocol)} "
                         f"outputs; use aseg whole-brain models, or --no-parc")


def _run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]


def _require_cuda() -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ResourceError("--device cuda: PyTorch is not installed; install it with CUDA support or use --device cpu")
    import torch

    if not torch.cuda.is_available():
        raise ResourceError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")


def _require_mps() -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ResourceError("--device mps: PyTorch is not installed; use --device cpu")
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise ResourceError("--device mps: Apple MPS is not available to PyTorch; use --device cpu or auto")


def _private_caches(work_dir: Path) -> None:
    """Caches of the libraries go to the work dir, never to ``$HOME`` (read-only or shared in containers)."""
    if not os.getenv("MPLCONFIGDIR"):  # matplotlib creates it when it first needs it
        os.environ["MPLCONFIGDIR"] = str(work_dir / ".cache" / "matplotlib")


def main(argv: list[str] | None = None) -> int:
    from .parser import get_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = get_parser().parse_args(argv)
    setup_logging(opts.verbose)
    os.umask(opts.umask)  # every file and folder written from here on (Nipype's workers inherit it)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    # bit-identical CPU results whatever the thread count: MKL reads this at its first call only
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    try:
        config, clean = build_config(opts, argv)
        _private_caches(config.work_dir)
        if config.analysis_level == "participant":
            from .participant import run_participant

            return run_participant(config, clean_workdir=clean)
        from .group import run_group

        return run_group(config)
    except ArborSegError as exc:
        LOGGER.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        LOGGER.error("interrupted; re-run with the same --work-dir to resume")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        LOGGER.error("unexpected error: %s: %s (run with -v for the traceback)", type(exc).__name__, exc)
        LOGGER.debug("traceback", exc_info=True)
        return EXIT_PARTICIPANT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

