"""Monte-Carlo dropout: segmentation uncertainty and a volume-based QC flag.

Following Zopes et al. (2021) and Bayesian QuickNAT (Roy et al. 2019): the network stays in eval
mode except its dropout modules (``model.dropout_modules()``), which are switched to train mode,
so batch norm keeps its running statistics while every forward pass draws new dropout masks.
``n_samples`` passes give:

* ``labels``: argmax of the summed softmax over samples (and ensemble members);
* ``mean_probs``: the mean softmax ``(K, D, H, W)``;
* ``volumes_mm3`` ``(N, K)``: per sample, voxel counts of its argmax labels x the voxel volume;
* ``cv_percent`` ``(K,)``: coefficient of variation of each structure's volume over the samples,
  ``100 * std / mean`` with the population standard deviation (``ddof=0``); NaN where the mean
  volume is 0;
* ``mean_cv_percent``: mean of ``cv_percent`` over the structures, background (class 0) and
  structures absent from every sample (NaN) excluded;
* ``entropy`` ``(D, H, W)``: predictive entropy of the mean softmax, ``-sum_c p_c ln p_c`` in
  nats (``ln K`` for a uniform prediction);
* ``variance`` ``(D, H, W)``: the per-class sample variance of the softmax over the samples
  (``ddof=0``), averaged over the ``K`` classes. One number per voxel that is 0 when all samples
  agree; the mean over classes (not the sum, not the variance of the winning class only) keeps
  it in [0, 0.25] whatever ``K``. Computed as
  ``(mean_s sum_c p_sc^2 - sum_c pbar_c^2) / K`` so only one extra float64 voxel map is kept;
* ``qc``: ``"pass"`` when ``mean_cv_percent <= threshold`` else ``"warn"`` (also ``"warn"`` when
  it is undefined). Default thresholds, :data:`QC_THRESHOLDS`: **1.0 % for T1w (MPRAGE)** and
  **2.5 % otherwise** (the volume CVs Zopes et al. report for good-quality MPRAGE are well below
  1 %; other contrasts and clinical scans are noisier).

Prefix caching: each model's ``split_for_mc()`` gives ``(prefix, suffix)`` with no dropout in
``prefix``; the prefix runs once (per window) and only the suffix ``n_samples`` times.
:func:`benchmark_prefix_cache` measures the saving against ``n_samples`` full forward passes.

Reproducibility: before each suffix call the global torch RNG is seeded with a value derived
from ``(seed, model index, sample index, window index)`` (``numpy.random.SeedSequence``), inside
``torch.random.fork_rng`` so the caller's RNG state is untouched. The dropout masks therefore do
not depend on the global RNG state, on the loop order, or on whether the prefix was cached:
cached and uncached runs give bit-identical samples (given the same network and device).

Large volumes use the predictor's sliding windows: every sample's probability map is blended
from its windows (Gaussian weights, fixed window order, float32 accumulators per sample). With
``window_order="window"`` (default when the ``n_samples`` accumulators fit in memory) each
window's prefix is computed once for all samples; with ``"sample"`` one sample is assembled at a
time (memory of one map, prefix recomputed per window and sample). Both give the same samples.
Flip TTA is not applied to MC samples. Patch-kind networks (SegNet) run ``predict_volume`` once
per sample (no prefix caching).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .predictor import MEMORY_FRACTION, Layout, Predictor, WindowBlender, _available_bytes, as_image_tensor

log = logging.getLogger(__name__)

#: default QC thresholds on the mean volume CV (%), by input modality
QC_THRESHOLDS: dict[str, float] = {"T1w": 1.0, "default": 2.5}


# --------------------------------------------------------------------------- pure statistics


def volume_statistics(volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, std, cv_percent)`` over samples (axis 0) of ``(N, K)`` volumes; ``ddof=0``.

    ``cv_percent`` is NaN where the mean volume is 0.
    """
    vols = np.asarray(volumes, dtype=np.float64)
    if vols.ndim != 2 or vols.shape[0] < 1:
        raise ValueError(f"expected volumes of shape (n_samples, n_classes), got {vols.shape}")
    mean = vols.mean(axis=0)
    std = vols.std(axis=0, ddof=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, 100.0 * std / np.where(mean > 0, mean, 1.0), np.nan)
    return mean, std, cv


def mean_cv(cv_percent: np.ndarray, background: int | None = 0) -> float:
    """Mean CV (%) over structures, ``background`` and undefined (NaN) ones excluded; NaN if none."""
    cv = np.asarray(cv_percent, dtype=np.float64).copy()
    if background is not None and 0 <= background < cv.size:
        cv[background] = np.nan
    valid = cv[np.isfinite(cv)]
    return float(valid.mean()) if valid.size else float("nan")


def qc_threshold(modality: str = "T1w", thresholds: Mapping[str, float] | None = None) -> float:
    """Threshold (%) for ``modality``: ``thresholds[modality]`` else ``thresholds["default"]``."""
    table = QC_THRESHOLDS if thresholds is None else thresholds
    if modality in table:
        return float(table[modality])
    return float(table.get("default", QC_THRESHOLDS["default"]))


def qc_flag(mean_cv_percent: float, modality: str = "T1w", thresholds: Mapping[str, float] | None = None,
            threshold: float | None = None) -> str:
    """``"pass"`` if ``mean_cv_percent <= threshold`` (default: by modality), else ``"warn"``."""
    limit = qc_threshold(modality, thresholds) if threshold is None else float(threshold)
    if not math.isfinite(mean_cv_percent):
        return "warn"
    return "pass" if mean_cv_percent <= limit else "warn"


def predictive_entropy(probs: np.ndarray | torch.Tensor, chunk: int = 8) -> np.ndarray:
    """``-sum_c p_c ln p_c`` (nats) over axis 0 of ``(K, ...)`` probabilities; float32 output."""
    p = torch.as_tensor(probs)
    out = torch.empty(p.shape[1:], dtype=torch.float32)
    for start in range(0, p.shape[1], chunk):  # chunks along the first spatial axis
        q = p[:, start:start + chunk].double()
        out[start:start + chunk] = -(torch.special.xlogy(q, q)).sum(dim=0).float()
    return out.numpy()


def sample_seed(seed: int, model_index: int, sample_index: int, window_index: int) -> int:
    """Seed of one (model, sample, window) dropout draw, derived from ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, model_index, sample_index, window_index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


# --------------------------------------------------------------------------- result


@dataclass
class MCResult:
    """Outcome of :func:`mc_dropout`; see the module docstring for the definitions."""

    labels: np.ndarray                 # (D, H, W) int16
    mean_probs: np.ndarray             # (K, D, H, W) float32
    entropy: np.ndarray                # (D, H, W) float32, nats
    variance: np.ndarray               # (D, H, W) float32, mean over classes of the sample variance
    volumes_mm3: np.ndarray            # (N, K) float64
    volume_mean_mm3: np.ndarray        # (K,)
    volume_std_mm3: np.ndarray         # (K,)
    cv_percent: np.ndarray             # (K,), NaN where the mean volume is 0
    mean_cv_percent: float
    qc: str                            # "pass" / "warn"
    qc_threshold_percent: float
    modality: str
    n_samples: int
    seed: int
    class_names: list[str] | None = None
    samples: list[np.ndarray] | None = None   # per-sample (K, D, H, W) probabilities if requested
    timing: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-friendly per-structure figures and the QC verdict."""
        names = self.class_names or [str(k) for k in range(len(self.cv_percent))]

        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else float(x)

        return {
            "n_samples": self.n_samples,
            "seed": self.seed,
            "modality": self.modality,
            "mean_cv_percent": num(self.mean_cv_percent),
            "qc": self.qc,
            "qc_threshold_percent": self.qc_threshold_percent,
            "structures": {
                name: {"volume_mean_mm3": num(m), "volume_std_mm3": num(s), "cv_percent": num(c)}
                for name, m, s, c in zip(names, self.volume_mean_mm3, self.volume_std_mm3, self.cv_percent)
            },
        }


# --------------------------------------------------------------------------- sampling


def _dropout_modules(model: nn.Module) -> list[nn.Module]:
    fn = getattr(model, "dropout_modules", None)
    if callable(fn):
        return list(fn())
    return [m for m in model.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout))]


@contextlib.contextmanager
def mc_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode everywhere except the dropout modules (train mode); modes restored on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
            drops = _dropout_modules(model)
            if not drops:
                log.warning("%s has no dropout modules: all MC samples will be identical", type(model).__name__)
            for m in drops:
                m.train()
        yield
    finally:
        for module, mode in saved:
            module.train(mode)


def _split(model: nn.Module, use_cache: bool):
    if use_cache and hasattr(model, "split_for_mc"):
        return model.split_for_mc()
    return (lambda x: x), model.forward


class _Sampler:
    """Draws the MC samples of one model as probability maps ``(K, D, H, W)`` float32 (CPU)."""

    def __init__(self, pred: Predictor, model: nn.Module, index: int, x: torch.Tensor, seed: int,
                 use_cache: bool, timing: dict):
        self.pred, self.model, self.index, self.seed = pred, model, index, seed
        self.x = x
        self.timing = timing
        self.patch_kind = getattr(model, "kind", "dense") == "patch"
        self.prefix, self.suffix = _split(model, use_cache)
        self.layout: Layout | None = None
        self.padded: torch.Tensor | None = None
        self.cached: Any = None

    def _seed(self, sample: int, window: int) -> None:
        torch.manual_seed(sample_seed(self.seed, self.index, sample, window))

    def _run(self, batch: torch.Tensor, sample: int, window: int, prefix_out: Any = None) -> torch.Tensor:
        t0 = time.perf_counter()
        if prefix_out is None:
            prefix_out = self._prefix(batch)
        t1 = time.perf_counter()
        self._seed(sample, window)
        logits = self.pred.forward(self.suffix, prefix_out)
        probs = torch.softmax(logits, dim=1)[0].cpu()
        self.timing["prefix_s"] += t1 - t0
        self.timing["suffix_s"] += time.perf_counter() - t1
        return probs

    def _prefix(self, batch: torch.Tensor) -> Any:
        if self.pred.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.prefix(batch)
        return self.prefix(batch)

    def prepare(self, window_order: str, n_samples: int, n_classes_hint: int | None) -> str:
        if self.patch_kind:
            return "patch"
        self.layout = self.pred.layout_for(self.model, self.x.shape[1:])
        self.padded = self.layout.pad(self.x)
        if self.layout.whole:
            t0 = time.perf_counter()
            self.cached = self._prefix(self.padded[None].to(self.pred.device))
            self.timing["prefix_s"] += time.perf_counter() - t0
            return "whole"
        if window_order == "auto":
            k = n_classes_hint or 8
            need = 2 * n_samples * k * math.prod(self.layout.padded) * 4
            window_order = "window" if need <= MEMORY_FRACTION * _available_bytes(torch.device("cpu")) else "sample"
            log.info("MC windows: %s-major order (%d windows, %d samples)", window_order,
                     len(self.layout.windows), n_samples)
        return window_order

    def sample(self, s: int) -> torch.Tensor:
        """Sample ``s`` (whole-volume, patch-kind or sample-major windowed)."""
        if self.patch_kind:
            self._seed(s, 0)
            t0 = time.perf_counter()
            probs = self.pred.predict_patch_model(self.model, self.x)
            self.timing["suffix_s"] += time.perf_counter() - t0
            return probs
        assert self.layout is not None and self.padded is not None
        if self.layout.whole:
            probs = self._run(None, s, 0, prefix_out=self.cached)  # type: ignore[arg-type]
            return probs[(slice(None),) + self.layout.crop].contiguous()
        blender = WindowBlender(self.layout, dtype=torch.float32)
        for w, window in enumerate(self.layout.windows):
            batch = self.padded[(slice(None),) + window][None].contiguous().to(self.pred.device)
            blender.add(w, self._run(batch, s, w))
        return blender.result()

    def all_samples_window_major(self, n_samples: int) -> list[torch.Tensor]:
        """All samples, each window's prefix computed once (``n_samples`` accumulators)."""
        assert self.layout is not None and self.padded is not None
        blenders = [WindowBlender(self.layout, dtype=torch.float32) for _ in range(n_samples)]
        for w, window in enumerate(self.layout.windows):
            batch = self.padded[(slice(None),) + window][None].contiguous().to(self.pred.device)
            t0 = time.perf_counter()
            cached = self._prefix(batch)
            self.timing["prefix_s"] += time.perf_counter() - t0
            for s in range(n_samples):
                blenders[s].add(w, self._run(None, s, w, prefix_out=cached))  # type: ignore[arg-type]
        return [b.result() for b in blenders]


def _as_predictor(model_or_ensemble: Any, predictor_kwargs: dict) -> Predictor:
    if isinstance(model_or_ensemble, Predictor):
        if predictor_kwargs:
            raise ValueError("predictor options cannot be given together with a Predictor")
        return model_or_ensemble
    return Predictor(model_or_ensemble, **predictor_kwargs)


def mc_dropout(
    model_or_ensemble: Any,
    image: Any,
    *,
    n_samples: int = 15,
    seed: int = 42,
    voxel_size_mm: float | Sequence[float] = 1.0,
    modality: str = "T1w",
    thresholds: Mapping[str, float] | None = None,
    threshold: float | None = None,
    background: int | None = 0,
    class_names: Sequence[str] | None = None,
    use_prefix_cache: bool = True,
    window_order: str = "auto",
    return_samples: bool = False,
    **predictor_kwargs: Any,
) -> MCResult:
    """MC-dropout segmentation of a ``(C, D, H, W)`` float32 image; see the module docstring.

    Args:
        model_or_ensemble: a network, a sequence of networks (weighted by ``weights=`` in
            ``predictor_kwargs``) or a :class:`~bids_app.models.predictor.Predictor`, whose
            device, threads, ensemble weights and windowing are reused (its TTA is not).
        n_samples: MC samples (Zopes et al.: 15). Each sample of an ensemble is the weighted
            mean of the members' softmax, every member with its own dropout draw.
        seed: every dropout mask derives from it (global RNG state neither used nor changed).
        voxel_size_mm: one or three voxel sizes; volumes are voxel counts x their product.
        modality: selects the QC threshold in ``thresholds`` (default :data:`QC_THRESHOLDS`:
            ``{"T1w": 1.0, "default": 2.5}`` percent); ``threshold`` overrides it.
        background: class excluded from ``mean_cv_percent`` (None: none excluded).
        use_prefix_cache: run each model's MC prefix once (per window); False runs the full
            forward for every sample (same samples, slower; for benchmarking).
        window_order: ``"auto"``, ``"window"`` or ``"sample"`` for windowed inference.
        return_samples: also keep every sample's ``(K, D, H, W)`` probabilities (memory!).
        **predictor_kwargs: options of :class:`Predictor` (device, num_threads, patch_size...).
    """
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    if window_order not in ("auto", "window", "sample"):
        raise ValueError("window_order must be 'auto', 'window' or 'sample'")
    pred = _as_predictor(model_or_ensemble, predictor_kwargs)
    if pred.tta_flip:
        log.info("MC dropout: flip TTA is not applied to the MC samples")
    x = as_image_tensor(image)
    vox = [float(voxel_size_mm)] * 3 if np.isscalar(voxel_size_mm) else [float(v) for v in voxel_size_mm]
    if len(vox) != 3 or min(vox) <= 0:
        raise ValueError("voxel_size_mm must be one or three positive numbers")
    voxel_volume = math.prod(vox)
    timing = {"prefix_s": 0.0, "suffix_s": 0.0}
    t_start = time.perf_counter()

    sum_probs: torch.Tensor | None = None      # (K, D, H, W) float32, running sum over samples
    sum_sq: torch.Tensor | None = None         # (D, H, W) float64, running sum over samples of sum_c p^2
    volumes: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    devices = [pred.device.index or 0] if pred.device.type == "cuda" else []

    with pred.runtime(), mc_mode(pred.models), torch.random.fork_rng(devices=devices):
        samplers = [_Sampler(pred, m, i, x, seed, use_prefix_cache, timing) for i, m in enumerate(pred.models)]
        n_classes_hint = getattr(pred.models[0], "n_classes", None) or (
            getattr(pred.models[0], "config", {}) or {}).get("n_classes")
        orders = [s.prepare(window_order, n_samples, n_classes_hint) for s in samplers]
        # window-major members produce all their samples up front; the others one at a time
        precomputed = {i: s.all_samples_window_major(n_samples) for i, (s, o) in enumerate(zip(samplers, orders))
                       if o == "window"}
        progress_total = n_samples
        t_loop = time.perf_counter()
        for s in range(n_samples):
            combined: torch.Tensor | None = None
            for i, (sampler, weight) in enumerate(zip(samplers, pred.weights)):
                probs = precomputed[i][s] if i in precomputed else sampler.sample(s)
                if i in precomputed:
                    precomputed[i][s] = None  # type: ignore[call-overload]  # free it
                if len(samplers) == 1:
                    combined = probs
                elif combined is None:
                    combined = probs.double() * weight
                else:
                    if combined.shape != probs.shape:
                        raise ValueError("ensemble members disagree on the output shape")
                    combined.add_(probs.double(), alpha=weight)
            assert combined is not None
            combined = combined.float()
            k = combined.shape[0]
            labels_s = combined.argmax(dim=0)
            volumes.append(torch.bincount(labels_s.reshape(-1), minlength=k).numpy().astype(np.float64) * voxel_volume)
            if sum_probs is None:
                sum_probs = combined.clone()
                sum_sq = torch.zeros(combined.shape[1:], dtype=torch.float64)
            else:
                sum_probs.add_(combined)
            for c in range(k):  # sum_c p^2, class by class (no K x voxels float64 temporary)
                sum_sq.add_((combined[c] * combined[c]).double())  # type: ignore[union-attr]
            if return_samples:
                kept.append(combined.numpy().copy())
            if progress_total > 1:
                elapsed = time.perf_counter() - t_loop
                log.debug("MC sample %d/%d, ETA %.1f s", s + 1, n_samples, elapsed / (s + 1) * (n_samples - s - 1))
        assert sum_probs is not None and sum_sq is not None
        k = sum_probs.shape[0]
        labels = sum_probs.argmax(dim=0)
        mean_probs = sum_probs.div_(n_samples)
        # mean over classes of the per-class sample variance: (E[sum_c p^2] - sum_c E[p]^2) / K
        sq_of_mean = torch.zeros(mean_probs.shape[1:], dtype=torch.float64)
        for c in range(k):
            sq_of_mean.add_(mean_probs[c].double() ** 2)
        variance = ((sum_sq / n_samples - sq_of_mean) / k).clamp_min_(0.0).float().numpy()
        entropy = predictive_entropy(mean_probs)
        labels = labels.numpy().astype(np.int16 if k < 32768 else np.int32)
        mean_probs = mean_probs.numpy()

    vols = np.stack(volumes)
    vmean, vstd, cv = volume_statistics(vols)
    mcv = mean_cv(cv, background)
    limit = qc_threshold(modality, thresholds) if threshold is None else float(threshold)
    flag = qc_flag(mcv, threshold=limit)
    timing["total_s"] = time.perf_counter() - t_start
    log.info("MC dropout: %d samples x %d model(s) in %.1f s (prefix %.1f s, suffix %.1f s); mean CV %.3f%% -> %s "
             "(threshold %.2f%% for %s)", n_samples, len(pred.models), timing["total_s"], timing["prefix_s"],
             timing["suffix_s"], mcv, flag, limit, modality)
    return MCResult(
        labels=labels,
        mean_probs=mean_probs,
        entropy=entropy,
        variance=variance,
        volumes_mm3=vols,
        volume_mean_mm3=vmean,
        volume_std_mm3=vstd,
        cv_percent=cv,
        mean_cv_percent=mcv,
        qc=flag,
        qc_threshold_percent=limit,
        modality=modality,
        n_samples=n_samples,
        seed=int(seed),
        class_names=list(class_names) if class_names is not None else None,
        samples=kept if return_samples else None,
        timing=timing,
    )


def benchmark_prefix_cache(model_or_ensemble: Any, image: Any, *, n_samples: int = 15, seed: int = 42,
                           repeats: int = 1, **kwargs: Any) -> dict:
    """Time :func:`mc_dropout` with and without prefix caching on the same image and seed.

    Returns ``{"cached_s", "uncached_s", "saving_percent", "speedup", "identical"}``; the times
    are the best of ``repeats``; ``identical`` says whether both gave bit-identical mean
    probabilities (they should: the dropout masks do not depend on caching).
    """
    best = {True: math.inf, False: math.inf}
    results = {}
    for _ in range(max(1, repeats)):
        for cached in (True, False):
            t0 = time.perf_counter()
            results[cached] = mc_dropout(model_or_ensemble, image, n_samples=n_samples, seed=seed,
                                         use_prefix_cache=cached, **kwargs)
            best[cached] = min(best[cached], time.perf_counter() - t0)
    identical = bool(np.array_equal(results[True].mean_probs, results[False].mean_probs))
    saving = 100.0 * (1.0 - best[True] / best[False]) if best[False] > 0 else float("nan")
    out = {"cached_s": best[True], "uncached_s": best[False], "saving_percent": saving,
           "speedup": best[False] / best[True] if best[True] > 0 else float("nan"), "identical": identical,
           "n_samples": n_samples}
    log.info("MC prefix cache: %.2f s vs %.2f s uncached for %d samples (%.1f%% saved, identical=%s)",
             best[True], best[False], n_samples, saving, identical)
    return out
