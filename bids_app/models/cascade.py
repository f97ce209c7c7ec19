"""Cerebellar lobules with a DeepCERES-style cascade ensemble and MC-dropout QC.

Input: the cerebellum crop of ArborSeg's template-space T1w (:data:`bids_app.core.crop.CEREBELLUM_BOX_MM`,
MNI152NLin6Asym, 1 mm in real runs, intensity-normalised so that the 99th percentile inside the
brain is 1). Two ensembles of checkpoints, told apart by their manifest's ``task``:

* **net 1** (``task: "cerebellum-hemispheres"``, protocol ``hemispheres``: 0 background,
  1 Left-Cerebellum, 2 Right-Cerebellum), one input channel ``T1w``;
* **net 2** (``task: "cerebellum-lobules"``, protocol ``lobules13``: background and 13 side-free
  lobular classes), input channels either ``[T1w]`` or ``[T1w, prior:<class>, ...]`` with one
  prior channel for each of the 13 lobular classes of ``lobules13`` (``<class>`` is the class name,
  e.g. ``prior:Cerebellum-Lobule-VI``, or its abbreviation, ``prior:VI``; any order).

Stages (every sample and every ensemble mean on the crop grid):

1. **Net 1.** For every voxel size among the members the crop goes to the model grid exactly as
   in the whole-brain engine (:func:`bids_app.models.segment.block_mean` for integer ratios, e.g.
   a 2x block mean for 2 mm models on the 1 mm crop, else a linear zoom) and the probabilities
   come back with :func:`bids_app.models.segment.upsample`. MC sample ``t`` of the ensemble,
   ``P1_t``, is the mean of the members' softmax (each with its own dropout draw), members of
   different voxel sizes weighted by their number. ``P1 = mean_t P1_t``.
2. **Mask.** The cerebellum mask is ``argmax P1`` in {Left, Right}, dilated by
   :data:`MASK_DILATION` (2) voxels (6-connected structuring element, applied twice), as in
   DeepCERES.
3. **Net 2** sees ``[T1w * mask, prior channels]``: the T1w masked by the dilated mask and, for
   models with prior channels, the atlas prior (``lobules`` protocol, 27 channels) folded to the
   13 side-free classes by summing left and right. The fold is read from the mapping table
   ``lobules_to_lobules13.tsv`` (:func:`fold_prior`); the prior itself is not masked. Its MC
   samples ``P2_t`` are drawn like those of net 1.
4. **Combination** (:func:`combine`), per MC sample ``t``, into the 27 classes of the ``lobules``
   protocol, in that protocol's order::

       P(background)       = P1(bg) + (P1(L) + P1(R)) * P2(bg)
       P(side s, lobule k) = P1(s) * P2(k)            s in {L, R}, k in 1..13

   which sums to 1 wherever ``P1`` and ``P2`` do. Which ``(side, lobule)`` each class of
   ``lobules`` is comes from the tables ``lobules_to_hemispheres.tsv`` and
   ``lobules_to_lobules13.tsv`` (:func:`cascade_index`), never from code.
5. **Result.** The probabilities are ``mean_t P_t`` (the MC predictive mean of the combined
   probabilities), the labels their argmax as ``lobules`` values (0, 1-13 left, 101-113 right), the
   uncertainty map the predictive entropy (nats) of that mean.

QC, as for the whole-brain segmentation (:mod:`bids_app.models.mcdropout`): the volume of every
structure in every combined sample (argmax of ``P_t`` on the crop grid) gives its coefficient of
variation (CV, ``100 * std / mean``, ``ddof=0``), their mean over the structures (background and
structures absent from every sample excluded), and ``pass``/``warn`` flags. The thresholds are the
cascade's own when a member manifest holds a ``qc_calibration`` for exactly these hemisphere and
lobule models (``arborseg-train calibrate-qc`` on the cerebellum cross-validation), else the
modality's default (1 % for T1w). The hemisphere QC merges the sample volumes through
``lobules_to_hemispheres.tsv``.

MC samples are drawn one at a time (:func:`bids_app.models.mcdropout.mc_dropout` with one sample,
its seed derived from ``(seed, stage, sample)``), so only one sample of each stage is held in
memory besides net 1's samples (3 channels), at the price of re-running each network's MC prefix
per sample.

Nothing here imports torch at module import time: :func:`select_cerebellum_models` checks the
checkpoints for the command line without it.

``python -m bids_app.models.cascade SPEC.json OUTPUTS.json`` runs :func:`cerebellum_files` in a
fresh process (what the Nipype interface does; see :mod:`bids_app.models.segment_files`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.labels import Protocol, class_merge_matrix, load_mapping, load_protocol, merge_probabilities
from ..core.qc_calibration import class_thresholds, find_calibration, protocol_thresholds, samples_warning
from .checkpoint import ModelError, _split_path, models_with_task, verify_checkpoint
from .segment_files import _num, calibration_summary, structure_rows

log = logging.getLogger(__name__)

#: manifest ``task`` of the hemisphere networks (net 1) and of the lobule networks (net 2)
HEMISPHERES_TASK = "cerebellum-hemispheres"
LOBULES_TASK = "cerebellum-lobules"
CEREBELLUM_TASKS = (HEMISPHERES_TASK, LOBULES_TASK)
#: label protocols of net 1, net 2 and of the combined result
HEMISPHERES_PROTOCOL = "hemispheres"
LOBULES13_PROTOCOL = "lobules13"
OUTPUT_PROTOCOL = "lobules"
#: the ``seg-<label>`` entity of the cerebellum derivatives
CEREBELLUM_SEG = "cerebellum"
#: prefix of the prior input channels of net 2 (``prior:<lobules13 class name or abbreviation>``): the
#: subject-specific atlas prior (a library); ``population:<class>``: the shipped population prior (no library)
PRIOR_PREFIX = "prior:"
POPULATION_PREFIX = "population:"
PRIOR_KINDS = {PRIOR_PREFIX: "atlas", POPULATION_PREFIX: "population"}
#: voxels by which net 1's cerebellum mask is dilated before it masks net 2's T1w
MASK_DILATION = 2
#: weight of the atlas prior's left / right / background probabilities in net 1's, when the lobule
#: models take the subject-specific atlas prior (3-fold CV, README "The library path on all folds")
HEMISPHERE_PRIOR_WEIGHT = 0.5


# --------------------------------------------------------------------------- label maths (pure)


def cascade_index(output: str = OUTPUT_PROTOCOL, hemispheres: str = HEMISPHERES_PROTOCOL,
                  side_free: str = LOBULES13_PROTOCOL) -> tuple[np.ndarray, np.ndarray]:
    """``(side, lobule)``: for every class of ``output`` its class position in ``hemispheres`` and in
    ``side_free``, read from the tables ``<output>_to_<hemispheres>.tsv`` and ``<output>_to_<side_free>.tsv``.

    Checks that exactly one class (the background) has side 0 and lobule 0, that no other class has
    either, and that every ``(side, lobule)`` pair appears once.
    """
    out = load_protocol(output)
    sides = class_merge_matrix(out, load_protocol(hemispheres), load_mapping(output, hemispheres))
    lobes = class_merge_matrix(out, load_protocol(side_free), load_mapping(output, side_free))
    background = [j for j in range(len(out)) if sides[j] == 0 or lobes[j] == 0]
    if len(background) != 1 or sides[background[0]] != 0 or lobes[background[0]] != 0:
        raise ModelError(f"protocol {output!r}: exactly one class (the background) must map to background in "
                         f"both {hemispheres!r} and {side_free!r}")
    pairs = {(int(s), int(k)) for s, k in zip(sides, lobes)}
    if len(pairs) != len(out):
        raise ModelError(f"protocol {output!r}: two classes map to the same ({hemispheres}, {side_free}) pair")
    return sides, lobes


def combine(p1: np.ndarray, p2: np.ndarray, index: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Cascade probabilities ``(K_out, ...)`` from net 1's ``(K1, ...)`` and net 2's ``(K2, ...)``.

    ``P(bg) = P1(bg) + (1 - P1(bg)) * P2(bg)`` and ``P(s, k) = P1(s) * P2(k)`` for the side ``s`` and
    lobule ``k`` of every other class (:func:`cascade_index`); float32 out.
    """
    sides, lobes = cascade_index() if index is None else index
    p1 = np.asarray(p1, dtype=np.float32)
    p2 = np.asarray(p2, dtype=np.float32)
    if p1.shape[1:] != p2.shape[1:]:
        raise ValueError(f"net 1 gives {p1.shape[1:]}, net 2 {p2.shape[1:]}: not the same grid")
    if p1.shape[0] <= int(sides.max()) or p2.shape[0] <= int(lobes.max()):
        raise ValueError(f"{p1.shape[0]} hemisphere and {p2.shape[0]} lobule channels do not cover the protocol")
    out = np.empty((len(sides),) + p1.shape[1:], dtype=np.float32)
    foreground = p1[1:].sum(axis=0) if p1.shape[0] > 2 else p1[1].copy()
    for j, (s, k) in enumerate(zip(sides, lobes)):
        if s == 0:
            np.multiply(foreground, p2[0], out=out[j])
            out[j] += p1[0]
        else:
            np.multiply(p1[s], p2[k], out=out[j])
    return out


def prior_hemispheres(prior: np.ndarray) -> np.ndarray:
    """The atlas prior ``(27, ...)`` (``lobules`` order, background first) summed per side: ``(3, ...)`` in the
    ``hemispheres`` order (background, left, right), float32."""
    return merge_probabilities(np.asarray(prior, np.float32), load_protocol(OUTPUT_PROTOCOL),
                               load_protocol(HEMISPHERES_PROTOCOL),
                               load_mapping(OUTPUT_PROTOCOL, HEMISPHERES_PROTOCOL)).astype(np.float32)


def _check_hemisphere_weight(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the hemisphere prior weight must be in [0, 1], got {weight}")
    return float(weight)


def mix_hemisphere_prior(p1: np.ndarray, sides: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) p1 + weight sides``: net 1's ``hemispheres`` probabilities averaged with the prior's
    (:func:`prior_hemispheres`)."""
    _check_hemisphere_weight(weight)
    if np.shape(sides) != np.shape(p1):
        raise ValueError(f"net 1 gives {np.shape(p1)}, the prior's hemispheres {np.shape(sides)}: not the same grid")
    w = np.float32(weight)
    return ((1 - w) * np.asarray(p1, np.float32) + w * np.asarray(sides, np.float32)).astype(np.float32)


def fold_prior(prior: np.ndarray, source: str = OUTPUT_PROTOCOL, target: str = LOBULES13_PROTOCOL) -> np.ndarray:
    """The atlas prior ``(K_source, ...)`` (``lobules`` order, background first) folded to the side-free
    classes of ``target`` (left + right summed through ``<source>_to_<target>.tsv``), background
    dropped: ``(K_target - 1, ...)`` float32, class positions ``1..K_target-1``."""
    src, dst = load_protocol(source), load_protocol(target)
    prior = np.asarray(prior, dtype=np.float32)
    if prior.shape[0] != len(src):
        raise ValueError(f"the prior has {prior.shape[0]} channels, protocol {source!r} {len(src)}")
    folded = merge_probabilities(prior, src, dst, load_mapping(source, target))
    if dst.indices[0] != 0:
        raise ValueError(f"protocol {target!r} must start with its background")
    return np.ascontiguousarray(folded[1:], dtype=np.float32)


def cerebellum_mask(p1: np.ndarray, dilation: int = MASK_DILATION) -> np.ndarray:
    """Net 1's cerebellum: ``argmax`` not background, dilated by ``dilation`` voxels (6-connected)."""
    from scipy import ndimage

    mask = np.asarray(p1).argmax(axis=0) != 0
    if dilation > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=int(dilation))
    return mask


def prior_channel_positions(manifest: dict, where: str = "model") -> tuple[int, ...] | None:
    """Net 2's channel layout: ``None`` for ``[T1w]``, else for each prior channel (in input order)
    its index into :func:`fold_prior`'s output. Raises :class:`ModelError` for any other layout."""
    channels = [str(c.get("name", "")) for c in manifest.get("input_channels") or []]
    if not channels or channels[0] != "T1w":
        raise ModelError(f"{where}: the first input channel of a lobule model must be T1w, got {channels[:1]}")
    if len(channels) == 1:
        return None
    l13 = load_protocol(LOBULES13_PROTOCOL)
    lookup: dict[str, int] = {}
    for k in range(1, len(l13)):
        lookup[l13.names[k]] = k - 1
        if l13.abbreviations:
            lookup.setdefault(l13.abbreviations[k], k - 1)
    prefix = _prior_prefix(channels[1])
    positions = []
    for name in channels[1:]:
        if prefix is None or not name.startswith(prefix) or name[len(prefix):] not in lookup:
            raise ModelError(f"{where}: input channel {name!r} is neither T1w nor "
                             f"'{PRIOR_PREFIX}<{LOBULES13_PROTOCOL} class>' / '{POPULATION_PREFIX}<class>' (one "
                             f"kind of prior per model)")
        positions.append(lookup[name[len(prefix):]])
    if sorted(positions) != list(range(len(l13) - 1)):
        raise ModelError(f"{where}: the prior channels must be the {len(l13) - 1} lobular classes of "
                         f"{LOBULES13_PROTOCOL!r}, each once (got {len(positions)})")
    return tuple(positions)


def _prior_prefix(name: str) -> str | None:
    return next((p for p in PRIOR_KINDS if name.startswith(p)), None)


def prior_kind(manifest: dict, where: str = "model") -> str | None:
    """Which prior a lobule model takes: ``None``, ``"atlas"`` (``prior:`` channels, a library) or
    ``"population"`` (``population:`` channels, the shipped population prior); checks the layout."""
    if prior_channel_positions(manifest, where) is None:
        return None
    return PRIOR_KINDS[_prior_prefix(manifest["input_channels"][1]["name"])]


def lobule_input(t1w: np.ndarray, mask: np.ndarray, prior13: np.ndarray | None,
                 positions: tuple[int, ...] | None) -> np.ndarray:
    """Net 2's input ``(C, X, Y, Z)``: ``T1w * mask``, then the folded prior's channels in ``positions``."""
    masked = (np.asarray(t1w, dtype=np.float32) * np.asarray(mask, dtype=bool))[None]
    if positions is None:
        return masked
    if prior13 is None:
        raise ValueError("this lobule model takes prior channels but no atlas prior was given")
    return np.concatenate([masked, np.asarray(prior13, dtype=np.float32)[list(positions)]], axis=0)


# --------------------------------------------------------------------------- checkpoints (no torch)


@dataclass(frozen=True)
class CerebellumModels:
    """The checkpoints (manifest paths) the cascade will use, chosen before the run."""

    hemispheres: tuple[Path, ...]
    lobules: tuple[Path, ...]
    #: the chosen lobule models take the (subject-specific) atlas prior
    prior: bool
    #: why the atlas prior is not used ("" when it is)
    reason: str = ""
    #: lobule models left out (their channel layout does not fit this run)
    unused: tuple[Path, ...] = ()
    #: the chosen lobule models take the shipped population prior instead (no library)
    population: bool = False


def _check_protocol(manifest: dict, expected: str, where: Path) -> None:
    from .segment import protocol_of

    name = manifest["label_protocol"]["name"]
    if name != expected:
        raise ModelError(f"{where}: a {manifest.get('task')} model must use the {expected!r} protocol, not {name!r}")
    protocol_of(manifest)  # the labels must be those of the shipped table


def select_cerebellum_models(paths: Sequence[str | os.PathLike], *, prior_available: bool,
                             prior_reason: str = "no cerebellum library given (--library-dir)",
                             population_available: bool = False) -> CerebellumModels:
    """Check and sort cerebellum checkpoints before any work (no torch); :class:`ModelError` (exit 4).

    Every checkpoint must be a cerebellum model (manifest ``task``), its weights a safetensors file
    matching the manifest's checksum, its protocol ``hemispheres`` (net 1, one T1w channel) or
    ``lobules13`` (net 2, :func:`prior_channel_positions`). At least one of each task is needed.
    The lobule models are chosen by the best prior this run has: the atlas prior (``prior_available``:
    a library) for models with ``prior:`` channels, else the population prior (``population_available``:
    the shipped probabilistic atlas fits the run's crop) for models with ``population:`` channels, else
    the models without prior channels. When the atlas prior is not used, ``reason`` says why. No lobule
    model usable in this run is an error that says what to pass.
    """
    hemis: list[Path] = []
    by_kind: dict[str | None, list[Path]] = {None: [], "atlas": [], "population": []}
    for raw in paths:
        path, manifest = verify_checkpoint(raw)
        task = manifest.get("task")
        if task == HEMISPHERES_TASK:
            _check_protocol(manifest, HEMISPHERES_PROTOCOL, path)
            channels = [c["name"] for c in manifest["input_channels"]]
            if channels != ["T1w"]:
                raise ModelError(f"{path}: hemisphere models take one T1w channel, this one takes {channels}")
            hemis.append(path)
        elif task == LOBULES_TASK:
            _check_protocol(manifest, LOBULES13_PROTOCOL, path)
            by_kind[prior_kind(manifest, str(path))].append(path)
        else:
            raise ModelError(f"{path}: not a cerebellum model (its manifest task is {task!r}; expected "
                             f"{HEMISPHERES_TASK!r} or {LOBULES_TASK!r})")
    if not hemis:
        raise ModelError(f"no {HEMISPHERES_TASK!r} model among the cerebellum models: the cascade needs one")
    if not any(by_kind.values()):
        raise ModelError(f"no {LOBULES_TASK!r} model among the cerebellum models: the cascade needs one")

    def chosen(kind: str | None, reason: str) -> CerebellumModels:
        unused = tuple(p for k, group in by_kind.items() if k != kind for p in group)
        return CerebellumModels(tuple(hemis), tuple(by_kind[kind]), kind == "atlas", reason, unused,
                                population=kind == "population")

    if prior_available and by_kind["atlas"]:
        return chosen("atlas", "")
    if prior_available:
        prior_reason = "no lobule model takes atlas prior channels"
    if population_available and by_kind["population"]:
        return chosen("population", prior_reason)
    if by_kind[None]:
        return chosen(None, prior_reason)
    needs = ", ".join(p.name for p in by_kind["atlas"] + by_kind["population"])
    raise ModelError(f"every lobule model ({needs}) needs a prior this run does not have ({prior_reason}; the "
                     f"population prior: {'available' if population_available else 'not available'}): pass "
                     f"--library-dir (or $ARBORSEG_LIBRARY_DIR) or lobule models without prior channels")


#: the shipped population prior: a probabilistic atlas of the lobules on the MNI cerebellum crop
#: (``python -m bids_app.training.population_prior``; ``lobules`` order, with a ``.json`` sidecar)
POPULATION_PRIOR = Path(__file__).resolve().parent.parent / "data" / "atlases" / "cerebellum-population-prior.nii.gz"
#: the template space of the population prior's grid
POPULATION_PRIOR_SPACE = "MNI152NLin6Asym"


def population_prior_status(template: str, path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """``(the population prior file, "")`` when it can serve this run, else ``(None, why not)`` (no I/O beyond
    checking the file and its sidecar)."""
    path = Path(path) if path is not None else POPULATION_PRIOR
    if not path.is_file():
        return None, f"no population prior installed ({path})"
    if template != POPULATION_PRIOR_SPACE:
        return None, (f"the population prior is on the {POPULATION_PRIOR_SPACE} crop and this run's template is "
                      f"{template}")
    from ..atlas_library import sidecar_path

    sidecar = sidecar_path(path)
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{sidecar}: the population prior's sidecar cannot be read ({exc})") from exc
    if info.get("kind") != "population" or info.get("protocol") != OUTPUT_PROTOCOL:
        raise ModelError(f"{sidecar}: not a population prior of the {OUTPUT_PROTOCOL!r} protocol")
    return path.resolve(), ""


def default_cerebellum_models(folder: str | os.PathLike | None = None) -> list[str]:
    """Manifest paths of the installed checkpoints whose manifest task is a cerebellum task."""
    return models_with_task(CEREBELLUM_TASKS, folder)


def installed_tasks(paths: Sequence[str | os.PathLike]) -> set[str]:
    """The manifest tasks of ``paths`` (unreadable manifests are skipped)."""
    tasks = set()
    for raw in paths:
        try:
            tasks.add(json.loads(_split_path(Path(raw))[0].read_text(encoding="utf-8")).get("task"))
        except (OSError, ValueError, ModelError):
            continue
    return tasks


# --------------------------------------------------------------------------- inference


@dataclass
class CascadeResult:
    """Outcome of :func:`segment_cerebellum` (crop grid)."""

    protocol: Protocol                    # the ``lobules`` protocol
    probabilities: np.ndarray | None      # (27, X, Y, Z) float32, summing to 1
    labels: np.ndarray                    # (X, Y, Z) int16 lobules values
    entropy: np.ndarray                   # (X, Y, Z) float32, nats
    hemisphere_probabilities: np.ndarray  # (3, X, Y, Z) float32, MC mean of net 1
    mask: np.ndarray                      # (X, Y, Z) bool, net 1's dilated cerebellum mask
    mc_volumes_mm3: np.ndarray            # (T, 27) per-sample volumes (crop grid mm3)
    cv_percent: np.ndarray                # (27,)
    mean_cv_percent: float
    qc_flag: str
    qc_threshold: float
    n_samples: int
    seed: int
    modality: str
    voxel_size_mm: tuple[float, float, float]
    prior_used: bool
    hemisphere_manifests: list[dict] = field(default_factory=list)
    lobule_manifests: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    #: per class threshold (percent); None: :attr:`qc_threshold` for every class
    structure_thresholds: np.ndarray | None = None
    #: the ``qc_calibration`` of this cascade's members (None: the modality default)
    qc_calibration: dict | None = None
    #: weight of the atlas prior's hemispheres in net 1's probabilities (0: net 1 alone)
    hemisphere_prior_weight: float = 0.0

    def class_thresholds(self) -> np.ndarray:
        """Per class QC threshold (percent): the calibrated one, else :attr:`qc_threshold`."""
        return class_thresholds(self.structure_thresholds, self.qc_threshold, len(self.cv_percent))

    def structure_flags(self) -> list[str]:
        from .segment import structure_flag

        return [structure_flag(float(c), float(t)) for c, t in zip(self.cv_percent, self.class_thresholds())]


@dataclass
class _Group:
    """Members of one stage that share a voxel size and an input layout."""

    vox: tuple[float, float, float]
    layout: tuple[int, ...] | None
    models: list
    manifests: list
    weight: float = 1.0
    factors: tuple[int, int, int] | None = None
    x: np.ndarray | None = None


def _groups(members: list[tuple[Any, dict]], layout_of) -> list[_Group]:
    from .segment import _voxel_triplet

    groups: dict[tuple, _Group] = {}
    for model, manifest in members:
        vox = _voxel_triplet(manifest["voxel_size_mm"])
        layout = layout_of(manifest)
        group = groups.setdefault((vox, layout), _Group(vox, layout, [], []))
        group.models.append(model)
        group.manifests.append(manifest)
    for group in groups.values():
        group.weight = len(group.models) / len(members)
    return list(groups.values())


def _to_model_grid(image: np.ndarray, group: _Group, image_vox) -> np.ndarray:
    """``(C, X, Y, Z)`` crop-grid channels on the group's model grid (as the whole-brain engine)."""
    from .segment import _integer_factors, _zoom_down, block_mean

    group.factors = _integer_factors(group.vox, image_vox)
    if group.factors is not None:
        return np.stack([block_mean(c, group.factors) for c in image])
    return np.stack([_zoom_down(c, group.vox, image_vox) for c in image])


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The per-call INFO lines of ``name`` (one per MC sample here) go to DEBUG level only."""
    logger = logging.getLogger(name)
    previous = logger.level
    if logger.getEffectiveLevel() < logging.WARNING and not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _check_members(members: list[tuple[Any, dict]], protocol: Protocol, stage: str) -> None:
    from .segment import protocol_of

    for model, manifest in members:
        name = manifest.get("name")
        if manifest["label_protocol"]["name"] != protocol.name:
            raise ModelError(f"{stage} model {name!r} uses protocol {manifest['label_protocol']['name']!r}, "
                             f"expected {protocol.name!r}")
        protocol_of(manifest)
        n_classes = getattr(model, "n_classes", None) or (getattr(model, "config", {}) or {}).get("n_classes")
        if n_classes is not None and int(n_classes) != len(protocol):
            raise ModelError(f"{stage} model {name!r} has {n_classes} classes, protocol {protocol.name!r} "
                             f"{len(protocol)}")


def _sample(groups: list[_Group], stage: int, s: int, seed: int, shape, k: int, **kwargs) -> np.ndarray:
    """MC sample ``s`` of a stage's ensemble on the crop grid ``(k, *shape)``, summing to 1."""
    from .mcdropout import mc_dropout, sample_seed
    from .segment import upsample

    out: np.ndarray | None = None
    draw = sample_seed(seed, stage, s, 0)
    for group in groups:
        mc = mc_dropout(group.models, group.x, n_samples=1, seed=draw, voxel_size_mm=list(group.vox), **kwargs)
        if mc.mean_probs.shape[0] != k:
            raise ModelError(f"the models give {mc.mean_probs.shape[0]} classes, expected {k}")
        up = upsample(mc.mean_probs, shape, group.factors)
        if len(groups) == 1:
            out = up
        elif out is None:
            out = up * np.float32(group.weight)
        else:
            out += up * np.float32(group.weight)
    assert out is not None
    total = out.sum(axis=0)
    np.maximum(total, np.float32(1e-12), out=total)
    out /= total[None]
    return out


def segment_cerebellum(
    crop: np.ndarray,
    hemisphere_models: Any,
    lobule_models: Any,
    *,
    prior: np.ndarray | None = None,
    hemisphere_manifests: Sequence[dict] | None = None,
    lobule_manifests: Sequence[dict] | None = None,
    mc_samples: int = 15,
    seed: int = 42,
    device: str = "auto",
    num_threads: int | None = None,
    modality: str = "T1w",
    image_voxel_mm: float | Sequence[float] = 1.0,
    threshold: float | None = None,
    hemisphere_prior_weight: float | None = None,
) -> CascadeResult:
    """Cerebellar lobules of a normalised ``(X, Y, Z)`` crop; see the module docstring.

    Args:
        crop: float32 cerebellum crop (template space, normalised).
        hemisphere_models, lobule_models: checkpoint paths, or networks with their manifests, or
            ``(network, manifest)`` pairs (as :func:`bids_app.models.segment.segment_volume`).
        prior: the atlas prior ``(27, X, Y, Z)`` in ``lobules`` order, background first; needed
            when a lobule model takes prior channels, ignored otherwise.
        mc_samples, seed: MC-dropout samples of each stage and the seed of every dropout mask.
        image_voxel_mm: voxel size of the crop.
        hemisphere_prior_weight: when the lobule models take the atlas prior, every net-1 sample is
            averaged with the prior's left / right / background probabilities with this weight
            (:func:`mix_hemisphere_prior`); None: :data:`HEMISPHERE_PRIOR_WEIGHT`, 0: net 1 alone.
            The population prior, the same for every subject, is never mixed in.
    """
    from .mcdropout import mean_cv, predictive_entropy, qc_flag, qc_threshold, volume_statistics
    from .segment import _load_members, _voxel_triplet

    t_start = time.perf_counter()
    crop = np.asarray(crop, dtype=np.float32)
    if crop.ndim != 3:
        raise ValueError(f"expected a 3D crop (X, Y, Z), got shape {crop.shape}")
    if not np.isfinite(crop).all():
        raise ValueError("the crop contains NaN or Inf values")
    if mc_samples < 1:
        raise ValueError("mc_samples must be >= 1")
    image_vox = _voxel_triplet(image_voxel_mm)
    shape = crop.shape
    out_protocol = load_protocol(OUTPUT_PROTOCOL)
    hemi_protocol = load_protocol(HEMISPHERES_PROTOCOL)
    l13 = load_protocol(LOBULES13_PROTOCOL)
    index = cascade_index()

    hemis = _load_members(hemisphere_models, hemisphere_manifests)
    lobes = _load_members(lobule_models, lobule_manifests)
    _check_members(hemis, hemi_protocol, "hemisphere")
    _check_members(lobes, l13, "lobule")
    for _, manifest in hemis:
        if [c.get("name") for c in manifest.get("input_channels") or []] != ["T1w"]:
            raise ModelError(f"hemisphere model {manifest.get('name')!r} must take one T1w channel")
    groups1 = _groups(hemis, lambda m: None)
    groups2 = _groups(lobes, lambda m: prior_channel_positions(m, f"lobule model {m.get('name')!r}"))
    prior_used = any(g.layout is not None for g in groups2)
    prior13 = None
    if prior_used:
        if prior is None:
            raise ValueError("a lobule model takes atlas prior channels but no prior was given")
        prior = np.asarray(prior, dtype=np.float32)
        if prior.shape[1:] != shape:
            raise ValueError(f"the prior's grid {prior.shape[1:]} differs from the crop's {shape}")
        prior13 = fold_prior(prior)
    atlas_models = any(prior_kind(m, f"lobule model {m.get('name')!r}") == "atlas" for _, m in lobes)
    hemisphere_weight = 0.0
    if atlas_models and prior is not None:
        hemisphere_weight = _check_hemisphere_weight(  # before any work
            HEMISPHERE_PRIOR_WEIGHT if hemisphere_prior_weight is None else float(hemisphere_prior_weight))
    t_loaded = time.perf_counter()
    kwargs = {"device": device, "num_threads": num_threads, "modality": modality}
    timings = {"load_s": t_loaded - t_start}
    log.info("cerebellum cascade: %d hemisphere and %d lobule model(s)%s on a %s crop, %d MC samples", len(hemis),
             len(lobes), " with the atlas prior" if prior_used else "", "x".join(map(str, shape)), mc_samples)

    from .predictor import Progress

    # stage 1: hemispheres
    for group in groups1:
        group.x = _to_model_grid(crop[None], group, image_vox)
    p1_samples = []
    p1 = np.zeros((len(hemi_protocol),) + shape, dtype=np.float32)
    progress = Progress("cerebellum net 1 (hemispheres): MC samples", mc_samples)
    with _quiet("bids_app.models.mcdropout"):
        for s in range(mc_samples):
            sample = _sample(groups1, 0, s, seed, shape, len(hemi_protocol), **kwargs)
            p1 += sample
            p1_samples.append(sample)
            progress.step()
    p1 /= np.float32(mc_samples)
    if hemisphere_weight > 0:
        sides = prior_hemispheres(prior)  # once: the prior is the same for every sample
        p1 = mix_hemisphere_prior(p1, sides, hemisphere_weight)
        p1_samples = [mix_hemisphere_prior(q, sides, hemisphere_weight) for q in p1_samples]
        del sides
        log.info("cerebellum cascade: net 1's hemispheres averaged with the atlas prior's (weight %.2f)",
                 hemisphere_weight)
    for group in groups1:
        group.x = None
    t1 = time.perf_counter()
    timings["hemispheres_s"] = t1 - t_loaded

    # stage 2: lobules on the masked T1w (+ prior)
    mask = cerebellum_mask(p1)
    log.info("cerebellum cascade: net 1's mask has %d voxels (%d after dilation by %d)",
             int((p1.argmax(axis=0) != 0).sum()), int(mask.sum()), MASK_DILATION)
    if not mask.any():
        log.warning("cerebellum cascade: the hemisphere models found no cerebellum in the crop; every voxel will be "
                    "background (check the registration to the template and the crop)")
    for group in groups2:
        group.x = _to_model_grid(lobule_input(crop, mask, prior13, group.layout), group, image_vox)
    k_out = len(out_protocol)
    total = np.zeros((k_out,) + shape, dtype=np.float64)
    volumes = np.zeros((mc_samples, k_out), dtype=np.float64)
    voxel_volume = float(np.prod(image_vox))
    progress = Progress("cerebellum net 2 (lobules): MC samples", mc_samples)
    with _quiet("bids_app.models.mcdropout"):
        for s in range(mc_samples):
            p2 = _sample(groups2, 1, s, seed, shape, len(l13), **kwargs)
            combined = combine(p1_samples[s], p2, index)
            p1_samples[s] = None  # type: ignore[call-overload]
            del p2
            total += combined
            volumes[s] = np.bincount(combined.argmax(axis=0).ravel(), minlength=k_out)[:k_out] * voxel_volume
            del combined
            progress.step()
    for group in groups2:
        group.x = None
    t2 = time.perf_counter()
    timings["lobules_s"] = t2 - t1

    probs = (total / mc_samples).astype(np.float32)
    del total
    norm = probs.sum(axis=0)
    np.maximum(norm, np.float32(1e-12), out=norm)
    probs /= norm[None]
    labels = out_protocol.to_labels(probs.argmax(axis=0))
    entropy = predictive_entropy(probs)
    _, _, cv = volume_statistics(volumes)
    mcv = mean_cv(cv, 0)
    manifests = [m for _, m in hemis] + [m for _, m in lobes]
    calibration = find_calibration(manifests, [str(m.get("name")) for m in manifests], modality) \
        if threshold is None else None
    warning = samples_warning(calibration, mc_samples)
    if warning:
        log.warning("cerebellum cascade: %s", warning)
    default = qc_threshold(modality) if threshold is None else float(threshold)
    limit, per_class = protocol_thresholds(calibration, out_protocol.name, out_protocol.names, default)
    flag = qc_flag(mcv, threshold=limit)
    timings["total_s"] = time.perf_counter() - t_start
    log.info("cerebellum cascade (%d classes) in %.1f s: mean volume CV %.3f%% -> %s (threshold %.2f%%, %s)", k_out,
             timings["total_s"], mcv, flag, limit,
             "calibrated for these models" if calibration else "the default: no calibration for these models")
    return CascadeResult(
        protocol=out_protocol, probabilities=probs, labels=labels, entropy=np.asarray(entropy, dtype=np.float32),
        hemisphere_probabilities=p1, mask=mask, mc_volumes_mm3=volumes, cv_percent=cv, mean_cv_percent=mcv,
        qc_flag=flag, qc_threshold=limit, n_samples=int(mc_samples), seed=int(seed), modality=modality,
        voxel_size_mm=image_vox, prior_used=prior_used, hemisphere_manifests=[m for _, m in hemis],
        lobule_manifests=[m for _, m in lobes], timings=timings, structure_thresholds=per_class,
        qc_calibration=calibration, hemisphere_prior_weight=hemisphere_weight,
    )


def merged_thresholds(result: CascadeResult, protocol: str) -> tuple[float, np.ndarray]:
    """``(mean threshold, per-class thresholds)`` of a coarser protocol: calibrated, else the result's mean one."""
    coarse = load_protocol(protocol)
    return protocol_thresholds(result.qc_calibration, coarse.name, coarse.names, result.qc_threshold)


def merged_cv(result: CascadeResult, protocol: str) -> tuple[np.ndarray, float, str]:
    """``(cv_percent, mean_cv_percent, qc_flag)`` of a coarser protocol (sample volumes merged first)."""
    from .mcdropout import mean_cv, qc_flag, volume_statistics

    coarse = load_protocol(protocol)
    target = class_merge_matrix(result.protocol, coarse, load_mapping(result.protocol.name, protocol))
    merged = np.zeros((result.mc_volumes_mm3.shape[0], len(coarse)), dtype=np.float64)
    for k, t in enumerate(target):
        merged[:, t] += result.mc_volumes_mm3[:, k]
    _, _, cv = volume_statistics(merged)
    mcv = mean_cv(cv, 0)
    return cv, mcv, qc_flag(mcv, threshold=merged_thresholds(result, protocol)[0])


# --------------------------------------------------------------------------- file adapter


def dseg_tsv(protocol: Protocol) -> str:
    """The text of a BIDS ``dseg.tsv`` of ``protocol`` (index, name, abbreviation, color)."""
    rows = protocol.to_tsv_rows()
    columns = list(rows[0])
    return "\n".join(["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]) + "\n"


def label_map(protocol_name: str = OUTPUT_PROTOCOL) -> dict:
    """``LabelMap`` of a 4D probseg sidecar: label value (as a string) -> structure name, in the protocol's
    class order, which is the order of the volumes (as the atlas prior's sidecar)."""
    protocol = load_protocol(protocol_name)
    return {str(int(v)): name for v, name in zip(protocol.indices, protocol.names)}


def native_volume_scale(inverse_transform: str | os.PathLike) -> float:
    """Native volume of one template-space mm3: ``1 / |det|`` of the linear part of the
    template -> T1w transform as ANTs applies it (it maps T1w points to template points)."""
    from ..core.registration import read_transform

    tx = read_transform(inverse_transform)
    params = np.asarray(tx.parameters, dtype=np.float64)
    if params.size < 9:
        raise ValueError(f"{inverse_transform}: not an affine transform ({params.size} parameters)")
    det = abs(float(np.linalg.det(params[:9].reshape(3, 3))))
    if not det > 0:
        raise ValueError(f"{inverse_transform}: the transform is singular")
    return 1.0 / det


def _models_summary(manifests: Sequence[dict], task: str) -> list[dict]:
    return [{"Name": m.get("name"), "Version": m.get("version"), "Task": task, "Architecture": m.get("architecture"),
             "VoxelSizeMM": m.get("voxel_size_mm"), "LabelProtocol": m.get("label_protocol", {}).get("name"),
             "InputChannels": [c.get("name") for c in m.get("input_channels") or []], "SHA256": m.get("sha256")}
            for m in manifests]


def cerebellum_files(crop_t1w: str, source_file: str, inverse_transform: str, hemisphere_checkpoints: Sequence[str],
                     lobule_checkpoints: Sequence[str], *, out_dir: str, prior_file: str | None = None,
                     prior_json: str | None = None, prior_reason: str = "", mc_samples: int = 15, seed: int = 42,
                     device: str = "auto", num_threads: int | None = None, modality: str = "T1w",
                     icv_ml: float | None = None) -> dict:
    """Run the cascade on the crop file, write every output into ``out_dir``; returns their paths and the QC.

    Writes ``crop_dseg.nii.gz`` (int16 lobules values), ``crop_probseg.nii.gz`` (4D, 27 volumes in
    ``lobules`` order), ``crop_entropy.nii.gz`` on the crop grid; ``dseg.nii.gz`` on the grid of the raw
    T1w ``source_file`` (nearest neighbour through ``inverse_transform``); ``morph.tsv`` (native
    volumes: crop-grid counts x :func:`native_volume_scale`), ``dseg.tsv`` and ``qc.json``.
    """
    import nibabel as nb

    from ..atlas_library import prior_probabilities
    from ..bids import atomic_write_json, atomic_write_text
    from ..core import images
    from ..core.files import save_atomic
    from ..core.morphometry import morphometry_rows, write_morphometry_tsv
    from ..core.registration import apply_transform, read_transform

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = nb.load(str(crop_t1w))
    if len(img.shape) != 3:
        raise ValueError(f"{crop_t1w}: the cerebellum crop must be a 3D image, its shape is {img.shape}")
    vox = tuple(float(v) for v in images.zooms_of(img))
    crop = np.asarray(img.dataobj, dtype=np.float32)
    prior = None
    if prior_file:
        pimg = nb.load(str(prior_file))
        if pimg.ndim != 4 or pimg.shape[:3] != img.shape:
            raise ValueError(f"{prior_file}: the atlas prior must be 4D on the crop grid {img.shape}, its shape is "
                             f"{pimg.shape}")
        if not np.allclose(pimg.affine, img.affine, atol=1e-3):
            raise ValueError(f"{prior_file}: the prior is not on the crop's grid (affines differ: "
                             f"{np.round(pimg.affine[:3], 3).tolist()} vs {np.round(img.affine[:3], 3).tolist()})")
        prior = prior_probabilities(pimg)
    scale = native_volume_scale(inverse_transform)

    result = segment_cerebellum(crop, list(hemisphere_checkpoints), list(lobule_checkpoints), prior=prior,
                                mc_samples=mc_samples, seed=seed, device=device, num_threads=num_threads,
                                modality=modality, image_voxel_mm=vox)
    del prior
    protocol = result.protocol
    outputs: dict[str, Any] = {"protocol": protocol.name, "prior_used": result.prior_used}
    outputs["crop_dseg"] = save_atomic(images.like(img, result.labels, dtype=np.int16), out / "crop_dseg.nii.gz")
    probseg = images.new_image(np.moveaxis(result.probabilities, 0, -1), img.affine, dtype=np.float32)
    outputs["crop_probseg"] = save_atomic(probseg, out / "crop_probseg.nii.gz")
    del probseg
    result.probabilities = None
    outputs["crop_entropy"] = save_atomic(images.like(img, result.entropy, dtype=np.float32),
                                          out / "crop_entropy.nii.gz")

    # native grid of the raw T1w, through the template -> T1w transform
    raw = nb.load(str(source_file))
    reference = images.new_image(np.zeros(raw.shape[:3], np.float32), raw.affine, dtype=np.float32)
    moved = apply_transform(read_transform(inverse_transform), images.like(img, result.labels, dtype=np.float32),
                            reference, interpolation="nearestNeighbor")
    native = np.rint(np.asarray(moved.dataobj, dtype=np.float32)).astype(np.int16)
    outputs["dseg"] = save_atomic(images.new_image(native, raw.affine, dtype=np.int16), out / "dseg.nii.gz")

    # volumes (native mm3), QC, tables
    if icv_ml is None or not icv_ml > 0:
        icv_ml = None
    native_vox = tuple(v * scale ** (1.0 / 3.0) for v in vox)  # a voxel of the crop holds `scale` times its mm3
    flags = result.structure_flags()
    rows = morphometry_rows(result.labels, native_vox, icv_ml, protocol, cv_percent=result.cv_percent,
                            qc_flags=flags)
    outputs["morph"] = write_morphometry_tsv(rows, out / "morph.tsv")
    outputs["dseg_tsv"] = str(atomic_write_text(out / "dseg.tsv", dseg_tsv(protocol)))
    hemi_cv, hemi_mcv, hemi_flag = merged_cv(result, HEMISPHERES_PROTOCOL)
    hemi_limit, hemi_thresholds = merged_thresholds(result, HEMISPHERES_PROTOCOL)
    details = None
    if result.prior_used and prior_json:
        try:
            details = json.loads(Path(prior_json).read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read the atlas prior's summary (%s)", prior_json, exc)
    # "kind": "atlas" (subject-specific, from a library) or "population" (the shipped probabilistic atlas, used
    # without a library; "reason" then says why the subject-specific prior is not)
    kind = (details or {}).get("kind", "atlas") if result.prior_used else None
    atlas: dict[str, Any] = {"used": bool(result.prior_used), "kind": kind,
                             "reason": "" if kind == "atlas" else (prior_reason or "no atlas prior given")}
    if kind == "atlas":  # net 1's sides averaged with the prior's, with this weight
        atlas["hemisphere_prior_weight"] = float(result.hemisphere_prior_weight)
    if details is not None:
        atlas["details"] = details
    qc = {
        "Description": "Monte-Carlo dropout quality control of the cerebellar lobule segmentation (cascade of a "
                       "hemisphere and a lobule ensemble): coefficient of variation (CV) of every structure's volume "
                       "over the MC samples",
        "Task": "cerebellum",
        "Models": _models_summary(result.hemisphere_manifests, HEMISPHERES_TASK)
        + _models_summary(result.lobule_manifests, LOBULES_TASK),
        "MCSamples": result.n_samples, "Seed": result.seed, "Modality": result.modality,
        "LabelProtocol": protocol.name, "MeanCVPercent": _num(result.mean_cv_percent),
        "QCThresholdPercent": result.qc_threshold, "QCFlag": result.qc_flag,
        "QCCalibration": calibration_summary(result),
        "ICVML": None if icv_ml is None else round(float(icv_ml), 3), "VoxelSizeMM": list(vox),
        "NativeVolumeScale": round(scale, 6),
        "MaskDilationVoxels": MASK_DILATION, "CerebellumMaskVoxels": int(result.mask.sum()),
        "Protocols": {
            protocol.name: {"Segmentation": CEREBELLUM_SEG, "MeanCVPercent": _num(result.mean_cv_percent),
                            "QCThresholdPercent": result.qc_threshold, "QCFlag": result.qc_flag,
                            "Structures": structure_rows(protocol, result.cv_percent, result.class_thresholds())},
            HEMISPHERES_PROTOCOL: {"MeanCVPercent": _num(hemi_mcv), "QCThresholdPercent": hemi_limit,
                                   "QCFlag": hemi_flag,
                                   "Structures": structure_rows(load_protocol(HEMISPHERES_PROTOCOL), hemi_cv,
                                                                hemi_thresholds)},
        },
        "atlas_prior": atlas,
        "TimingsSeconds": {k: round(float(v), 3) for k, v in result.timings.items()},
    }
    outputs["qc_json"] = str(atomic_write_json(out / "qc.json", qc))
    outputs["mean_cv_percent"] = _num(result.mean_cv_percent)
    outputs["qc_flag"] = result.qc_flag
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bids_app.models.cascade SPEC.json OUTPUTS.json``; exit 1 with one line on failure."""
    from .segment_files import spec_main

    return spec_main(argv, "bids_app.models.cascade", cerebellum_files)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
