"""Checkpoints: ``<name>.safetensors`` (the weights) + ``<name>.json`` (the manifest).

A checkpoint never contains code. The weights are a flat ``safetensors`` state dict; everything
needed to rebuild the network and to use it correctly is in the JSON manifest:

==================  ==========================================================================
field               meaning
==================  ==========================================================================
``format_version``  version of this manifest layout (:data:`FORMAT_VERSION`)
``name``            model name (also the file stem by default)
``version``         the model's own version string
``architecture``    a name of :data:`bids_app.models.registry.ARCHITECTURES`
``kwargs``          constructor keyword arguments of that architecture (JSON values)
``label_protocol``  ``{"name": str, "labels": [{"index": int, "name": str}, ...]}``, optionally
                    ``"lr_swap": [int, ...]`` (mirrored class of every class, for flip TTA);
                    ``null`` for the image-to-image tasks (:data:`IMAGE_TASKS`)
``task``            optional: what the model is for (``"wholebrain"``, a cerebellum task, or an
                    image task of :data:`IMAGE_TASKS`, whose manifest also needs
                    ``output_channels``: ``[{"name": "T2w", "normalisation": ...}]``)
``input_channels``  ``[{"name": "T1w", "normalisation": "percentile99"}, ...]`` in input order
``voxel_size_mm``   a positive number (isotropic) or three positive numbers
``crop``            optional (``null`` or an object), e.g. the cerebellum box
``training``        ``{"data": str, "licence": str, "seed": int, ...}``
``metrics``         validation figures (an object; numbers or nested objects)
``sha256``          hex SHA-256 of the ``.safetensors`` file
``weights_dtype``   ``"float32"`` or ``"float16"`` (storage; always float32 once loaded)
``n_parameters``    number of trainable parameters of the network
==================  ==========================================================================

Loading (:func:`load_checkpoint`) verifies the checksum *before* parsing the weights, validates
the manifest, rebuilds the network through the registry with the manifest's ``kwargs`` and
loads the state dict with ``strict=True``. Anything else is refused with a one-line
:class:`ModelError`: pickle-based files (``.pt``/``.pth``/``.ckpt``/``.pkl``...) are refused by
name *and* by content, without ever being unpickled (``torch.load`` is never called).

``torch`` and ``safetensors`` are imported lazily, so listing the installed models
(:func:`list_models`) costs no torch import.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from bids_app.bids import atomic_write_bytes
from bids_app.errors import EXIT_RESOURCE, ArborSegError

log = logging.getLogger(__name__)

#: version of the manifest layout written by :func:`save_checkpoint`
FORMAT_VERSION = 1
#: manifest fields that must be present (``crop`` may be absent or null)
REQUIRED_FIELDS = (
    "format_version", "name", "version", "architecture", "kwargs", "label_protocol",
    "input_channels", "voxel_size_mm", "training", "metrics", "sha256",
)
#: environment variable naming an extra folder of installed models
MODELS_DIR_ENV = "ARBORSEG_MODELS_DIR"
#: the package's own models (package data; may be empty or absent)
PACKAGE_MODELS_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
#: file suffixes of pickle-based checkpoints, refused without being opened by torch/pickle
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".npy", ".npz")
WEIGHTS_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
_STORAGE_DTYPES = ("float32", "float16")
#: tasks whose networks output images (regression), not class logits: no label protocol
IMAGE_TASKS = ("superres", "t2synth")


class ModelError(ArborSegError):
    """A model checkpoint is missing, corrupt, tampered with, or does not match its manifest."""

    exit_code = EXIT_RESOURCE


# --------------------------------------------------------------------------- paths


def _split_path(path_stem_or_json: str | os.PathLike) -> tuple[Path, Path]:
    """``(manifest, weights)`` paths for a stem, a ``.json`` or a ``.safetensors`` path."""
    path = Path(path_stem_or_json)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: pickle-based checkpoints ({suffix}) are refused (they can run arbitrary code); "
            f"convert them to a {WEIGHTS_SUFFIX} + {MANIFEST_SUFFIX} checkpoint with save_checkpoint()"
        )
    if suffix in (MANIFEST_SUFFIX, WEIGHTS_SUFFIX):
        stem = path.with_suffix("")
    else:
        stem = path
    return stem.with_name(stem.name + MANIFEST_SUFFIX), stem.with_name(stem.name + WEIGHTS_SUFFIX)


def _sniff_format(data: bytes) -> str:
    """``"safetensors"``, ``"a zip archive (torch.save format)"``, ``"a Python pickle"`` or ``"unknown"``."""
    if len(data) >= 10:
        n = int.from_bytes(data[:8], "little")
        if 2 <= n <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format)"
    if len(data) >= 2 and data[0] == 0x80 and data[1] <= 5:
        return "a Python pickle"
    return "unknown"


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_label_protocol(protocol: Any, bad) -> None:
    if not isinstance(protocol, dict) or not isinstance(protocol.get("name"), str):
        raise bad("'label_protocol' must be an object with a string 'name' and a list 'labels'")
    labels = protocol.get("labels")
    if not isinstance(labels, list) or not labels:
        raise bad("'label_protocol.labels' must be a non-empty list of {index, name}")
    indices = []
    for entry in labels:
        if not (isinstance(entry, dict) and isinstance(entry.get("index"), int)
                and not isinstance(entry.get("index"), bool) and isinstance(entry.get("name"), str)):
            raise bad("every label must be an object with an integer 'index' and a string 'name'")
        indices.append(entry["index"])
    if len(set(indices)) != len(indices):
        raise bad("label indices must be unique")
    swap = protocol.get("lr_swap")
    if swap is not None:
        n = len(labels)
        if (not isinstance(swap, list) or sorted(swap) != list(range(n))
                or any(swap[swap[c]] != c for c in range(n))):
            raise bad("'label_protocol.lr_swap' must be a self-inverse permutation of the class positions")


def _check_channels(channels: Any, key: str, bad) -> None:
    if not isinstance(channels, list) or not channels or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("normalisation"), str)
        for c in channels
    ):
        raise bad(f"'{key}' must be a non-empty list of {{name, normalisation}}")


def validate_manifest(manifest: Any, *, where: str = "manifest", check_kwargs: bool = True) -> dict:
    """Check the fields and types of a manifest; returns it, raises :class:`ModelError`.

    ``check_kwargs`` imports the architecture class (torch) and checks that its constructor
    accepts the manifest's ``kwargs``; without it only the name is checked against the registry.
    """
    from .registry import ARCHITECTURES

    def bad(problem: str) -> ModelError:
        return ModelError(f"{where}: {problem}")

    if not isinstance(manifest, dict):
        raise bad("the manifest must be a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise bad(f"format_version {manifest['format_version']!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("name", "version", "architecture", "sha256"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise bad(f"{key!r} must be a non-empty string")
    sha = manifest["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise bad("'sha256' must be 64 lower-case hexadecimal digits")
    arch = manifest["architecture"]
    if arch not in ARCHITECTURES:
        raise bad(f"unknown architecture {arch!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    kwargs = manifest["kwargs"]
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise bad("'kwargs' must be an object")

    if manifest.get("task") in IMAGE_TASKS:
        _check_channels(manifest.get("output_channels"), "output_channels", bad)
        if manifest["label_protocol"] is not None:
            raise bad(f"'label_protocol' must be null for the image task {manifest['task']!r}")
    else:
        _check_label_protocol(manifest["label_protocol"], bad)
    _check_channels(manifest["input_channels"], "input_channels", bad)

    vox = manifest["voxel_size_mm"]
    values = vox if isinstance(vox, list) else [vox]
    if not (len(values) in (1, 3) and all(_is_number(v) and v > 0 for v in values)):
        raise bad("'voxel_size_mm' must be a positive number or a list of three")
    if manifest.get("crop") is not None and not isinstance(manifest["crop"], dict):
        raise bad("'crop' must be an object or null")
    training = manifest["training"]
    if not isinstance(training, dict):
        raise bad("'training' must be an object")
    for key, kind in (("data", str), ("licence", str), ("seed", int)):
        if key not in training or not isinstance(training[key], kind) or isinstance(training[key], bool):
            raise bad(f"'training.{key}' must be a {kind.__name__}")
    if not isinstance(manifest["metrics"], dict):
        raise bad("'metrics' must be an object")
    dtype = manifest.get("weights_dtype", "float32")
    if dtype not in _STORAGE_DTYPES:
        raise bad(f"'weights_dtype' must be one of {', '.join(_STORAGE_DTYPES)}")

    if check_kwargs:
        from .registry import architecture_class

        try:
            cls = architecture_class(arch)
        except Exception as exc:  # missing module, import error inside it...
            raise bad(f"architecture {arch!r} cannot be imported: {type(exc).__name__}: {exc}") from None
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as exc:
            raise bad(f"kwargs not accepted by {arch!r}: {exc}") from None
    return manifest


def _read_manifest(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: model manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the model manifest ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: the model manifest is not valid JSON ({exc.msg}, line {exc.lineno})") from None


# --------------------------------------------------------------------------- save / load


def _architecture_name(model: Any) -> str | None:
    from .registry import ARCHITECTURES

    cls = type(model)
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, where in ARCHITECTURES.items():
        if where == target:
            return name
    return None


def _json_roundtrip(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{what} is not JSON-serialisable: {exc}") from None


def save_checkpoint(
    model: Any, path_stem: str | os.PathLike, manifest_fields: Mapping[str, Any], *, dtype: str = "float32"
) -> dict:
    """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the manifest written.

    ``manifest_fields`` provides the descriptive fields (``version``, ``label_protocol``,
    ``input_channels``, ``voxel_size_mm``, ``training``, ``metrics``, optionally ``name``,
    ``crop``, ``architecture``, ``kwargs``). ``architecture`` defaults to the registry name of
    ``type(model)`` and ``kwargs`` to ``model.config``; ``name`` to the file stem. ``sha256``,
    ``format_version``, ``weights_dtype`` and ``n_parameters`` are filled in here.

    ``dtype="float16"`` stores floating tensors in half precision (half the size; values are
    restored to float32 on load, relative error <= 2**-11 for normal numbers); a tensor that
    would overflow float16 is refused. Each file is written to a temporary name and renamed
    (weights first, then manifest), so a crash leaves either the old checkpoint or a weights
    file that no longer matches its manifest's checksum, which loading refuses.
    """
    import torch
    from safetensors.torch import save as st_save

    if dtype not in _STORAGE_DTYPES:
        raise ModelError(f"storage dtype must be one of {', '.join(_STORAGE_DTYPES)}, got {dtype!r}")
    manifest_path, weights_path = _split_path(path_stem)
    fields = dict(manifest_fields)
    for key in ("sha256", "format_version", "weights_dtype"):
        fields.pop(key, None)
    arch = fields.get("architecture") or _architecture_name(model)
    if arch is None:
        raise ModelError(f"{type(model).__name__} is not a registered architecture; pass manifest_fields['architecture']")
    kwargs = fields.get("kwargs", getattr(model, "config", None))
    if kwargs is None:
        raise ModelError("the model has no .config; pass manifest_fields['kwargs']")

    tensors: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous().clone()  # clone: no shared storage in the file
        if dtype == "float16" and t.is_floating_point():
            half = t.to(torch.float16)
            if not torch.isfinite(half).all() and torch.isfinite(t).all():
                raise ModelError(f"tensor {key!r} overflows float16; save with dtype='float32'")
            t = half
        tensors[key] = t
    blob = st_save(tensors, metadata={"format": "pt", "arborseg_format_version": str(FORMAT_VERSION)})

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": fields.pop("name", manifest_path.name[: -len(MANIFEST_SUFFIX)]),
        "version": fields.pop("version", None),
        "architecture": arch,
        "kwargs": _json_roundtrip(kwargs, "kwargs"),
        "crop": None,
        "weights_dtype": dtype,
        "n_parameters": int(n_params),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    for key in ("architecture", "kwargs"):
        fields.pop(key, None)
    manifest.update(_json_roundtrip(fields, "manifest_fields"))
    validate_manifest(manifest, where=str(manifest_path))
    # the weights must fit the architecture built from the manifest, or loading would fail later
    _check_state_dict(_build(manifest, str(manifest_path)), tensors, str(weights_path))

    atomic_write_bytes(weights_path, blob)
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    log.info("saved checkpoint %s (%s, %d parameters, %s, %.1f MB)",
             manifest_path, arch, n_params, dtype, len(blob) / 1e6)
    return manifest


def _build(manifest: dict, where: str):
    from .registry import build

    try:
        return build(manifest["architecture"], **manifest["kwargs"])
    except Exception as exc:
        raise ModelError(f"{where}: cannot build {manifest['architecture']!r} with the manifest's kwargs: "
                         f"{type(exc).__name__}: {exc}") from None


def _check_state_dict(model, tensors: Mapping[str, Any], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) (e.g. {', '.join(extra[:3])})")
        raise ModelError(f"{where}: weights do not match the architecture: {'; '.join(parts)}")
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ModelError(f"{where}: shape mismatch for {key!r}: file {tuple(got.shape)}, "
                             f"architecture {tuple(ref.shape)}")
        if got.is_floating_point() != ref.is_floating_point():
            raise ModelError(f"{where}: dtype mismatch for {key!r}: file {got.dtype}, architecture {ref.dtype}")


def load_checkpoint(path_stem_or_json: str | os.PathLike, *, device: Any = "cpu") -> tuple[Any, dict]:
    """Verify, rebuild and load a checkpoint; returns ``(model in eval mode on device, manifest)``.

    ``path_stem_or_json``: ``<stem>``, ``<stem>.json`` or ``<stem>.safetensors``. ``device``:
    a torch device or ``"auto"``/``"cpu"``/``"cuda"``/``"mps"`` (see
    :func:`bids_app.models.predictor.resolve_device`). Raises :class:`ModelError` for a missing
    file, a manifest that is not JSON or is invalid, an unknown architecture or kwargs it does
    not accept, a checksum mismatch, a file that is not safetensors (pickles are never loaded),
    missing/unexpected keys and shape mismatches.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    manifest_path, weights_path = _split_path(path_stem_or_json)
    if not manifest_path.exists() and weights_path.exists():
        raise ModelError(f"{weights_path}: no manifest {manifest_path.name} next to the weights")
    manifest = validate_manifest(_read_manifest(manifest_path), where=str(manifest_path))
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{weights_path}: model weights not found") from None
    except OSError as exc:
        raise ModelError(f"{weights_path}: cannot read the model weights ({exc})") from None
    kind = _sniff_format(blob)
    if kind != "safetensors":
        what = "not recognised" if kind == "unknown" else f"is {kind}"
        raise ModelError(f"{weights_path}: {what}, not a safetensors file; refused without loading it")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest["sha256"]:
        raise ModelError(f"{weights_path}: checksum mismatch (sha256 {digest[:12]}..., manifest says "
                         f"{manifest['sha256'][:12]}...); the file is corrupt or was modified")
    try:
        tensors = st_load(blob)  # parses the very bytes that were hashed
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights_path}: not a valid safetensors file ({exc})") from None
    del blob

    model = _build(manifest, str(manifest_path))
    _check_state_dict(model, tensors, str(weights_path))
    reference = model.state_dict()
    state = {k: (v.to(reference[k].dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights_path}: {str(exc).splitlines()[0]}") from None
    if device is not None:
        from .predictor import resolve_device

        model.to(resolve_device(device) if isinstance(device, str) else torch.device(device))
    model.eval()
    log.info("loaded model %s %s (%s) from %s", manifest["name"], manifest["version"],
             manifest["architecture"], manifest_path)
    return model, manifest


# --------------------------------------------------------------------------- installed models


def _safetensors_numel(path: Path) -> int | None:
    """Number of stored values, from the safetensors header alone (no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            header = json.loads(fh.read(n))
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _metrics_summary(metrics: Mapping[str, Any], limit: int = 4) -> str:
    parts = []
    for key, value in metrics.items():
        if _is_number(value):
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        elif isinstance(value, str):
            parts.append(f"{key}={value}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def model_folders(folder: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for installed models: package data, ``folder``, ``$ARBORSEG_MODELS_DIR``."""
    folders = [PACKAGE_MODELS_DIR]
    if folder is not None:
        folders.append(Path(folder))
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        folders.append(Path(env))
    unique: list[Path] = []
    for f in folders:
        f = f.expanduser().resolve()
        if f not in unique:
            unique.append(f)
    return unique


def list_models(folder: str | os.PathLike | None = None) -> list[dict]:
    """The installed models: one dict per valid manifest found in :func:`model_folders`.

    Keys: ``name``, ``version``, ``architecture``, ``task`` (``None`` when the manifest has none),
    ``protocol``, ``channels``, ``parameters``, ``size_mb``, ``licence``, ``metrics`` (short summary
    string), ``path`` (of the manifest).
    Checksums are not verified here (that is :func:`load_checkpoint`'s job) and torch is not
    imported; manifests that are invalid or lack their weights are skipped with a warning.
    """
    rows: list[dict] = []
    for base in model_folders(folder):
        if not base.is_dir():
            continue
        for manifest_path in sorted(base.rglob(f"*{MANIFEST_SUFFIX}")):
            weights = manifest_path.with_suffix(WEIGHTS_SUFFIX)
            if not weights.exists():
                log.debug("skipping %s: no %s next to it", manifest_path, weights.name)
                continue
            try:
                manifest = validate_manifest(_read_manifest(manifest_path), where=str(manifest_path),
                                             check_kwargs=False)
            except ModelError as exc:
                log.warning("skipping invalid model manifest: %s", exc)
                continue
            n_params = manifest.get("n_parameters")
            if not isinstance(n_params, int):
                n_params = _safetensors_numel(weights)
            rows.append({
                "name": manifest["name"],
                "version": manifest["version"],
                "architecture": manifest["architecture"],
                "task": manifest.get("task"),
                "protocol": (manifest["label_protocol"]["name"] if manifest["label_protocol"] is not None
                             else "image:" + "+".join(c["name"] for c in manifest["output_channels"])),
                "channels": [c["name"] for c in manifest["input_channels"]],
                "parameters": n_params,
                "size_mb": round(weights.stat().st_size / 1e6, 3),
                "licence": manifest["training"].get("licence"),
                "metrics": _metrics_summary(manifest["metrics"]),
                "path": str(manifest_path),
            })
    return rows


def verify_checkpoint(raw) -> tuple[Path, dict]:
    """Check one checkpoint before any work, without torch: a valid manifest, safetensors weights that match its
    checksum. Returns ``(resolved manifest path, manifest)``; :class:`ModelError` names the file."""
    manifest_path, weights_path = _split_path(Path(raw).expanduser())
    if not manifest_path.exists() and not weights_path.exists():
        raise ModelError(f"{raw}: no such model checkpoint (expected {manifest_path.name} and {weights_path.name})")
    manifest = validate_manifest(_read_manifest(manifest_path), where=str(manifest_path), check_kwargs=False)
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{weights_path}: model weights not found") from None
    except OSError as exc:
        raise ModelError(f"{weights_path}: cannot read the model weights ({exc.strerror})") from None
    if _sniff_format(blob) != "safetensors":
        raise ModelError(f"{weights_path}: not a safetensors file; refused without loading it")
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ModelError(f"{weights_path}: checksum mismatch with {manifest_path.name}; the file is corrupt or was "
                         f"modified")
    return manifest_path.resolve(), manifest


def models_with_task(tasks, folder: str | os.PathLike | None = None) -> list[str]:
    """Manifest paths (sorted) of the installed checkpoints whose manifest ``task`` is one of ``tasks``."""
    wanted = {tasks} if isinstance(tasks, str) else set(tasks)
    return sorted(row["path"] for row in list_models(folder) if row["task"] in wanted)
