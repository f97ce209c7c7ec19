"""Whole-brain segmentation with MC-dropout QC: one array in, probabilities, labels and QC out.

:func:`segment_volume` is the single entry point that the participant pipeline and the
cross-validation scripts share. It takes ArborSeg's conformed T1w (axis-aligned RAS grid,
normally 1 mm, intensity-normalised so that the 99th percentile inside the ICV is 1, zero outside
the ICV) and an ensemble of checkpoints that share one label protocol:

1. **To the model grid.** For every voxel size among the members, the image is resampled to that
   grid. When ``model voxel / image voxel`` is an integer ``k`` (per axis) this is a block mean:
   each axis is zero-padded at its end to a multiple of ``k`` and block ``i`` averages the image
   voxels ``k*i .. k*i + k - 1``. Otherwise :func:`scipy.ndimage.zoom` (linear, ``grid_mode``:
   the fields of view coincide) is used.
2. **MC dropout** (:func:`bids_app.models.mcdropout.mc_dropout`): ``mc_samples`` samples, each the
   equally weighted mean of the members' softmax on that grid.
3. **Back to the image grid.** The mean probabilities (and the predictive entropy) are brought
   back with trilinear interpolation that matches the block geometry
   (``torch.nn.functional.interpolate(scale_factor=k, mode="trilinear", align_corners=False)``,
   which puts the centre of block ``i`` at image voxel ``k*i + (k - 1)/2``, then cropped to the
   image shape) and renormalised to sum to 1. Members with another voxel size get their own
   grid; their image-grid probabilities are averaged, weighted by the number of members.
   **Test-time augmentation** (``tta``): the MC samples are spread over views of the image, in
   turn: ``flip`` adds the left-right mirror (the image's first axis, RAS x; its probabilities are
   mirrored back on the model grid and every class swapped with its mirror,
   :meth:`bids_app.core.labels.Protocol.lr_swap`); ``shift`` adds a model grid offset by half a
   model voxel (the image zero-padded by ``k // 2`` voxels at the start of every axis, the
   up-sampled probabilities cropped back; only for integer factors ``k > 1``); ``flip-shift``
   does both (4 views). With ``n`` samples and ``v`` views, view ``i`` draws ``n // v`` samples
   plus one when ``i < n % v``, with its own dropout seed (view 0 keeps ``seed``, so ``none``
   gives the samples it always gave); the probabilities are the sample-weighted mean of the
   views and the QC volumes are every view's samples (so the CV also sees what the views change).
   The members were trained with left-right flips and random crops, so both views are images of
   the kind they learned.
4. **Intensity refinement** (``refinement="intensity"``): the image-grid probabilities are refined
   with the image's own intensity histogram of every class
   (:func:`bids_app.core.refinement.refine_probabilities`; the entropy is taken before, so it and
   the QC stay the networks' own).
5. **Labels** are the argmax of the image-grid probabilities, as label values of the protocol.
   With an intracranial ``mask`` (same grid as the image), every voxel outside it is background:
   its probabilities become 1 for the background class and 0 for the others (its entropy 0)
   before the argmax, so no label and no probability map leaks out of the intracranial volume.

QC: the volumes of every MC sample (argmax on the model grid, in mm3) give each structure's
coefficient of variation (CV, ``100 * std / mean``), their mean over the structures
(background and structures absent from every sample excluded) and ``pass``/``warn`` flags.
The thresholds are the ensemble's own when a member manifest holds a ``qc_calibration`` made for
exactly these members and this modality (:mod:`bids_app.core.qc_calibration`: per protocol, a mean
threshold and one per structure, from the clean held-out scans of the cross-validation); otherwise
the modality's default (:data:`bids_app.models.mcdropout.QC_THRESHOLDS`) for the mean and every
structure. An explicit ``threshold`` overrides both. With several
voxel-size groups, sample ``s`` of the ensemble has the member-weighted mean of the groups'
sample-``s`` volumes (the argmax of the combined sample would need every sample kept in memory).
Coarser protocols (``dkt-aseg`` -> ``aseg`` -> ``cerebrum7``, ``aseg`` -> ``deep14``...) merge
probabilities through the merge tables of :mod:`bids_app.core.labels`, and their CV merges the
sample volumes sample by sample before the statistics (:func:`coarser`, :func:`coarse_cv`).

The entropy is the predictive entropy (nats) of the model-grid mean softmax, upsampled like the
probabilities; with several voxel-size groups or TTA views it is the entropy of the combined
image-grid probabilities (they may disagree, which a mean of their entropies would hide).

Nothing here imports torch at module import time, so the command line can check checkpoints
(:func:`validate_wholebrain_checkpoints`) and list the installed models without it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.hierarchy import hierarchical_classes, hierarchical_probabilities, pooled_parent_probabilities
from ..core.labels import (
    Protocol,
    ProtocolError,
    class_merge_matrix,
    load_mapping,
    load_protocol,
    merge_chain,
    merged_probabilities,
)
from ..core.refinement import REFINEMENTS, refine_probabilities
from ..core.qc_calibration import class_thresholds, find_calibration, protocol_thresholds, samples_warning
from .checkpoint import (ModelError, _read_manifest, _split_path, models_with_task, validate_manifest,
                         verify_checkpoint)

log = logging.getLogger(__name__)

#: manifest ``task`` of the whole-brain models picked by :func:`default_wholebrain_models`
WHOLEBRAIN_TASK = "wholebrain"
#: manifest ``task`` of the cortical parcellation models picked by :func:`default_parcellation_models`
PARCELLATION_TASK = "parcellation"
#: the protocol a parcellation protocol must refine (merge into) and must not be
PARCELLATION_BASE = "aseg"
#: protocols every whole-brain result is also given in (the fine protocol must merge into both)
COARSE_PROTOCOLS = ("aseg", "cerebrum7")
#: classes upsampled at a time (bounds the temporary memory of the interpolation)
_UPSAMPLE_CHUNK = 4
#: image slabs (along the first axis) merged at a time by :func:`coarse_labels`
_SLAB = 16
#: test-time augmentations of :func:`segment_volume`: name -> its views as ``(mirrored, shifted)``
TTA_VIEWS: dict[str, tuple[tuple[bool, bool], ...]] = {
    "none": ((False, False),),
    "flip": ((False, False), (True, False)),
    "shift": ((False, False), (False, True)),
    "flip-shift": ((False, False), (True, False), (False, True), (True, True)),
}
#: the test-time augmentation of the pipeline (``arborseg --tta``)
DEFAULT_TTA = "flip-shift"


# --------------------------------------------------------------------------- result


@dataclass
class SegmentationResult:
    """Outcome of :func:`segment_volume` (or of :func:`coarser` for a coarser protocol)."""

    protocol: Protocol
    probabilities: np.ndarray | None    # (K, X, Y, Z) float32 on the image grid, summing to 1
    labels: np.ndarray                  # (X, Y, Z) int16 label values of the protocol
    entropy: np.ndarray                 # (X, Y, Z) float32, nats
    cv_percent: np.ndarray              # (K,) volume CV over the MC samples, NaN where absent
    mean_cv_percent: float
    qc_flag: str                        # "pass" / "warn"
    qc_threshold: float                 # percent
    models: list[str]
    timings: dict = field(default_factory=dict)
    mc_volumes_mm3: np.ndarray | None = None   # (N, K) per-sample volumes on the model grid(s)
    n_samples: int = 0
    seed: int = 0
    modality: str = "T1w"
    voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of the image grid
    model_voxel_sizes_mm: list[tuple[float, float, float]] = field(default_factory=list)
    manifests: list[dict] = field(default_factory=list)
    #: per class threshold (percent); None: :attr:`qc_threshold` for every class
    structure_thresholds: np.ndarray | None = None
    #: the ``qc_calibration`` of the member manifests used for the thresholds (None: the modality default)
    qc_calibration: dict | None = None
    #: test-time augmentation (a key of :data:`TTA_VIEWS`)
    tta: str = "none"
    #: refinement of the probabilities (a key of :data:`bids_app.core.refinement.REFINEMENTS`)
    refinement: str = "none"
    #: how the probabilities were fused with another ensemble's (:func:`fuse_parcellation`); None: not fused
    fusion: dict | None = None

    @property
    def volume_mean_mm3(self) -> np.ndarray:
        """Mean over the MC samples of every class's volume (mm3)."""
        return np.asarray(self.mc_volumes_mm3, dtype=np.float64).mean(axis=0)

    def class_thresholds(self) -> np.ndarray:
        """Per class QC threshold (percent): the calibrated one, else :attr:`qc_threshold`."""
        return class_thresholds(self.structure_thresholds, self.qc_threshold, len(self.cv_percent))

    def structure_flags(self) -> list[str]:
        """Per class: ``"warn"`` when its CV exceeds its threshold or is undefined, else ``"pass"``."""
        return [structure_flag(c, t) for c, t in zip(self.cv_percent, self.class_thresholds())]


def structure_flag(cv_percent: float, threshold: float) -> str:
    """QC flag of one structure: ``pass`` when ``cv <= threshold``; ``warn`` above it or when absent (NaN)."""
    return "pass" if math.isfinite(cv_percent) and cv_percent <= threshold else "warn"


# --------------------------------------------------------------------------- checkpoints


def _voxel_triplet(value: Any) -> tuple[float, float, float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    vox = tuple(float(v) for v in values) * (3 if len(values) == 1 else 1)
    if len(vox) != 3 or min(vox) <= 0:
        raise ValueError(f"voxel size must be one or three positive numbers, got {value!r}")
    return vox  # type: ignore[return-value]


def protocol_of(manifest: dict) -> Protocol:
    """The label protocol of a manifest: the shipped table of that name when it matches, else its own labels."""
    spec = manifest["label_protocol"]
    indices = tuple(int(e["index"]) for e in spec["labels"])
    try:
        protocol = load_protocol(spec["name"])
    except ProtocolError:
        log.debug("protocol %r is not shipped; using the manifest's labels", spec["name"])
        return Protocol(name=spec["name"], indices=indices, names=tuple(e["name"] for e in spec["labels"]))
    if protocol.indices != indices:
        raise ModelError(f"model {manifest.get('name')!r}: its labels differ from ArborSeg's {spec['name']!r} "
                         f"protocol table (class order or values)")
    return protocol


def _validate_checkpoints(paths: Sequence[str | os.PathLike], kind: str) -> tuple[list[Path], str]:
    """Manifests, weights (safetensors, checksum), one input channel and one shared protocol; no torch."""
    if not paths:
        raise ModelError(f"no {kind} checkpoints given")
    manifests: list[Path] = []
    protocol: str | None = None
    for raw in paths:
        manifest_path, manifest = verify_checkpoint(raw)
        if len(manifest["input_channels"]) != 1:
            raise ModelError(f"{manifest_path}: {kind} models take one input channel (T1w), this one takes "
                             f"{len(manifest['input_channels'])}")
        name = manifest["label_protocol"]["name"]
        if protocol is None:
            protocol = name
        elif name != protocol:
            raise ModelError(f"{manifest_path}: label protocol {name!r} differs from the other models' {protocol!r}")
        manifests.append(manifest_path)
    assert protocol is not None
    return manifests, protocol


def validate_wholebrain_checkpoints(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """Check checkpoints before any work, without torch; returns ``(manifest paths, protocol name)``.

    Every manifest must be valid and name a registered architecture, its weights must exist, be
    a safetensors file and match the manifest's checksum; all members must share one label
    protocol that merges into ``aseg`` and ``cerebrum7`` and take one input channel. Raises
    :class:`ModelError` (exit code 4) with one line naming the file.
    """
    manifests, protocol = _validate_checkpoints(paths, "whole-brain")
    for coarse in COARSE_PROTOCOLS:
        try:
            merge_chain(protocol, coarse)
        except ProtocolError:
            raise ModelError(f"{manifests[0]}: label protocol {protocol!r} cannot be merged into {coarse!r}; "
                             f"whole-brain models must use aseg or dkt-aseg") from None
    return manifests, protocol


def validate_parcellation_checkpoints(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """Like :func:`validate_wholebrain_checkpoints` for the cortical parcellation ensemble.

    The shared protocol must be a shipped refinement of ``aseg`` (it merges into it, e.g.
    ``dkt-aseg``) and not ``aseg``/``cerebrum7`` themselves: the parcellation writes only its own
    protocol's outputs (``seg-<protocol>``), which must not collide with the whole-brain ones.
    """
    manifests, protocol = _validate_checkpoints(paths, "parcellation")
    if protocol in COARSE_PROTOCOLS:
        raise ModelError(f"{manifests[0]}: label protocol {protocol!r} is a whole-brain protocol; parcellation "
                         f"models must use a finer one (dkt-aseg)")
    try:
        merge_chain(protocol, PARCELLATION_BASE)
    except ProtocolError:
        raise ModelError(f"{manifests[0]}: label protocol {protocol!r} cannot be merged into "
                         f"{PARCELLATION_BASE!r}; parcellation models must use dkt-aseg") from None
    return manifests, protocol


def read_manifests(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The manifests of checkpoints (validated, without torch and without reading the weights)."""
    out = []
    for raw in paths:
        manifest_path, _ = _split_path(Path(raw).expanduser())
        out.append(validate_manifest(_read_manifest(manifest_path), where=str(manifest_path), check_kwargs=False))
    return out


def _default_models(task: str, folder: str | os.PathLike | None = None) -> list[str]:
    return models_with_task(task, folder)


def default_wholebrain_models(folder: str | os.PathLike | None = None) -> list[str]:
    """Manifest paths of the installed checkpoints whose manifest says ``"task": "wholebrain"``."""
    return _default_models(WHOLEBRAIN_TASK, folder)


def default_parcellation_models(folder: str | os.PathLike | None = None) -> list[str]:
    """Manifest paths of the installed checkpoints whose manifest says ``"task": "parcellation"``."""
    return _default_models(PARCELLATION_TASK, folder)


def _load_members(checkpoints_or_models: Sequence[Any], manifests: Sequence[dict] | None) -> list[tuple[Any, dict]]:
    from .checkpoint import load_checkpoint

    items = list(checkpoints_or_models) if not isinstance(checkpoints_or_models, (str, os.PathLike)) \
        else [checkpoints_or_models]
    if not items:
        raise ValueError("at least one checkpoint or model is needed")
    if manifests is not None and len(manifests) != len(items):
        raise ValueError(f"{len(manifests)} manifests for {len(items)} models")
    members = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            model, manifest = load_checkpoint(item, device="cpu")
            if manifests is not None:
                manifest = dict(manifests[i])
        elif isinstance(item, tuple) and len(item) == 2:
            model, manifest = item
        else:
            if manifests is None:
                raise ValueError("models given as networks need their manifests (manifests=...)")
            model, manifest = item, manifests[i]
        members.append((model, manifest))
    return members


# --------------------------------------------------------------------------- grids


def _integer_factors(model_vox: Sequence[float], image_vox: Sequence[float]) -> tuple[int, int, int] | None:
    ratios = [m / v for m, v in zip(model_vox, image_vox)]
    ints = [int(round(r)) for r in ratios]
    if all(k >= 1 and abs(r - k) < 1e-4 for r, k in zip(ratios, ints)):
        return tuple(ints)  # type: ignore[return-value]
    return None


def block_mean(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over ``k``-blocks per axis after zero-padding each axis (at its end) to a multiple of ``k``."""
    k = [int(f) for f in factors]
    if all(f == 1 for f in k):
        return np.ascontiguousarray(image, dtype=np.float32)
    pads = [(0, (-s) % f) for s, f in zip(image.shape, k)]
    padded = np.pad(np.asarray(image, dtype=np.float32), pads)
    n = [s // f for s, f in zip(padded.shape, k)]
    blocks = padded.reshape(n[0], k[0], n[1], k[1], n[2], k[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _zoom_down(image: np.ndarray, model_vox: Sequence[float], image_vox: Sequence[float]) -> np.ndarray:
    from scipy import ndimage

    zoom = [v / m for v, m in zip(image_vox, model_vox)]
    return ndimage.zoom(np.asarray(image, dtype=np.float32), zoom, order=1, grid_mode=True,
                        mode="grid-constant", cval=0.0).astype(np.float32)


def _upsample_into(out: np.ndarray, coarse: np.ndarray, factors: tuple[int, int, int] | None,
                   weight: float, accumulate: bool, offset: Sequence[int] = (0, 0, 0)) -> None:
    """``out[c] (+)= weight * upsample(coarse[c])`` class chunk by class chunk (``out``: (C, X, Y, Z)).

    ``offset``: the model grid was made from the image zero-padded by that many voxels at the start
    of every axis; the up-sampled maps are cropped back by as much.
    """
    shape = out.shape[1:]
    padded = tuple(s + o for s, o in zip(shape, offset))
    crop = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, shape))
    for start in range(0, coarse.shape[0], _UPSAMPLE_CHUNK):
        stop = min(start + _UPSAMPLE_CHUNK, coarse.shape[0])
        up = upsample(coarse[start:stop], padded, factors)
        if any(offset):
            up = up[crop]
        if weight != 1.0:
            up *= np.float32(weight)
        if accumulate:
            out[start:stop] += up
        else:
            out[start:stop] = up


def upsample(coarse: np.ndarray, shape: Sequence[int], factors: Sequence[int] | None) -> np.ndarray:
    """``(C, x, y, z)`` model-grid maps -> ``(C, *shape)`` on the image grid (float32).

    Integer ``factors``: trilinear interpolation with ``align_corners=False`` (matches
    :func:`block_mean`), cropped to ``shape``. ``None``: :func:`scipy.ndimage.zoom` (linear,
    ``grid_mode``) to exactly ``shape``.
    """
    coarse = np.asarray(coarse, dtype=np.float32)
    shape = tuple(int(s) for s in shape)
    if factors is not None and all(int(f) == 1 for f in factors):
        return np.ascontiguousarray(coarse[(slice(None),) + tuple(slice(0, s) for s in shape)])
    if factors is not None:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(coarse))[None]
            up = F.interpolate(t, scale_factor=tuple(float(f) for f in factors), mode="trilinear",
                               align_corners=False)[0]
            return np.ascontiguousarray(up[(slice(None),) + tuple(slice(0, s) for s in shape)].numpy())
    from scipy import ndimage

    zoom = [s / c for s, c in zip(shape, coarse.shape[1:])]
    out = np.empty((coarse.shape[0],) + shape, dtype=np.float32)
    for c in range(coarse.shape[0]):
        z = ndimage.zoom(coarse[c], zoom, order=1, grid_mode=True, mode="nearest")
        out[c] = z[tuple(slice(0, s) for s in shape)]
    return out


def tta_views(tta: str) -> tuple[tuple[bool, bool], ...]:
    """The ``(mirrored, shifted)`` views of a test-time augmentation name (:data:`TTA_VIEWS`)."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[tta]


def view_samples(n_samples: int, n_views: int) -> list[int]:
    """MC samples of each view: ``n // v`` each, one more for the first ``n % v`` views."""
    return [n_samples // n_views + (1 if i < n_samples % n_views else 0) for i in range(n_views)]


def view_seed(seed: int, view: int) -> int:
    """The dropout seed of TTA view ``view``: ``seed`` itself for view 0, a derived one for the others."""
    if view == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x77A, view]).generate_state(1)[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------- segmentation


def segment_volume(
    image: np.ndarray,
    checkpoints_or_models: Any,
    *,
    manifests: Sequence[dict] | None = None,
    mc_samples: int = 15,
    seed: int = 42,
    device: str = "auto",
    num_threads: int | None = None,
    modality: str = "T1w",
    image_voxel_mm: float | Sequence[float] = 1.0,
    threshold: float | None = None,
    mask: np.ndarray | None = None,
    tta: str = "none",
    refinement: str = "none",
) -> SegmentationResult:
    """Segment a conformed, normalised ``(X, Y, Z)`` image with an MC-dropout ensemble.

    Args:
        image: float32 array on ArborSeg's conformed grid (RAS axes), normalised, zero outside the ICV.
        checkpoints_or_models: checkpoint paths (stems, ``.json`` or ``.safetensors``), or networks
            with ``manifests``, or ``(network, manifest)`` pairs; all with the same label protocol.
        manifests: the manifests of networks given directly (one each).
        mc_samples, seed: MC-dropout samples and the seed of every dropout mask.
        device, num_threads: where and with how many CPU threads the networks run.
        modality: selects the QC thresholds: the ensemble's calibration for this modality, else the
            default (1 % for T1w, 2.5 % otherwise); ``threshold`` overrides both (one for every class).
        image_voxel_mm: voxel size of ``image`` (ArborSeg's conformed grid is 1 mm by default).
        mask: optional intracranial mask on the image grid: outside it the probabilities are
            forced to background (1 for background, 0 for the rest), hence label 0 and entropy 0.
            The MC-sample volumes of the QC (model grid) are not masked.
        tta: test-time augmentation, ``none``, ``flip``, ``shift`` or ``flip-shift`` (the module
            docstring says what each does); the MC samples are spread over its views.
        refinement: ``intensity`` refines the combined image-grid probabilities with the image's own
            intensities (:func:`bids_app.core.refinement.refine_probabilities`, inside ``mask`` or,
            without one, where the image is non-zero) before the labels are taken; ``none`` does not.
            The entropy and the QC stay the networks' own.
    """
    from .mcdropout import mean_cv, mc_dropout, predictive_entropy, qc_flag, qc_threshold, volume_statistics

    t_start = time.perf_counter()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D image (X, Y, Z), got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("the image contains NaN or Inf values")
    image_vox = _voxel_triplet(image_voxel_mm)
    views = tta_views(tta)
    if refinement not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refinement!r}; choose one of {', '.join(REFINEMENTS)}")
    if mc_samples < len(views):
        raise ValueError(f"test-time augmentation {tta!r} has {len(views)} views: it needs at least that many MC "
                         f"samples, got {mc_samples}")
    counts = view_samples(mc_samples, len(views))
    outside = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"the mask's shape {mask.shape} differs from the image's {image.shape}")
        outside = ~(mask > 0.5) if mask.dtype != bool else ~mask
    members = _load_members(checkpoints_or_models, manifests)
    t_loaded = time.perf_counter()

    names = [str(m.get("name", f"model{i}")) for i, (_, m) in enumerate(members)]
    protocols = {m["label_protocol"]["name"] for _, m in members}
    if len(protocols) != 1:
        raise ModelError(f"the models do not share one label protocol: {', '.join(sorted(protocols))}")
    protocol = protocol_of(members[0][1])
    for (model, manifest), name in zip(members, names):
        n_classes = getattr(model, "n_classes", None) or (getattr(model, "config", {}) or {}).get("n_classes")
        if n_classes is not None and int(n_classes) != len(protocol):
            raise ModelError(f"model {name!r} has {n_classes} classes, protocol {protocol.name!r} {len(protocol)}")
        channels = manifest.get("input_channels") or []
        if len(channels) != 1:
            raise ModelError(f"model {name!r} takes {len(channels)} input channels; whole-brain segmentation gives one")
        if channels[0].get("name") != modality:
            log.warning("model %s was trained on %s, the input is %s", name, channels[0].get("name"), modality)

    # members grouped by their voxel size, in the order of first appearance
    groups: dict[tuple[float, float, float], list[int]] = {}
    for i, (_, manifest) in enumerate(members):
        groups.setdefault(_voxel_triplet(manifest["voxel_size_mm"]), []).append(i)

    shape = image.shape
    k_total = len(protocol)
    probs: np.ndarray | None = None
    entropy = np.zeros(shape, dtype=np.float32)
    volumes: np.ndarray | None = None
    timings = {"load_s": t_loaded - t_start, "resample_s": 0.0, "mc_s": 0.0, "upsample_s": 0.0}
    swap = np.asarray(protocol.lr_swap(), dtype=np.int64) if any(m for m, _ in views) else None
    single = len(groups) == 1 and len(views) == 1  # one model grid, one MC run: its own entropy is the answer
    for vox, indices in groups.items():
        weight = len(indices) / len(members)
        factors = _integer_factors(vox, image_vox)
        shifts = [(0, 0, 0)]
        if any(s for _, s in views):
            if factors is None or all(f == 1 for f in factors):
                log.warning("whole-brain segmentation: no shifted view for models at %s mm (not an integer multiple "
                            "> 1 of the image's voxel); its samples use the unshifted grid",
                            "x".join(f"{v:g}" for v in vox))
                shifts.append((0, 0, 0))
            else:
                shifts.append(tuple(f // 2 for f in factors))
        group_volumes: list[tuple[int, np.ndarray]] = []
        for shifted in (False, True):
            mine = [(v, mirrored) for v, (mirrored, s) in enumerate(views) if s == shifted]
            if not mine:
                continue
            n_here = sum(counts[v] for v, _ in mine)
            offset = shifts[1] if shifted else shifts[0]
            t0 = time.perf_counter()
            source = np.pad(image, [(o, 0) for o in offset]) if any(offset) else image
            x = block_mean(source, factors) if factors is not None else _zoom_down(source, vox, image_vox)
            del source
            t1 = time.perf_counter()
            log.info("whole-brain segmentation: %d model(s) at %s mm on a %s grid (%s%s), %d MC samples",
                     len(indices), "x".join(f"{v:g}" for v in vox), "x".join(map(str, x.shape)),
                     f"block mean {factors}" if factors else "linear zoom",
                     f", offset {offset} voxels" if any(offset) else "", n_here)
            mean: np.ndarray | None = None
            for v, mirrored in mine:
                xv = np.ascontiguousarray(x[::-1]) if mirrored else x
                mc = mc_dropout([members[i][0] for i in indices], xv[None], n_samples=counts[v],
                                seed=view_seed(seed, v), voxel_size_mm=list(vox), device=device,
                                num_threads=num_threads, modality=modality, class_names=list(protocol.names))
                if mc.mean_probs.shape[0] != k_total:
                    raise ModelError(f"the models give {mc.mean_probs.shape[0]} classes, protocol {protocol.name!r} "
                                     f"has {k_total}")
                p, vols = mc.mean_probs, mc.volumes_mm3
                if mirrored:  # back to the unmirrored grid, every class in its mirror's place
                    p, vols = np.ascontiguousarray(p[swap][:, ::-1]), vols[:, swap]
                if len(mine) > 1:  # sample-weighted mean of this grid's views
                    p *= np.float32(counts[v] / n_here)
                if mean is None:
                    mean = p
                else:
                    mean += p
                group_volumes.append((v, vols * weight))
                if single:
                    entropy = upsample(mc.entropy[None], shape, factors)[0]
                del mc, p
            assert mean is not None
            del x
            t2 = time.perf_counter()
            share = weight * n_here / mc_samples
            if single and factors == (1, 1, 1):
                probs = mean  # already on the image grid: no second copy of the largest array
            else:
                if probs is None:
                    probs = np.zeros((k_total,) + shape, dtype=np.float32)
                _upsample_into(probs, mean, factors, share, accumulate=True, offset=offset)
            del mean
            timings["resample_s"] += t1 - t0
            timings["mc_s"] += t2 - t1
            timings["upsample_s"] += time.perf_counter() - t2
        # the samples in view order, so that sample s of every voxel-size group is the same view
        stacked = np.concatenate([vols for _, vols in sorted(group_volumes, key=lambda item: item[0])])
        volumes = stacked if volumes is None else volumes + stacked

    t3 = time.perf_counter()
    assert probs is not None and volumes is not None
    total = probs.sum(axis=0)
    np.maximum(total, np.float32(1e-12), out=total)
    probs /= total[None]
    del total
    if not single:  # the networks' own uncertainty: before any refinement (0 outside the mask, set below)
        entropy = predictive_entropy(probs)
    if refinement == "intensity":
        t_refine = time.perf_counter()
        refine_probabilities(probs, image, mask=~outside if outside is not None else None)
        timings["refine_s"] = time.perf_counter() - t_refine
    if outside is not None and outside.any():
        force_background(probs, outside, protocol)
        entropy = np.asarray(entropy, dtype=np.float32)
        entropy[outside] = 0.0
    classes = probs.argmax(axis=0)
    labels = protocol.to_labels(classes)
    del classes
    _, _, cv = volume_statistics(volumes)
    background = 0 if protocol.indices and protocol.indices[0] == 0 else None
    mcv = mean_cv(cv, background)
    calibration = find_calibration([m for _, m in members], names, modality, tta) if threshold is None else None
    warning = samples_warning(calibration, mc_samples, tta)
    if warning:
        log.warning("whole-brain segmentation: %s", warning)
    default = qc_threshold(modality) if threshold is None else float(threshold)
    limit, per_class = protocol_thresholds(calibration, protocol.name, protocol.names, default)
    flag = qc_flag(mcv, threshold=limit)
    timings["labels_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t_start
    log.info("whole-brain segmentation (%s, %d classes) in %.1f s: mean volume CV %.3f%% -> %s (threshold %.2f%%, "
             "%s)", protocol.name, k_total, timings["total_s"], mcv, flag, limit,
             "calibrated for this ensemble" if calibration else "the default: no calibration for this ensemble")
    return SegmentationResult(
        protocol=protocol, probabilities=probs, labels=labels, entropy=np.asarray(entropy, dtype=np.float32),
        cv_percent=cv, mean_cv_percent=mcv, qc_flag=flag, qc_threshold=limit, models=names, timings=timings,
        mc_volumes_mm3=volumes, n_samples=int(mc_samples), seed=int(seed), modality=modality,
        voxel_size_mm=image_vox, model_voxel_sizes_mm=list(groups), manifests=[m for _, m in members],
        structure_thresholds=per_class, qc_calibration=calibration, tta=tta, refinement=refinement,
    )


def force_background(probs: np.ndarray, outside: np.ndarray, protocol: Protocol) -> None:
    """In place: ``probs[:, outside]`` becomes one-hot on the background class (label value 0).

    Raises :class:`ValueError` when the protocol has no background class.
    """
    if 0 not in protocol.indices:
        raise ValueError(f"protocol {protocol.name!r} has no background class (label 0)")
    background = protocol.indices.index(0)
    for k in range(probs.shape[0]):  # class by class: no (K, n_outside) temporary
        probs[k][outside] = 1.0 if k == background else 0.0


def fuse_parcellation(seg: SegmentationResult, parc: SegmentationResult, image: np.ndarray, *,
                      mask: np.ndarray | None = None, refinement: str = "none") -> None:
    """Fuse a whole-brain result and a cortical parcellation result of the same image, **in place**.

    Both must keep their probabilities and be unrefined (:func:`segment_volume` with
    ``refinement="none"``); ``parc``'s protocol must merge into ``seg``'s (``dkt-aseg`` -> ``aseg``).

    1. ``seg``'s probabilities become the network-weighted mean of both ensembles in ``seg``'s
       protocol (:func:`bids_app.core.hierarchy.pooled_parent_probabilities`): every network of
       either ensemble counts the same. With ``refinement="intensity"`` they are then refined
       (:func:`bids_app.core.refinement.refine_probabilities`, inside ``mask``, else where ``image``
       is non-zero). Voxels outside ``mask`` stay background.
    2. ``parc``'s probabilities are split from those (:func:`bids_app.core.hierarchy.hierarchical_probabilities`):
       the parcels of a structure share its fused probability in the parcellation ensemble's proportions,
       and the parcellation's labels are taken top-down (the structure, then its most probable parcel:
       :func:`bids_app.core.hierarchy.hierarchical_classes`), so the two label maps agree.

    The entropy maps and the MC-dropout QC (CVs, flags) stay each ensemble's own. Both results
    get ``refinement`` and ``fusion`` (what was fused), and their labels are taken again.
    """
    if seg.probabilities is None or parc.probabilities is None:
        raise ValueError("fusion needs both results' probabilities")
    if seg.refinement != "none" or parc.refinement != "none":
        raise ValueError("fuse the networks' own probabilities: segment both with refinement='none'")
    if refinement not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refinement!r}; choose one of {', '.join(REFINEMENTS)}")
    t0 = time.perf_counter()
    parent_of = merge_index(parc.protocol, seg.protocol)  # ProtocolError when parc does not refine seg
    pooled = pooled_parent_probabilities(seg.probabilities, len(seg.models), parc.probabilities, parent_of,
                                         len(parc.models))
    seg.probabilities = None
    if refinement == "intensity":
        t_refine = time.perf_counter()
        refine_probabilities(pooled, np.asarray(image, dtype=np.float32), mask=mask)
        seg.timings["refine_s"] = time.perf_counter() - t_refine
    if mask is not None:
        outside = ~np.asarray(mask, dtype=bool)
        if outside.any():
            force_background(pooled, outside, seg.protocol)
    hierarchical_probabilities(parc.probabilities, parent_of, pooled)
    seg.probabilities = pooled
    seg.labels = seg.protocol.to_labels(pooled.argmax(axis=0))
    parc.labels = parc.protocol.to_labels(hierarchical_classes(parc.probabilities, parent_of, pooled))
    fusion = {"method": "hierarchical", "parent_protocol": seg.protocol.name, "fine_protocol": parc.protocol.name,
              "parent_models": list(seg.models), "fine_models": list(parc.models)}
    for result in (seg, parc):
        result.refinement = refinement
        result.fusion = dict(fusion)
        result.timings["fusion_s"] = time.perf_counter() - t0
    log.info("fused the %s and %s ensembles (%d + %d networks, refinement %s) in %.1f s", seg.protocol.name,
             parc.protocol.name, len(seg.models), len(parc.models), refinement, time.perf_counter() - t0)


# --------------------------------------------------------------------------- coarser protocols


def merge_index(fine: Protocol, coarse: Protocol) -> np.ndarray:
    """``(K_fine,)``: the class position in ``coarse`` of every class of ``fine`` (through the merge chain)."""
    chain = merge_chain(fine.name, coarse.name)
    index = np.arange(len(fine))
    current = fine
    for dst in chain[1:]:
        mapping = load_mapping(current.name, dst)
        if not mapping.is_merge:
            raise ProtocolError(f"{current.name}_to_{dst} is not a plain merge table")
        nxt = load_protocol(dst)
        index = class_merge_matrix(current, nxt, mapping)[index]
        current = nxt
    return index


def _coarse_protocol(result: SegmentationResult, protocol: str | Protocol) -> Protocol:
    return protocol if isinstance(protocol, Protocol) else load_protocol(protocol)


def coarse_thresholds(result: SegmentationResult, protocol: str | Protocol) -> tuple[float, np.ndarray]:
    """``(mean threshold, per-class thresholds)`` of a protocol of ``result``: calibrated, else the result's."""
    coarse = _coarse_protocol(result, protocol)
    if coarse.name == result.protocol.name:
        return float(result.qc_threshold), result.class_thresholds()
    return protocol_thresholds(result.qc_calibration, coarse.name, coarse.names, result.qc_threshold)


def coarse_cv(result: SegmentationResult, protocol: str | Protocol) -> tuple[np.ndarray, float, str]:
    """``(cv_percent, mean_cv_percent, qc_flag)`` of a coarser protocol from the sample-wise merged volumes."""
    from .mcdropout import mean_cv, qc_flag, volume_statistics

    coarse = _coarse_protocol(result, protocol)
    if result.mc_volumes_mm3 is None:
        raise ValueError("the result keeps no per-sample volumes")
    index = merge_index(result.protocol, coarse)
    fine = np.asarray(result.mc_volumes_mm3, dtype=np.float64)
    merged = np.zeros((fine.shape[0], len(coarse)), dtype=np.float64)
    for k, target in enumerate(index):
        merged[:, target] += fine[:, k]
    _, _, cv = volume_statistics(merged)
    background = 0 if coarse.indices and coarse.indices[0] == 0 else None
    mcv = mean_cv(cv, background)
    return cv, mcv, qc_flag(mcv, threshold=coarse_thresholds(result, coarse)[0])


def coarse_labels(result: SegmentationResult, protocol: str | Protocol) -> np.ndarray:
    """Label image of a coarser protocol: argmax of the merged probabilities, slab by slab (little memory)."""
    coarse = _coarse_protocol(result, protocol)
    if coarse.name == result.protocol.name:
        return result.labels
    if result.probabilities is None:
        raise ValueError("the result keeps no probabilities")
    out = np.empty(result.labels.shape, dtype=np.int16)
    for start in range(0, out.shape[0], _SLAB):
        merged = merged_probabilities(result.probabilities[:, start:start + _SLAB], result.protocol, coarse)
        out[start:start + _SLAB] = coarse.to_labels(merged.argmax(axis=0))
    return out


def coarse_probability(result: SegmentationResult, protocol: str | Protocol, position: int) -> np.ndarray:
    """Probability map ``(X, Y, Z)`` of class ``position`` of a coarser protocol (sum of its fine classes)."""
    coarse = _coarse_protocol(result, protocol)
    if result.probabilities is None:
        raise ValueError("the result keeps no probabilities")
    index = merge_index(result.protocol, coarse)
    members = np.flatnonzero(index == int(position))
    out = np.zeros(result.labels.shape, dtype=np.float32)
    for k in members:
        out += result.probabilities[k]
    return out


def coarser(result: SegmentationResult, protocol_name: str) -> SegmentationResult:
    """The result in a coarser protocol: merged probabilities, their argmax, sample-wise merged CV.

    The entropy is shared with ``result`` (the predictive entropy of the fine protocol).
    """
    coarse = load_protocol(protocol_name)
    if coarse.name == result.protocol.name:
        return result
    if result.probabilities is None:
        raise ValueError("the result keeps no probabilities")
    probs = merged_probabilities(result.probabilities, result.protocol, coarse)
    labels = coarse.to_labels(probs.argmax(axis=0))
    cv, mcv, flag = coarse_cv(result, coarse)
    limit, per_class = coarse_thresholds(result, coarse)
    index = merge_index(result.protocol, coarse)
    volumes = None
    if result.mc_volumes_mm3 is not None:
        volumes = np.zeros((result.mc_volumes_mm3.shape[0], len(coarse)))
        for k, target in enumerate(index):
            volumes[:, target] += result.mc_volumes_mm3[:, k]
    return SegmentationResult(
        protocol=coarse, probabilities=probs, labels=labels, entropy=result.entropy, cv_percent=cv,
        mean_cv_percent=mcv, qc_flag=flag, qc_threshold=limit, models=list(result.models),
        timings=dict(result.timings), mc_volumes_mm3=volumes, n_samples=result.n_samples, seed=result.seed,
        modality=result.modality, voxel_size_mm=result.voxel_size_mm,
        model_voxel_sizes_mm=list(result.model_voxel_sizes_mm), manifests=list(result.manifests),
        structure_thresholds=per_class, qc_calibration=result.qc_calibration, tta=result.tta,
        refinement=result.refinement, fusion=result.fusion,
    )
