"""The BIDS-Apps command line of ArborSeg (conventions of fMRIPrep and MRIQC)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._version import __version__

EPILOG = """\
exit codes:
  0    every selected participant was processed (or the group step finished)
  1    the run finished but at least one participant failed (see the summary and logs/)
  2    command-line usage error
  3    the input dataset, the participant/session selection, a filter file or the
       output/work location cannot be used (one line says which file and why)
  4    a required resource (e.g. a TemplateFlow template, a model checkpoint) is not
       available or is unusable
  130  interrupted (Ctrl-C); re-run with the same --work-dir to resume
"""


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


def _voxel_size(value: str) -> float:
    number = _positive_float(value)
    if not 0.5 <= number <= 3.0:
        raise argparse.ArgumentTypeError(f"{value!r}: the conformed voxel size must be between 0.5 and 3 mm")
    return number


#: Nipype execution plugins ``--plugin`` passes through (Nipype's own names)
PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "PBS", "LSF", "Condor")


def _umask(value: str) -> int:
    try:
        number = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an octal umask such as 0022 or 0002") from None
    if not 0 <= number <= 0o777:
        raise argparse.ArgumentTypeError(f"{value!r} is not an octal umask between 0000 and 0777")
    if number & 0o400:
        raise argparse.ArgumentTypeError(f"{value!r} would make the outputs unreadable for their owner")
    return number


def _plugin_args(value: str) -> dict:
    """A JSON object, or a JSON/YAML file holding one (``{"sbatch_args": "-p short --mem 8G"}``)."""
    import json

    text, origin = value, "--plugin-args"
    path = Path(value).expanduser()
    if not value.lstrip().startswith("{") and path.is_file():
        text, origin = path.read_text(), str(path)
        if path.suffix in (".yml", ".yaml"):
            try:
                import yaml
            except ImportError:
                raise argparse.ArgumentTypeError(f"{path}: reading YAML needs PyYAML; give JSON instead") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise argparse.ArgumentTypeError(f"{path}: not valid YAML ({exc})") from None
            text = None
    if text is not None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{origin}: not a JSON object nor a JSON/YAML file ({exc.msg} at "
                                             f"character {exc.pos})") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{origin}: must be a JSON object of plugin arguments, e.g. "
                                         '\'{"sbatch_args": "-p short"}\'')
    return data


def env_path(name: str) -> Path | None:
    """The folder named by environment variable ``name`` (a default of an option), or ``None``."""
    return Path(os.environ[name]) if os.getenv(name) else None


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: file not found")
    return path.resolve()


class _ListModels(argparse.Action):
    """``--list-models``: print the installed model checkpoints and exit (like ``--version``)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..models.checkpoint import list_models

        models = list_models()
        if not models:
            sys.stdout.write("no models installed (bids_app/data/models/ or $ARBORSEG_MODELS_DIR)\n")
            parser.exit(0)
        columns = ("name", "architecture", "protocol", "channels", "parameters", "size_mb", "licence")
        rows = [["+".join(map(str, v)) if isinstance(v := m.get(c, ""), list) else str(v) for c in columns]
                for m in models]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        sys.stdout.write("\n".join(lines) + "\n")
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """``argparse`` plus the option conflicts a mutually exclusive group cannot express."""

    def parse_known_args(self, args=None, namespace=None):
        opts, extra = super().parse_known_args(args, namespace)
        if getattr(opts, "no_seg", False) and getattr(opts, "parc_models", None):
            self.error("argument --parc-models: not allowed with argument --no-seg (which switches off the "
                       "whole-brain segmentation and the cortical parcellation)")
        tta, samples = getattr(opts, "tta", None), getattr(opts, "mc_samples", None)
        if tta and samples is not None:
            from ..models.segment import TTA_VIEWS

            if samples < len(TTA_VIEWS[tta]):
                self.error(f"argument --tta: {tta} has {len(TTA_VIEWS[tta])} views and needs at least as many "
                           f"--mc-samples (got {samples})")
        return opts, extra


def get_parser() -> argparse.ArgumentParser:
    """The parser of ``arborseg``; every option is documented in the README."""
    parser = _Parser(
        prog="arborseg",
        description="ArborSeg: preprocessing and segmentation of anatomical MRI in BIDS datasets (BIDS App).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root folder of a BIDS dataset (read only, never written)")
    parser.add_argument("output_dir", type=Path,
                        help="folder of the derivatives (anywhere, e.g. <bids_dir>/derivatives/arborseg)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant' processes subjects; 'group' gathers their results into group tables "
                             "and a group report")
    parser.add_argument("--version", action="version", version=f"ArborSeg {__version__}")
    parser.add_argument("--list-models", action=_ListModels,
                        help="list the installed segmentation models (weights + manifests) and exit")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL", default=[],
                     help="subjects to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL", default=[],
                     help="sessions to process, with or without 'ses-' (default: all)")
    sel.add_argument("--bids-filter-file", "--bids_filter_file", type=_existing_file, metavar="FILE",
                     help="JSON with pybids filters per image kind, e.g. {\"t1w\": {\"acquisition\": \"mprage\"}}")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                     help="do not check file names against the BIDS specification")

    perf = parser.add_argument_group("resources")
    perf.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                      help="folder of intermediate results; re-using it resumes an interrupted run "
                           "(default: ./work, which must not lie inside the input dataset)")
    perf.add_argument("--clean-workdir", action="store_true",
                      help="delete this run's intermediate results after a fully successful run")
    perf.add_argument("--nprocs", "--nthreads", "--n-cpus", type=_positive_int, metavar="N",
                      default=None, help="processes run in parallel (default: all CPUs)")
    perf.add_argument("--omp-nthreads", type=_positive_int, metavar="N", default=None,
                      help="threads per process for ANTs/ITK and PyTorch (default: --nprocs, at most 8). With more "
                           "than 1, ANTs' denoising differs slightly from run to run; use 1 (or --no-denoise) "
                           "for bit-identical results")
    perf.add_argument("--mem-gb", type=_positive_float, metavar="GB",
                      help="upper bound on memory the scheduler may plan for (default: no bound)")
    perf.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                      help="where neural networks run: auto picks CUDA, then Apple MPS, when available "
                           "(default: auto)")
    perf.add_argument("--random-seed", type=int, default=42, metavar="SEED",
                      help="seed of every random choice (registration sampling, MC-dropout); default 42")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop the whole run at the first failing step instead of finishing other subjects")
    perf.add_argument("--plugin", choices=PLUGINS, metavar="NAME", default=None,
                      help="Nipype execution plugin: " + ", ".join(PLUGINS) + " (default: MultiProc with "
                           "--nprocs, Linear when --nprocs 1). SLURM/SGE/PBS/LSF/Condor submit each step as a "
                           "cluster job; SLURMGraph submits the whole graph at once with dependencies and waits for it")
    perf.add_argument("--plugin-args", type=_plugin_args, metavar="JSON|FILE", default=None,
                      help="arguments of the plugin as a JSON object or a JSON/YAML file, e.g. "
                           "'{\"sbatch_args\": \"-p short --mem 8G\"}' (see Nipype's plugin documentation)")
    perf.add_argument("--umask", type=_umask, metavar="OCTAL",
                      default=os.getenv("ARBORSEG_UMASK", "0022"),
                      help="permission mask of every file and folder ArborSeg writes (default: $ARBORSEG_UMASK, "
                           "else 0022: readable by the group and others; 0002 also lets the group write; "
                           "0027 hides the outputs from others)")

    wf = parser.add_argument_group("workflow")
    wf.add_argument("--template", default="MNI152NLin6Asym", metavar="NAME",
                    help="TemplateFlow template for registration and the cerebellum crop (default: MNI152NLin6Asym)")
    wf.add_argument("--templateflow-home", type=Path, metavar="DIR",
                    default=env_path("TEMPLATEFLOW_HOME"),
                    help="folder of TemplateFlow templates (default: $TEMPLATEFLOW_HOME, else the resource cache)")
    wf.add_argument("--atlas-dir", type=Path, metavar="DIR",
                    default=env_path("ARBORSEG_ATLAS_DIR"),
                    help="folder of the cerebellar atlases (default: $ARBORSEG_ATLAS_DIR, else the resource "
                         "cache); 'arborseg-resources status' lists what is found where")
    wf.add_argument("--cache-dir", type=Path, metavar="DIR",
                    default=env_path("ARBORSEG_CACHE_DIR"),
                    help="resource cache: templates and atlases are looked up there and downloaded into it when "
                         "missing (default: $ARBORSEG_CACHE_DIR, else <work-dir>/cache; never $HOME)")
    wf.add_argument("--offline", action="store_true", default=os.getenv("ARBORSEG_OFFLINE", "0") == "1",
                    help="never download a resource (default: $ARBORSEG_OFFLINE=1 sets it)")
    wf.add_argument("--voxel-size", type=_voxel_size, default=1.0, metavar="MM",
                    help="isotropic voxel size of the conformed T1w space (default 1.0 mm)")
    wf.add_argument("--no-denoise", action="store_true", help="skip non-local means denoising")
    wf.add_argument("--reports-only", action="store_true",
                    help="only rebuild the HTML reports from the outputs of an earlier run")

    seg = parser.add_argument_group("whole-brain segmentation")
    choice = seg.add_mutually_exclusive_group()
    choice.add_argument("--seg-models", nargs="+", type=Path, metavar="PATH",
                        help="model checkpoints (<name>.json or <name>.safetensors, or the stem) of the whole-brain "
                             "ensemble; default: the installed models whose manifest has \"task\": \"wholebrain\"")
    choice.add_argument("--no-seg", action="store_true",
                        help="do not run the whole-brain segmentation nor the cortical parcellation")
    seg.add_argument("--tta", choices=["none", "flip", "shift", "flip-shift"], default=None,
                     help="test-time augmentation of the whole-brain segmentation and the parcellation: the MC "
                          "samples are spread over the left-right mirror (flip), a model grid shifted by half a "
                          "voxel (shift) or all four views (flip-shift); default flip-shift (flip with 2 or 3 "
                          "samples, none with 1). The shipped QC calibrations were made with flip-shift")
    seg.add_argument("--refinement", choices=["intensity", "none"], default="intensity",
                     help="refinement of the whole-brain and parcellation probabilities on the T1w grid: "
                          "'intensity' sharpens them with the subject's own intensity histogram of every "
                          "structure (the networks run on a 2 mm grid); 'none' keeps the networks' probabilities "
                          "(default intensity)")
    seg.add_argument("--mc-samples", type=_positive_int, default=15, metavar="N",
                     help="Monte-Carlo dropout samples per subject for the segmentation, parcellation and "
                          "cerebellum QC (default 15)")

    parc = parser.add_argument_group("cortical parcellation")
    parc_choice = parc.add_mutually_exclusive_group()
    parc_choice.add_argument("--parc-models", nargs="+", type=Path, metavar="PATH",
                             help="model checkpoints of the cortical parcellation ensemble (dkt-aseg protocol; "
                                  "writes the seg-dkt outputs); default: the installed models whose manifest has "
                                  "\"task\": \"parcellation\"")
    parc_choice.add_argument("--no-parc", action="store_true", help="do not run the cortical parcellation")

    cer = parser.add_argument_group("cerebellar lobules")
    cer_choice = cer.add_mutually_exclusive_group()
    cer_choice.add_argument("--cerebellum-models", nargs="+", type=Path, metavar="PATH",
                            help="model checkpoints of the cerebellum cascade: hemisphere models (\"task\": "
                                 "\"cerebellum-hemispheres\") and lobule models (\"task\": \"cerebellum-lobules\"), "
                                 "at least one of each; default: the installed models with those tasks (the branch "
                                 "is skipped with a warning when there are none)")
    cer_choice.add_argument("--no-cerebellum", action="store_true",
                            help="do not segment the cerebellar lobules")
    cer.add_argument("--library-dir", type=Path, metavar="DIR", default=env_path("ARBORSEG_LIBRARY_DIR"),
                     help="labelled cerebellum library (made by arborseg-build-library): its atlases are registered "
                          "and fused into a prior that the lobule models take as extra channels (default: "
                          "$ARBORSEG_LIBRARY_DIR; without a library the lobule models without prior channels are "
                          "used)")
    cer.add_argument("--n-atlases", type=_positive_int, metavar="N", default=None,
                     help="atlases of the library fused into the prior (default: the atlas fusion's own default)")
    cer.add_argument("--no-superres", action="store_true",
                     help="skip the x2 super-resolution of the cerebellum crop (the 0.5 mm res-hi T1w derivative "
                          "and its report figure); it runs by default when a model with \"task\": \"superres\" is "
                          "installed")
    cer.add_argument("--cerebellum-t2", choices=["auto", "real", "synth", "none"], default="auto",
                     help="the T2w of the cerebellum branch: auto uses the subject's T2w (rigidly registered to the "
                          "T1w) when there is one, else a synthetic T2w predicted from the T1w; real only the "
                          "subject's own (none without one); synth always the synthetic one; none no T2 stage "
                          "(default: auto)")

    other = parser.add_argument_group("other")
    other.add_argument("-v", "--verbose", action="count", default=0,
                       help="more log messages (-v: details, -vv: Nipype's own messages)")
    return parser
