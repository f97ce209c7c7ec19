"""Inference: arrays in, softmax probabilities out (never paths).

:class:`Predictor` runs one network or a weighted ensemble on a ``(C, D, H, W)`` float32 array and
returns ``(K, D, H, W)`` float32 probabilities:

* **Whole volume** when it fits (``max_voxels``, or a memory heuristic), else **sliding windows**
  of ``patch_size`` with ``overlap``, blended with a Gaussian importance map (sigma = patch/8 per
  axis, as nnU-Net; weights below the smallest positive value are raised to it). Probabilities
  (not logits) are blended, accumulated in float64 in a fixed window order.
* The volume is zero-padded (centred) to a multiple of the model's ``size_divisor`` and to at
  least the patch size, then cropped back to the input shape.
* ``tta_flip``: the mirrored input (along ``lr_axis``, default 0 = the RAS x axis of ArborSeg's
  conformed ``(D, H, W)`` arrays) is predicted too, flipped back, its classes permuted with
  ``lr_swap`` (``lr_swap[c]`` = the mirrored class of ``c``, e.g. left <-> right hippocampus)
  and averaged with the plain prediction.
* Ensembles: weighted mean of the members' softmax (weights normalised; equal by default).
* Patch-kind networks (``kind == "patch"``, e.g. SegNet) are run through their own
  ``predict_volume(volume, ...)`` instead of windows.
* CUDA: bfloat16 autocast when ``amp``. CPU: always float32.

Determinism on the CPU (``deterministic=True``, the default)
-----------------------------------------------------------
In eval mode the same input gives bit-identical output whatever ``torch.set_num_threads``
(measured on torch 2.13.0+cpu, MKL 2024.2, oneDNN 3.12, AVX-512: end to end for 1, 2 and 3
threads, and operation by operation - convolutions, transposed convolutions, norms, pooling,
interpolation, softmax, dropout - for 1..16 threads). Three things are needed, and nothing else
was found to vary with the thread count:

1. **MKL strict CNR mode.** ATen's native convolution path (used for small inputs, for 1x1x1
   kernels and whenever oneDNN is off) ends in MKL ``sgemm``, whose blocking depends on the
   thread count (differences ~1e-7). ``MKL_CBWR=AUTO,STRICT`` makes ``sgemm`` bitwise
   reproducible for any thread count. MKL reads it at its *first call* in the process, so this
   module sets it with ``os.environ.setdefault`` at import time: import this module (or set the
   variable in the environment) before any torch computation. :func:`cpu_determinism_status`
   tells whether it is active; the predictor warns once if it is not. It only affects MKL
   (oneDNN's 3x3x3 convolutions do not use it).
2. **The same convolution algorithm whatever the thread count.** ATen sends a 1x1(x1)
   convolution to oneDNN when more than one thread is available and to its native (MKL) path
   with one thread; the two round differently. The predictor therefore runs every
   convolution whose kernel ends in 1x1 on the native path (a ``TorchFunctionMode`` that turns
   oneDNN off around that single call). 3x3x3 and transposed convolutions keep oneDNN, which
   gave identical results for 1..16 threads. Turning oneDNN off entirely would also be
   deterministic but costs 3-10x time and ~3.5x memory (im2col buffers) for 3D U-Nets.
3. **Fixed reduction order in our own code.** Window blending is element-wise in a fixed
   window order (float64 accumulators); nothing here reduces a whole tensor with a parallel
   ``sum``/``mean`` (those do vary with the thread count).

Measured cost (2 cores of a shared machine): item 2 on the Zopes U-Net (96x112x96, best of 3,
one process) 6.01 s vs 5.92 s (+1.5 %); items 1 + 2 on 160x192x160
(``benchmarks/bench_models.py --determinism-cost``, separate processes) within the run-to-run
noise (+-20 %). Without them the outputs differ between 1 and 2 threads by up to ~6e-8.

``torch.use_deterministic_algorithms(True)`` changes nothing for these CPU kernels and is not
set (it is a process-wide switch). On CUDA, ``deterministic=True`` selects deterministic cuDNN
algorithms (``cudnn.deterministic``, no benchmarking) for run-to-run reproducibility.
"""

from __future__ import annotations

import os

# must precede MKL's first call in this process (see "Determinism" above); a user's value wins
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import glob  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterator, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from .checkpoint import ModelError  # noqa: E402

log = logging.getLogger(__name__)

#: window size when a model gives none and windows are needed
DEFAULT_PATCH_SIZE = (128, 128, 128)
#: peak memory assumed per voxel for whole-volume inference when a model does not say
#: (``inference_bytes_per_voxel`` attribute): the Zopes 3D U-Net (F = 32, depth 4, 28 classes)
#: measured ~0.9-1.0 kB/voxel on the CPU (peak RSS growth, 64^3 and 96^3 inputs), plus 50 %
DEFAULT_BYTES_PER_VOXEL = 1536
#: share of the free memory the whole-volume heuristic may plan for
MEMORY_FRACTION = 0.6

_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_MKL_CBWR_ALL = -1
_MKL_CBWR_STRICT = 0x10000


# --------------------------------------------------------------------------- devices, determinism


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then CPU. An explicit unavailable device is a :class:`ModelError`."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps")
    raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or mps")


def _mkl_cbwr_get() -> int | None:
    """MKL's current CNR setting, or None where the symbol cannot be reached (non-MKL builds)."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libtorch_cpu.*"))):
        try:
            fn = ctypes.CDLL(path).mkl_serv_cbwr_get
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        return int(fn(_MKL_CBWR_ALL))
    return None


def cpu_determinism_status() -> dict:
    """``{"mkl_strict_cnr": True/False/None, "mkl_cbwr_env": str|None, "mkldnn": bool}``.

    ``mkl_strict_cnr`` is None when MKL's setting cannot be queried (torch built without MKL);
    thread-count independence is then unverified.
    """
    value = _mkl_cbwr_get() if torch.backends.mkl.is_available() else None
    return {
        "mkl_strict_cnr": None if value is None else bool(value & _MKL_CBWR_STRICT),
        "mkl_cbwr_env": os.environ.get("MKL_CBWR"),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
    }


_strict_checked = False


def _check_cpu_determinism() -> None:
    """Warn once when MKL's strict CNR mode is off (it cannot change once MKL has started)."""
    global _strict_checked
    if _strict_checked:
        return
    _strict_checked = True
    status = cpu_determinism_status()
    if status["mkl_strict_cnr"] is False:
        log.warning(
            "MKL strict CNR mode is off (MKL_CBWR=%s, or MKL ran before bids_app.models.predictor was "
            "imported): CPU results may differ by ~1e-7 between thread counts. Set MKL_CBWR=AUTO,STRICT in "
            "the environment before starting Python for bit-identical results.", status["mkl_cbwr_env"]
        )


class NativePointwiseConv(TorchFunctionMode):
    """Runs every convolution whose kernel ends in 1x1 on ATen's native path (oneDNN off).

    ATen picks oneDNN for such convolutions only when more than one thread is available, so
    without this the result depends on ``torch.get_num_threads()``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if (isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dim() >= 3
                    and weight.shape[-1] == 1 and weight.shape[-2] == 1):
                previous = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
                try:
                    return func(*args, **kwargs)
                finally:
                    torch.backends.mkldnn.enabled = previous
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- geometry


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Separable Gaussian (float64) centred in the patch, sigma = ``sigma_scale`` * size, max 1.

    Values below the smallest positive one (none in practice) are raised to it, so no voxel of a
    window has zero weight.
    """
    axes = []
    for n in patch_size:
        centre = (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        x = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((x - centre) / sigma) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    positive = g[g > 0]
    return g.clamp_min(float(positive.min()))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` covering ``size`` (>= patch) with at least ``overlap``."""
    if size <= patch:
        return [0]
    step = max(patch * (1.0 - overlap), 1.0)
    n = int(math.ceil((size - patch) / step)) + 1
    return sorted({int(round(i * (size - patch) / (n - 1))) for i in range(n)})


@dataclass(frozen=True)
class Layout:
    """How one model sees one volume: padding, and the windows (one covering all = whole volume)."""

    shape: tuple[int, int, int]          # input spatial shape
    padded: tuple[int, int, int]         # padded spatial shape
    pad_before: tuple[int, int, int]
    window: tuple[int, int, int]         # window size (== padded when whole)
    windows: tuple[tuple[slice, slice, slice], ...]

    @property
    def whole(self) -> bool:
        return len(self.windows) == 1 and self.window == self.padded

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        return tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.shape))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(C, D, H, W)`` to ``padded`` (centred)."""
        pads: list[int] = []
        for before, size, target in reversed(list(zip(self.pad_before, self.shape, self.padded))):
            pads += [before, target - size - before]
        return F.pad(x, pads) if any(pads) else x


def make_layout(shape: Sequence[int], divisor: int, patch: Sequence[int] | None, overlap: float) -> Layout:
    """Whole volume when ``patch`` is None, else windows of ``patch`` rounded up to ``divisor``."""
    shape = tuple(int(s) for s in shape)
    divisor = max(int(divisor), 1)
    if patch is None:
        padded = tuple(_ceil_to(s, divisor) for s in shape)
        window = padded
        starts = [[0]] * 3
    else:
        window = tuple(_ceil_to(int(p), divisor) for p in patch)
        padded = tuple(max(s, w) for s, w in zip(shape, window))
        starts = [window_starts(s, w, overlap) for s, w in zip(padded, window)]
    before = tuple((p - s) // 2 for p, s in zip(padded, shape))
    windows = tuple(
        tuple(slice(st, st + w) for st, w in zip(start, window)) for start in itertools.product(*starts)
    )
    return Layout(shape, padded, before, window, windows)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Progress:
    """Logs ``done/total`` with an ETA every ``every`` seconds (and at the end) for long jobs."""

    def __init__(self, label: str, total: int, every: float = 30.0):
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.total > 1 and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            log.info("%s: %d/%d done (%.0f%%), %.1f s elapsed, ETA %.1f s",
                     self.label, self.done, self.total, 100.0 * self.done / self.total, elapsed, eta)


def _accepted_kwargs(fn: Callable, candidates: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(candidates)
    return {k: v for k, v in candidates.items() if k in params}


def as_image_tensor(image: Any) -> torch.Tensor:
    """Check a ``(C, D, H, W)`` array and return it as a contiguous float32 CPU tensor."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 4:
        raise ValueError(f"expected an image of shape (C, D, H, W), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"expected a numeric image, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("the image contains NaN or Inf values")
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------- predictor


class Predictor:
    """Run one model or an ensemble on ``(C, D, H, W)`` arrays; see the module docstring.

    Args:
        models: a network or a sequence of networks (``SegmentationNet`` contract).
        weights: ensemble weights (normalised; default equal).
        device: ``"auto"``, ``"cpu"``, ``"cuda"[:N]``, ``"mps"`` or a ``torch.device``.
        num_threads: ``torch.set_num_threads`` during :meth:`predict` (restored afterwards).
        patch_size: window size (rounded up to each model's ``size_divisor``) when windows are
            needed; default: the model's ``patch_size`` attribute, else :data:`DEFAULT_PATCH_SIZE`.
        overlap: fraction of a window shared with its neighbour along each axis (0 <= o < 1).
        amp: bfloat16 autocast on CUDA (never on CPU/MPS).
        tta_flip: also predict the mirrored volume along ``lr_axis`` and average.
        lr_swap: ``lr_swap[c]`` = class that mirrors class ``c`` (a self-inverse permutation);
            default identity.
        lr_axis: spatial axis (0, 1, 2 of ``D, H, W``) that is left-right; default 0 (RAS x).
        max_voxels: whole-volume inference when the padded volume has at most this many voxels,
            else windows (0 forces windows); default: free memory * :data:`MEMORY_FRACTION`
            divided by the model's ``inference_bytes_per_voxel`` (default
            :data:`DEFAULT_BYTES_PER_VOXEL`).
        deterministic: CPU: bit-identical results for any thread count (see module docstring);
            CUDA: deterministic cuDNN algorithms.
        progress_every: seconds between progress log lines for windowed inference.
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        *,
        weights: Sequence[float] | None = None,
        device: str | torch.device = "auto",
        num_threads: int | None = None,
        patch_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        amp: bool = True,
        tta_flip: bool = False,
        lr_swap: Sequence[int] | None = None,
        lr_axis: int = 0,
        max_voxels: int | None = None,
        deterministic: bool = True,
        progress_every: float = 30.0,
    ):
        self.models: list[nn.Module] = [models] if isinstance(models, nn.Module) else list(models)
        if not self.models:
            raise ValueError("at least one model is needed")
        if weights is None:
            weights = [1.0] * len(self.models)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.models):
            raise ValueError(f"{len(weights)} weights for {len(self.models)} models")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError("ensemble weights must be finite, non-negative and not all zero")
        total = math.fsum(weights)
        self.weights = [w / total for w in weights]
        self.device = resolve_device(device)
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError("num_threads must be >= 1")
        self.num_threads = None if num_threads is None else int(num_threads)
        if patch_size is not None:
            patch_size = (int(patch_size),) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(
                int(p) for p in patch_size)
            if len(patch_size) != 3 or min(patch_size) < 1:
                raise ValueError(f"patch_size must be one or three positive integers, got {patch_size}")
        self.patch_size = patch_size
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.overlap = float(overlap)
        self.amp = bool(amp)
        self.tta_flip = bool(tta_flip)
        if lr_axis not in (0, 1, 2):
            raise ValueError("lr_axis must be 0, 1 or 2 (an axis of D, H, W)")
        self.lr_axis = int(lr_axis)
        self.lr_swap = None if lr_swap is None else [int(c) for c in lr_swap]
        if self.lr_swap is not None:
            n = len(self.lr_swap)
            if sorted(self.lr_swap) != list(range(n)) or any(self.lr_swap[self.lr_swap[c]] != c for c in range(n)):
                raise ValueError("lr_swap must be a self-inverse permutation of 0..K-1")
        self.max_voxels = max_voxels
        self.deterministic = bool(deterministic)
        self.progress_every = float(progress_every)
        self.manifests: list[dict] = []
        for model in self.models:
            model.to(self.device)
            model.eval()

    @classmethod
    def from_checkpoints(cls, paths: Sequence[Any], **kwargs: Any) -> "Predictor":
        """An ensemble of checkpoints (:func:`~bids_app.models.checkpoint.load_checkpoint`).

        The members must share their label protocol and input channels (else :class:`ModelError`).
        ``lr_swap`` defaults to the protocol's ``lr_swap``. The manifests are kept in
        ``.manifests``.
        """
        from .checkpoint import load_checkpoint

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        loaded = [load_checkpoint(p, device="cpu") for p in paths]
        if not loaded:
            raise ValueError("at least one checkpoint is needed")
        first = loaded[0][1]
        for _, manifest in loaded[1:]:
            for key in ("label_protocol", "input_channels"):
                if manifest[key] != first[key]:
                    raise ModelError(f"ensemble members {first['name']!r} and {manifest['name']!r} differ in {key}")
        kwargs.setdefault("lr_swap", first["label_protocol"].get("lr_swap"))
        predictor = cls([m for m, _ in loaded], **kwargs)
        predictor.manifests = [man for _, man in loaded]
        return predictor

    # ----------------------------------------------------------------- runtime

    @property
    def autocast(self) -> bool:
        return self.amp and self.device.type == "cuda"

    @contextlib.contextmanager
    def runtime(self) -> Iterator[None]:
        """Threads, inference mode and the determinism settings, restored on exit."""
        previous_threads = torch.get_num_threads()
        stack = contextlib.ExitStack()
        cudnn = torch.backends.cudnn
        previous_cudnn = (cudnn.deterministic, cudnn.benchmark)
        try:
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)
            stack.enter_context(torch.inference_mode())
            if self.deterministic and self.device.type == "cpu":
                _check_cpu_determinism()
                stack.enter_context(NativePointwiseConv())
            if self.deterministic and self.device.type == "cuda":
                cudnn.deterministic, cudnn.benchmark = True, False
            yield
        finally:
            stack.close()
            if self.device.type == "cuda":
                cudnn.deterministic, cudnn.benchmark = previous_cudnn
            torch.set_num_threads(previous_threads)

    def forward(self, fn: Callable[[Any], torch.Tensor], batch: Any) -> torch.Tensor:
        """``fn(batch)`` with autocast as configured; float32 logits."""
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(batch)
        else:
            out = fn(batch)
        return out.float()

    # ----------------------------------------------------------------- layout

    def patch_for(self, model: nn.Module) -> tuple[int, int, int]:
        own = getattr(model, "patch_size", None)
        patch = self.patch_size or own or DEFAULT_PATCH_SIZE
        if isinstance(patch, (int, np.integer)):
            patch = (int(patch),) * 3
        return tuple(int(p) for p in patch)

    def fits_whole(self, model: nn.Module, padded_shape: Sequence[int], extra_bytes_per_voxel: int = 0) -> bool:
        voxels = math.prod(padded_shape)
        if self.max_voxels is not None:
            return voxels <= self.max_voxels
        per_voxel = int(getattr(model, "inference_bytes_per_voxel", DEFAULT_BYTES_PER_VOXEL)) + extra_bytes_per_voxel
        return voxels * per_voxel <= MEMORY_FRACTION * _available_bytes(self.device)

    def layout_for(self, model: nn.Module, shape: Sequence[int]) -> Layout:
        divisor = int(getattr(model, "size_divisor", 1) or 1)
        whole = make_layout(shape, divisor, None, self.overlap)
        if self.fits_whole(model, whole.padded):
            return whole
        return make_layout(shape, divisor, self.patch_for(model), self.overlap)

    # ----------------------------------------------------------------- inference

    def predict(self, image: Any) -> np.ndarray:
        """``(C, D, H, W)`` float32 -> ``(K, D, H, W)`` float32 softmax probabilities."""
        x = as_image_tensor(image)
        with self.runtime():
            out: torch.Tensor | None = None
            for index, (model, weight) in enumerate(zip(self.models, self.weights)):
                probs = self.predict_model(model, x, label=f"model {index + 1}/{len(self.models)}")
                if len(self.models) == 1:
                    out = probs
                    break
                if out is None:
                    out = torch.zeros(probs.shape, dtype=torch.float64)
                elif out.shape != probs.shape:
                    raise ValueError(f"ensemble members disagree on the output: {tuple(out.shape)} vs {tuple(probs.shape)}")
                out.add_(probs.double(), alpha=weight)
        assert out is not None
        return out.float().numpy()

    def predict_model(self, model: nn.Module, x: torch.Tensor, label: str = "model") -> torch.Tensor:
        """One model (with flip TTA when configured): ``(K, D, H, W)`` float32 CPU probabilities."""
        probs = self._single(model, x, label)
        if not self.tta_flip:
            return probs
        axis = self.lr_axis + 1
        flipped = self._single(model, torch.flip(x, dims=(axis,)), label + " (flipped)")
        flipped = torch.flip(flipped, dims=(axis,))
        if self.lr_swap is not None:
            if len(self.lr_swap) != flipped.shape[0]:
                raise ValueError(f"lr_swap has {len(self.lr_swap)} entries, the model {flipped.shape[0]} classes")
            flipped = flipped[self.lr_swap]
        return (probs + flipped) * 0.5

    def _single(self, model: nn.Module, x: torch.Tensor, label: str) -> torch.Tensor:
        if getattr(model, "kind", "dense") == "patch":
            return self.predict_patch_model(model, x)
        layout = self.layout_for(model, x.shape[1:])
        return self.run_dense(layout, x, lambda t: model(t), label=label)

    def predict_patch_model(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A patch-kind network through its own ``predict_volume(volume, ...)``."""
        fn = getattr(model, "predict_volume", None)
        if fn is None:
            raise ModelError(f"{type(model).__name__} is a patch-kind model without predict_volume()")
        kwargs = _accepted_kwargs(fn, {"device": self.device, "autocast": self.autocast})
        probs = fn(x, **kwargs)
        return torch.as_tensor(probs).float().cpu()

    def run_dense(
        self,
        layout: Layout,
        x: torch.Tensor,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        label: str = "model",
    ) -> torch.Tensor:
        """Probabilities of ``run`` (a batch ``(1, C, d, h, w)`` -> logits) over ``layout``.

        Whole volume: one call, softmax, crop. Windows: Gaussian-weighted mean of the windows'
        softmax, float64 accumulators, windows in the fixed order of ``layout.windows``.
        """
        padded = layout.pad(x)
        if layout.whole:
            logits = self.forward(run, padded[None].to(self.device))
            probs = torch.softmax(logits, dim=1)[0]
            return probs[(slice(None),) + layout.crop].cpu().contiguous()

        blender = WindowBlender(layout)
        progress = Progress(f"{label}: windows", len(layout.windows), self.progress_every)
        for index, window in enumerate(layout.windows):
            batch = padded[(slice(None),) + window][None].contiguous().to(self.device)
            logits = self.forward(run, batch)
            blender.add(index, torch.softmax(logits, dim=1)[0].cpu())
            progress.step()
        return blender.result()


class WindowBlender:
    """Gaussian-weighted blending of window probabilities in a fixed window order.

    ``add(index, probs)`` must be called with indices 0, 1, 2... in ``layout.windows`` order, so
    the floating-point sums are the same on every run.
    """

    def __init__(self, layout: Layout, dtype: torch.dtype = torch.float64):
        self.layout = layout
        self.dtype = dtype
        self.gauss = gaussian_importance(layout.window).to(dtype)
        self.acc: torch.Tensor | None = None
        self.wsum = torch.zeros(layout.padded, dtype=dtype)
        self.next_index = 0

    def add(self, index: int, probs: torch.Tensor) -> None:
        if index != self.next_index:
            raise RuntimeError(f"windows must be blended in order: got {index}, expected {self.next_index}")
        self.next_index += 1
        window = self.layout.windows[index]
        if self.acc is None:
            self.acc = torch.zeros((probs.shape[0],) + self.layout.padded, dtype=self.dtype)
        self.acc[(slice(None),) + window].add_(probs.to(self.dtype) * self.gauss)
        self.wsum[window].add_(self.gauss)

    def result(self) -> torch.Tensor:
        """``(K, D, H, W)`` float32, cropped to the input shape."""
        if self.acc is None or self.next_index != len(self.layout.windows):
            raise RuntimeError("not all windows were blended")
        crop = self.layout.crop
        out = self.acc[(slice(None),) + crop] / self.wsum[crop]
        return out.float().contiguous()


# --------------------------------------------------------------------------- cascade


class Cascade:
    """Two-stage inference: stage 2 sees stage 1's mask of ``mask_classes``.

    ``mode="channel"`` (default): the mask (1 inside, 0 outside; argmax of stage 1 in
    ``mask_classes``) is appended to the input as an extra last channel, so stage 2 must take
    ``C + 1`` channels. ``mode="mask"``: the input is multiplied by the mask (stage 2 takes ``C``
    channels). Returns stage 2's probabilities. ``stage1``/``stage2`` are :class:`Predictor` s or
    models (wrapped in a :class:`Predictor` with ``predictor_kwargs``).
    """

    MODES = ("channel", "mask")

    def __init__(self, stage1: Any, stage2: Any, *, mask_classes: Sequence[int], mode: str = "channel",
                 **predictor_kwargs: Any):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.stage1 = stage1 if isinstance(stage1, Predictor) else Predictor(stage1, **predictor_kwargs)
        self.stage2 = stage2 if isinstance(stage2, Predictor) else Predictor(stage2, **predictor_kwargs)
        self.mask_classes = sorted({int(c) for c in mask_classes})
        if not self.mask_classes:
            raise ValueError("mask_classes must name at least one class")
        self.mode = mode

    def stage2_input(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.mode == "channel":
            return np.concatenate([image, mask[None]], axis=0)
        return image * mask[None]

    def predict_all(self, image: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(stage-2 probabilities, stage-1 mask float32 (D, H, W), stage-1 probabilities)``."""
        arr = as_image_tensor(image).numpy()
        probs1 = self.stage1.predict(arr)
        mask = np.isin(probs1.argmax(axis=0), self.mask_classes).astype(np.float32)
        log.info("cascade: stage-1 mask has %d voxels (classes %s)", int(mask.sum()), self.mask_classes)
        probs2 = self.stage2.predict(self.stage2_input(arr, mask))
        return probs2, mask, probs1

    def predict(self, image: Any) -> np.ndarray:
        """``(C, D, H, W)`` -> stage 2's ``(K2, D, H, W)`` probabilities."""
        return self.predict_all(image)[0]
