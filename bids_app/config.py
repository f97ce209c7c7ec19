"""Frozen configuration of one ArborSeg run.

The command line is parsed into these dataclasses once; workflow factories receive the pieces they
need as explicit arguments. The resolved configuration is written to the derivatives as TOML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PreprocConfig:
    """Parameters of the classical preprocessing stages (all documented in the README)."""

    #: isotropic voxel size (mm) of the conformed T1w grid every later stage works on
    voxel_size: float = 1.0
    #: margin (mm) kept around the head when the conformed grid is cropped to the head
    crop_margin_mm: float = 10.0
    #: non-local means: patch radius and search radius in voxels (ANTs DenoiseImage -p / -r)
    denoise: bool = True
    denoise_patch_radius: int = 1
    denoise_search_radius: int = 1
    denoise_noise_model: str = "Rician"
    #: N4: shrink factor, iterations per level, B-spline distance (mm), convergence threshold
    n4_shrink_factor: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    n4_spline_distance_mm: float = 100.0
    n4_convergence: float = 1e-6
    #: brightness percentile inside the brain mask mapped to 1.0 by intensity normalisation
    normalise_percentile: float = 99.0
    #: resolution (mm) of the TemplateFlow image used as the registration target
    registration_resolution: int = 2


@dataclass(frozen=True)
class SegmentationConfig:
    """One MC-dropout ensemble branch (README "Whole-brain segmentation"): the whole-brain
    segmentation (``task="wholebrain"``) or the cortical parcellation (``task="parcellation"``)."""

    #: False with ``--no-seg`` (both branches) or ``--no-parc`` (the parcellation)
    enabled: bool = True
    #: model manifests (``.json``) of the ensemble; empty when none is installed and none was given
    checkpoints: tuple[Path, ...] = ()
    #: where the checkpoints came from: ``"--seg-models"``, ``"--parc-models"`` or ``"installed"``
    origin: str = "installed"
    #: label protocol shared by the checkpoints (e.g. ``aseg``, ``dkt-aseg``)
    protocol: str = ""
    #: Monte-Carlo dropout samples per subject
    mc_samples: int = 15
    #: test-time augmentation (``arborseg --tta``; a key of ``bids_app.models.segment.TTA_VIEWS``)
    tta: str = "none"
    #: refinement of the probabilities (``arborseg --refinement``; ``bids_app.core.refinement.REFINEMENTS``)
    refinement: str = "none"
    #: the manifest task of the branch: ``"wholebrain"`` or ``"parcellation"``
    task: str = "wholebrain"
    #: the option that switched the branch off (``--no-seg`` or ``--no-parc``)
    switched_off_by: str = "--no-seg"

    @property
    def active(self) -> bool:
        """True when the branch runs: switched on and at least one model."""
        return self.enabled and bool(self.checkpoints)

    @property
    def reason(self) -> str:
        """Why the branch does not run ("" when it does)."""
        if not self.enabled:
            return f"switched off with {self.switched_off_by}"
        if not self.checkpoints:
            if self.task == "parcellation":
                return ("no cortical parcellation models are installed (bids_app/data/models/ or "
                        "$ARBORSEG_MODELS_DIR); pass --parc-models to use your own")
            return ("no whole-brain segmentation models are installed (bids_app/data/models/ or "
                    "$ARBORSEG_MODELS_DIR); pass --seg-models to use your own")
        return ""


def _parcellation_default() -> SegmentationConfig:
    return SegmentationConfig(task="parcellation")


#: values of ``--cerebellum-t2``
T2_MODES = ("auto", "real", "synth", "none")


def resolve_t2_source(mode: str, *, has_t2w: bool, synth_available: bool) -> tuple[str, str]:
    """Which T2 the cerebellum branch of a subject uses: ``("real" | "synthetic" | "none", reason)``.

    ``auto``: the subject's T2w when there is one, else the synthetic T2w; ``real``: only the
    subject's T2w (none without one); ``synth``: always the synthetic one; ``none``: no T2 stage.
    Synthesis needs an installed T2-synthesis model (``synth_available``). ``reason`` says why the
    choice was made when it is not the obvious one ("" otherwise).
    """
    if mode not in T2_MODES:
        raise ValueError(f"unknown T2 mode {mode!r} (known: {', '.join(T2_MODES)})")
    if mode == "none":
        return "none", "switched off with --cerebellum-t2 none"
    if mode in ("auto", "real") and has_t2w:
        return "real", ""
    if mode == "real":
        return "none", "--cerebellum-t2 real and the subject has no T2w"
    if synth_available:
        return "synthetic", "the subject has no T2w" if mode == "auto" else ""
    why = "no T2-synthesis model is installed (\"task\": \"t2synth\" in bids_app/data/models/ or $ARBORSEG_MODELS_DIR)"
    return "none", (f"the subject has no T2w and {why}" if mode == "auto" else why)


@dataclass(frozen=True)
class CerebellumConfig:
    """The cerebellum branch (README "Cerebellar lobules"): the hemisphere -> lobule cascade ensemble on the
    template-space crop, with the atlas prior when a library is given."""

    #: False with ``--no-cerebellum``
    enabled: bool = True
    #: manifests of net 1 (``task: cerebellum-hemispheres``) and of the chosen net 2 (``cerebellum-lobules``)
    hemisphere_checkpoints: tuple[Path, ...] = ()
    lobule_checkpoints: tuple[Path, ...] = ()
    #: ``"--cerebellum-models"`` or ``"installed"``
    origin: str = "installed"
    #: the labelled cerebellum library (``--library-dir`` / ``$ARBORSEG_LIBRARY_DIR``)
    library_dir: Path | None = None
    #: whether the atlas prior is computed and given to the lobule models
    use_prior: bool = False
    #: why it is not (recorded in the QC JSON as ``atlas_prior.reason``)
    prior_reason: str = ""
    #: the shipped population prior, given to lobule models with ``population:`` channels (no library)
    population_prior: Path | None = None
    #: atlases fused into the prior (``--n-atlases``; None: the atlas fusion's default)
    n_atlases: int | None = None
    #: Monte-Carlo dropout samples of each network of the cascade
    mc_samples: int = 15
    #: why the branch is skipped although switched on (no or incomplete installed models)
    missing: str = ""
    #: the x2 super-resolution of the crop (False with ``--no-superres``)
    superres: bool = True
    #: manifest of the super-resolution model (``task: superres``); None: none installed, the stage is skipped
    superres_checkpoint: Path | None = None
    #: ``--cerebellum-t2``: ``auto`` (the subject's T2w, else synthetic), ``real``, ``synth`` or ``none``
    t2_mode: str = "auto"
    #: manifest of the T2-synthesis model (``task: t2synth``); None: none installed
    t2synth_checkpoint: Path | None = None

    @property
    def superres_active(self) -> bool:
        """True when the crop is super-resolved: switched on and a model."""
        return self.superres and self.superres_checkpoint is not None

    @property
    def superres_reason(self) -> str:
        """Why the super-resolution does not run ("" when it does)."""
        if not self.superres:
            return "switched off with --no-superres"
        if self.superres_checkpoint is None:
            return ("no super-resolution model is installed (\"task\": \"superres\" in bids_app/data/models/ or "
                    "$ARBORSEG_MODELS_DIR)")
        return ""

    def t2_source(self, has_t2w: bool) -> tuple[str, str]:
        """``(source, reason)`` of the T2 stage of a subject: see :func:`resolve_t2_source`."""
        return resolve_t2_source(self.t2_mode, has_t2w=has_t2w, synth_available=self.t2synth_checkpoint is not None)

    @property
    def active(self) -> bool:
        """True when the branch runs: switched on, and hemisphere and lobule models."""
        return self.enabled and bool(self.hemisphere_checkpoints) and bool(self.lobule_checkpoints)

    @property
    def reason(self) -> str:
        """Why the branch does not run ("" when it does)."""
        if not self.enabled:
            return "switched off with --no-cerebellum"
        if not self.active:
            return self.missing or ("no cerebellum models are installed (bids_app/data/models/ or "
                                    "$ARBORSEG_MODELS_DIR); pass --cerebellum-models to use your own")
        return ""


@dataclass(frozen=True)
class RunConfig:
    """Everything one invocation of ``arborseg`` decided, resolved to absolute paths."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    skip_bids_validation: bool = False
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    device: str = "auto"
    random_seed: int = 42
    stop_on_first_crash: bool = False
    reports_only: bool = False
    template: str = "MNI152NLin6Asym"
    templateflow_home: Path | None = None
    #: folder of the cerebellar atlases (``--atlas-dir`` / ``$ARBORSEG_ATLAS_DIR``)
    atlas_dir: Path | None = None
    #: resource cache (``--cache-dir`` / ``$ARBORSEG_CACHE_DIR``, else ``<work_dir>/cache``)
    cache_dir: Path | None = None
    offline: bool = False
    #: Nipype execution plugin and its arguments (``None``: MultiProc or Linear from ``nprocs``)
    plugin: str | None = None
    plugin_args: dict[str, Any] = field(default_factory=dict)
    #: permission mask of everything written (``--umask``)
    umask: int = 0o022
    verbosity: int = 0
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    #: the cortical parcellation branch (``task="parcellation"``)
    parcellation: SegmentationConfig = field(default_factory=_parcellation_default)
    #: the cerebellum branch
    cerebellum: CerebellumConfig = field(default_factory=CerebellumConfig)
    version: str = ""
    command: str = ""
    run_uuid: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A TOML-serialisable dict (paths as strings, no None values)."""

        def clean(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if v is not None}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return clean(dataclasses.asdict(self))

    def to_toml(self) -> str:
        import tomli_w

        data = self.to_dict()
        preproc = data.pop("preproc")
        segmentation = data.pop("segmentation")
        parcellation = data.pop("parcellation")
        cerebellum = data.pop("cerebellum")
        return tomli_w.dumps({"arborseg": data, "preproc": preproc, "segmentation": segmentation,
                              "parcellation": parcellation, "cerebellum": cerebellum})
