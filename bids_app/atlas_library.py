"""The labelled cerebellum library on disk (made by ``arborseg-build-library``) and the atlas prior file adapter.

A library is a folder with ``library.json``::

    {"format": "arborseg-cerebellum-library", "format_version": 2, "space": "MNI152NLin6Asym",
     "shape": [128, 88, 88], "protocol": "lobules", "affine": [[...]] (optional),
     "cases": [{"case": "oasis-sub-01", "subject": "OASIS-TRT-20-1", "mirrored": false, "kind": "real",
                "t1w": "oasis-sub-01_T1w.nii.gz", "dseg": "oasis-sub-01_dseg.nii.gz", ...}, ...]}

Every ``t1w`` is a float32 crop on the library grid (same normalisation as the pipeline's crop:
99th percentile inside the brain = 1), every ``dseg`` its ``lobules`` label map on the same grid.
:func:`read_library` checks all of that from the headers (no voxel data is read) and returns an
:class:`~bids_app.core.atlas_fusion.AtlasLibrary` whose images and labels load when first used
(``eager=True`` loads them at once). Every problem is a :class:`LibraryError` naming the file.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import EXIT_RESOURCE, ArborSegError, InputFileError

LOGGER = logging.getLogger(__name__)

LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = "arborseg-cerebellum-library"
#: 1 and 2 differ only in the ``full`` label maps (training); the T1w and lobule maps read here are the same
SUPPORTED_VERSIONS = (1, 2)
LIBRARY_SPACE = "MNI152NLin6Asym"
#: how the prior is stored: uint8 with a NIfTI scale factor (about 1/255), read back as floats
PRIOR_STORAGE = "uint8"
_GRID_ATOL = 1e-3


class LibraryError(ArborSegError):
    """The cerebellum library (or one of its files) is unusable; the message names the file."""

    exit_code = EXIT_RESOURCE

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def library_json_path(path: str | Path) -> Path:
    """``library.json`` of a library folder (or the file itself)."""
    path = Path(path)
    return path if path.name == LIBRARY_FILE or path.suffix == ".json" else path / LIBRARY_FILE


def _read_json(path: Path) -> dict:
    if not path.parent.is_dir():
        raise LibraryError(path.parent, "the library folder does not exist")
    if not path.is_file():
        raise LibraryError(path, "no library description here (is this a folder made by arborseg-build-library?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise LibraryError(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise LibraryError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LibraryError(path, "must hold a JSON object")
    return data


def _header(path: Path, what: str, where: Path):
    import nibabel as nb

    if not path.is_file():
        raise LibraryError(path, f"{what} listed in {where} does not exist")
    try:
        return nb.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for broken headers
        raise LibraryError(path, f"{what} is not a readable NIfTI image ({exc})") from None


def _loader(img, path: Path, what: str, dtype, allowed: frozenset[int] | None = None):
    def load() -> np.ndarray:
        try:
            data = np.asarray(img.dataobj)
        except Exception as exc:
            raise LibraryError(path, f"{what}: the voxel data cannot be read ({exc})") from None
        if allowed is not None:
            if data.dtype.kind == "f":
                if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
                    raise LibraryError(path, f"{what}: label maps must hold integer values")
            values = set(np.unique(data).astype(np.int64).tolist())
            unknown = sorted(values - allowed)
            if unknown:
                raise LibraryError(path, f"{what}: label values {unknown[:10]} are not in the library's protocol")
        elif not np.all(np.isfinite(data)):
            raise LibraryError(path, f"{what}: NaN or Inf voxels")
        return np.asarray(data, dtype=dtype)

    return load


def read_library(path: str | Path, *, eager: bool = False, protocol: str = "lobules"):
    """Read and check a library (folder or ``library.json``); returns an :class:`AtlasLibrary`.

    Checked: ``format``, ``format_version``, ``space``, ``shape``, ``protocol`` (must be ``protocol``),
    the cases (unique ``case`` ids, a ``subject``, ``t1w`` and ``dseg`` files that exist), and that
    every image is 3D on one grid (shape and affine, also against ``affine`` when given). The label
    values are checked when the labels are loaded (``eager=True``: now).
    """
    from .core.atlas_fusion import AtlasCase, AtlasLibrary
    from .core.labels import ProtocolError, load_protocol

    jpath = library_json_path(path)
    root = jpath.parent
    data = _read_json(jpath)
    fmt = data.get("format")
    if fmt != LIBRARY_FORMAT:
        raise LibraryError(jpath, f"format is {fmt!r}, expected {LIBRARY_FORMAT!r}")
    version = data.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise LibraryError(jpath, f"format_version {version!r} is not supported (supported: "
                                  f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    space = data.get("space")
    if space != LIBRARY_SPACE:
        raise LibraryError(jpath, f"space is {space!r}, expected {LIBRARY_SPACE!r} (the pipeline's cerebellum crop)")
    shape = data.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise LibraryError(jpath, f"shape must be three positive integers, got {shape!r}")
    shape = tuple(shape)
    name = data.get("protocol")
    if name != protocol:
        raise LibraryError(jpath, f"protocol is {name!r}, the atlas prior needs {protocol!r}")
    try:
        prot = load_protocol(name)
    except ProtocolError as exc:
        raise LibraryError(jpath, str(exc)) from None
    allowed = frozenset(int(v) for v in prot.indices)
    affine = None
    if "affine" in data:
        try:
            affine = np.asarray(data["affine"], dtype=float)
            if affine.shape != (4, 4):
                raise ValueError
        except (TypeError, ValueError):
            raise LibraryError(jpath, "affine must be a 4x4 matrix") from None
    cases_json = data.get("cases")
    if not isinstance(cases_json, list) or not cases_json:
        raise LibraryError(jpath, "cases must be a non-empty list")

    cases = []
    seen: set[str] = set()
    ref_file = None
    for i, entry in enumerate(cases_json):
        if not isinstance(entry, dict):
            raise LibraryError(jpath, f"cases[{i}] must be an object")
        for key in ("case", "subject", "t1w", "dseg"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise LibraryError(jpath, f"cases[{i}] needs a non-empty string {key!r}")
        case = entry["case"]
        if case in seen:
            raise LibraryError(jpath, f"case {case!r} is listed twice")
        seen.add(case)
        imgs = {}
        for key, what in (("t1w", "T1w image"), ("dseg", "label map")):
            fpath = root / entry[key]
            img = _header(fpath, f"{what} of case {case!r}", jpath)
            if len(img.shape) != 3:
                raise LibraryError(fpath, f"{what} of case {case!r} must be 3D, its shape is {tuple(img.shape)}")
            if tuple(img.shape) != shape:
                raise LibraryError(fpath, f"{what} of case {case!r} has shape {tuple(img.shape)}, "
                                          f"the library's is {shape} ({jpath})")
            if affine is None:
                affine, ref_file = np.asarray(img.affine, dtype=float), fpath
            elif not np.allclose(img.affine, affine, atol=_GRID_ATOL):
                ref = ref_file or jpath
                raise LibraryError(fpath, f"{what} of case {case!r} is not on the library grid (its affine differs "
                                          f"from that of {ref})")
            if key == "t1w" and img.get_data_dtype().kind not in "fiu":
                raise LibraryError(fpath, f"T1w image of case {case!r} has voxel type {img.get_data_dtype()}")
            imgs[key] = (img, fpath)
        t1w, t1w_path = imgs["t1w"]
        dseg, dseg_path = imgs["dseg"]
        cases.append(AtlasCase(
            case=case, subject=entry["subject"], mirrored=bool(entry.get("mirrored", False)),
            kind=str(entry.get("kind", "real")),
            image_source=_loader(t1w, t1w_path, f"T1w image of case {case!r}", np.float32),
            labels_source=_loader(dseg, dseg_path, f"label map of case {case!r}", np.int16, allowed),
        ))
    library = AtlasLibrary(cases=cases, affine=affine, shape=shape, protocol=name, path=str(root))
    if eager:
        for c in cases:
            c.image, c.labels  # noqa: B018 - loads and checks
    return library


def _same_grid(img, library) -> bool:
    return tuple(img.shape[:3]) == tuple(library.shape) and np.allclose(img.affine, library.affine, atol=_GRID_ATOL)


def _fmt_affine(affine) -> str:
    return json.dumps(np.round(np.asarray(affine, dtype=float), 3).tolist())


def prior_image(probabilities: np.ndarray, affine, *, storage: str = PRIOR_STORAGE):
    """Probabilities ``(K, X, Y, Z)`` as a 4D NIfTI (X, Y, Z, K): ``uint8`` (NIfTI scale factor, about 1/255) or
    ``float32``."""
    import nibabel as nb

    data = np.moveaxis(probabilities, 0, -1)
    img = nb.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm")
    if storage == "uint8":
        img.set_data_dtype(np.uint8)  # nibabel scales [0, max] onto 0..255 (slope = max / 255, no intercept)
    elif storage != "float32":
        raise ValueError(f"storage must be 'uint8' or 'float32', got {storage!r}")
    return img


def prior_probabilities(img) -> np.ndarray:
    """A prior image as :func:`prior_image` writes it (X, Y, Z, K), read back as ``(K, X, Y, Z)`` float32."""
    return np.moveaxis(np.asarray(img.dataobj, dtype=np.float32), -1, 0)


def save_prior(result, affine, out_file, *, storage: str = PRIOR_STORAGE) -> str:
    """Write :func:`prior_image` atomically; returns the path."""
    from .core.files import save_atomic

    return save_atomic(prior_image(result.probabilities, affine, storage=storage), out_file)


def sidecar_path(out_file: str | Path) -> Path:
    """``x.nii.gz`` -> ``x.json`` next to it."""
    out_file = Path(out_file)
    name = out_file.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return out_file.with_name(name[: -len(ext)] + ".json")
    return out_file.with_name(name + ".json")


def atlas_prior_file(t1w_crop_file, library_dir, *, out_file, json_file=None, n: int | None = None,
                     d: float | None = None, scale: float | None = None, preset: str | None = None,
                     random_seed: int = 42, exclude_subjects: Iterable[str] = (), exclude_cases: Iterable[str] = (),
                     label_interpolation: str = "genericLabel", storage: str = PRIOR_STORAGE, library=None,
                     t2_file=None, t2_model=None):
    """Atlas prior of a cerebellum crop: writes the 4D prior (crop grid, ``lobules`` channels, background first)
    and a JSON sidecar (default: next to it, ``.json``), both atomically; returns ``(out_file, json_file)``.

    The prior is stored as ``uint8`` with a NIfTI scale factor of about 1/255 by default (readers such as
    ``nibabel``'s ``get_fdata``/``dataobj`` get the probabilities back as floats, within 0.002; 4x smaller
    and faster to write than ``float32``); ``storage="float32"`` keeps them exactly. The sidecar holds the
    selected cases, their L1 distances, ``n``, ``d``, the SyN preset, the timings, the library path and its
    number of cases. A crop whose grid differs from the library's is refused (the error names both files).
    ``library``: an already read :class:`AtlasLibrary` of ``library_dir`` (saves reading it again).
    ``t2_file``: a T2w on the crop grid (synthetic or the subject's): the vote then weighs T1w and T2w
    differences, the atlases' T2w synthesised from their warped T1w by the T2-synthesis model
    ``t2_model`` (default: the installed one).
    """
    import nibabel as nb

    from .bids import atomic_write_json
    from .core import atlas_fusion as af
    from .core.images import load_image
    from .core.labels import load_protocol

    n = af.DEFAULT_N if n is None else int(n)
    d = af.DEFAULT_D if d is None else float(d)
    scale = af.DEFAULT_SCALE if scale is None else float(scale)
    preset = af.DEFAULT_PRESET if preset is None else preset
    t0 = time.perf_counter()
    if library is None:
        library = read_library(library_dir)
    jpath = library_json_path(library_dir)
    crop = load_image(t1w_crop_file)
    if crop.ndim != 3:
        raise InputFileError(t1w_crop_file, f"the cerebellum crop must be 3D, its shape is {tuple(crop.shape)}")
    if not _same_grid(crop, library):
        raise InputFileError(t1w_crop_file, f"its grid (shape {tuple(crop.shape)}, affine {_fmt_affine(crop.affine)}) "
                                            f"differs from the library's {jpath} (shape {tuple(library.shape)}, "
                                            f"affine {_fmt_affine(library.affine)})")
    target_t2 = t2_name = None
    synthesise = None
    if t2_file is not None:
        t2 = load_image(t2_file)
        if t2.shape != crop.shape or not np.allclose(t2.affine, crop.affine, atol=1e-3):
            raise InputFileError(t2_file, f"its grid (shape {tuple(t2.shape)}) differs from the crop's {t1w_crop_file}")
        target_t2 = np.asarray(t2.dataobj, dtype=np.float32)
        from .models.imaging import default_image_model, load_image_model
        from .models.imaging import synthesise_t2 as run_t2

        path = t2_model or default_image_model("t2synth")
        if path is None:
            raise InputFileError(t2_file, "a T2w was given to the atlas prior but no T2-synthesis model is installed "
                                          "for the atlases")
        model, manifest = load_image_model(path, "t2synth")
        t2_name = f"{manifest['name']} {manifest['version']}"
        synthesise = functools.partial(run_t2, model)
    t_load = time.perf_counter() - t0
    LOGGER.info("atlas prior of %s: library %s (%d cases), N=%d, d=%g, SyN preset %s%s", t1w_crop_file, jpath.parent,
                len(library), n, d, preset, f", T2w {t2_file}" if t2_file else "")
    result = af.atlas_prior(nb.Nifti1Image(np.asarray(crop.dataobj, dtype=np.float32), crop.affine), library, n=n,
                            d=d, scale=scale, preset=preset, random_seed=random_seed,
                            exclude_subjects=exclude_subjects, exclude_cases=exclude_cases,
                            label_interpolation=label_interpolation, target_t2=target_t2,
                            synthesise_t2=synthesise)
    t = time.perf_counter()
    out_file = save_prior(result, crop.affine, out_file, storage=storage)
    t_write = time.perf_counter() - t
    timings = dict(result.timings)
    timings["load"] = t_load
    timings["write"] = t_write
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    protocol = load_protocol(result.protocol)
    summary = {
        "Description": "Subject-specific atlas prior (DeepCERES-style): the N library cases closest to the crop "
                       "(L1 of the intensities) registered with ANTs SyN and fused by the intensity-weighted vote "
                       "w = 1 / (1 + d * |s*I - s*L|), s = intensity_scale",
        "Sources": [str(Path(t1w_crop_file).resolve())] + ([str(Path(t2_file).resolve())] if t2_file else []),
        "T2w": ({"file": str(Path(t2_file).resolve()), "atlas_t2_model": t2_name} if t2_file else None),
        "Library": str(jpath.parent.resolve()),
        "LibraryCases": len(library),
        "LabelProtocol": result.protocol,
        "LabelMap": {str(int(v)): nm for v, nm in zip(protocol.indices, protocol.names)},
        "ChannelOrder": "4th axis: one volume per label of the protocol, in its class order (background first)",
        "Storage": (f"{storage}" + (" with a NIfTI scale factor (about 1/255): read as floats" if storage == "uint8"
                                    else "")),
        **result.summary(),
    }
    json_file = sidecar_path(out_file) if json_file is None else Path(json_file)
    atomic_write_json(json_file, summary)
    LOGGER.info("atlas prior written to %s in %.1f s (%d atlases)", out_file, timings["total"], len(result.selected))
    return str(out_file), str(json_file)


def leave_subject_out_prior(library, case: str, *, n: int | None = None, **kwargs):
    """The prior of library case ``case`` from the other subjects' cases (its mirrored twin excluded too).

    For training lobule models on priors like the ones they will see. ``kwargs`` go to
    :func:`~bids_app.core.atlas_fusion.atlas_prior`. Returns its :class:`AtlasPriorResult`.
    """
    from .core import atlas_fusion as af
    from .core.images import new_image

    by_id = {c.case: c for c in library.cases}
    if case not in by_id:
        raise KeyError(f"case {case!r} is not in the library {library.path}")
    target = by_id[case]
    img = new_image(target.image, library.affine, dtype=np.float32)
    return af.atlas_prior(img, library, n=af.DEFAULT_N if n is None else n, exclude_subjects=[target.subject],
                          **kwargs)


# --------------------------------------------------------------------------- synthetic libraries
#: affine of the 128x88x88 cerebellum crop (MNI152NLin6Asym 1 mm, voxel (0,0,0) at x=63, y=-106, z=-72)
CROP_AFFINE = np.array([[-1.0, 0, 0, 63.0], [0, 1.0, 0, -106.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1.0]])
_LOBULES_PER_SIDE = 12  # lobules protocol: 1..12 lobules, 13 white matter (right side: +100)


def synthetic_case(shape=(24, 24, 24), *, seed: int = 0, deform: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A cerebellum-like phantom ``(T1w float32, lobules int16)`` on a grid of ``shape``.

    Two hemispheres (left labels 1-12 and white matter 13 on the low-x half, right 101-113),
    lobules as a fan of wedges around a point in front of the cerebellum, dark fissures between
    them, a bright white-matter core; intensities like the pipeline's (white matter about 1).
    ``seed`` draws the subject's size, position and a smooth deformation (``deform`` scales it).
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    rel = [(g - c) / (0.5 * s) for g, c, s in zip(grid, centre, shape)]  # about -1..1 along each axis
    scale = 1 + deform * rng.uniform(-0.06, 0.06, 3)
    shift = deform * rng.uniform(-0.05, 0.05, 3)
    coarse = [ndi.zoom(rng.normal(0, 1, (4, 4, 4)), np.asarray(shape) / 4, order=3)[: shape[0], : shape[1], : shape[2]]
              for _ in range(3)]
    x, y, z = ((r - t) / s + deform * 0.05 * c for r, t, s, c in zip(rel, shift, scale, coarse))
    radius = np.sqrt((x / 0.8) ** 2 + (y / 0.72) ** 2 + (z / 0.7) ** 2)
    inside = radius <= 1.0
    wm = radius <= 0.45
    theta = np.arctan2(z + 0.25, y - 0.6)  # fan of lobules around a point in front (high y), below the top
    lo, hi = np.pi / 2 - 0.1, 3 * np.pi / 2 + 0.1
    theta = np.where(theta < 0, theta + 2 * np.pi, theta)
    pos = np.clip((theta - lo) / (hi - lo), 0, 0.9999) * _LOBULES_PER_SIDE
    lobule = pos.astype(np.int16) + 1
    fissure = np.abs(pos - np.rint(pos)) < 0.06
    side = np.where(x < 0, 0, 100).astype(np.int16)
    labels = np.where(inside, np.where(wm, 13, lobule) + side, 0).astype(np.int16)
    image = np.full(shape, 0.12, dtype=np.float32)
    image[inside] = 0.62 + 0.05 * np.sin(theta[inside] * 37.0)
    image[inside & fissure & ~wm] = 0.3
    image[wm] = 1.0
    image = ndi.gaussian_filter(image, 0.6) + rng.normal(0, 0.015, shape).astype(np.float32)
    return image.astype(np.float32), labels


def mirror_labels(labels: np.ndarray) -> np.ndarray:
    """A lobules label map flipped along the first (left-right) axis, left and right labels swapped."""
    flipped = np.asarray(labels)[::-1].copy()
    out = flipped.copy()
    out[(flipped >= 1) & (flipped < 100)] += 100
    out[flipped >= 101] -= 100
    return out


def write_synthetic_library(out_dir, *, subjects: int = 3, shape=(24, 24, 24), affine=None, seed: int = 0,
                            mirrored: bool = True, deform: float = 1.0) -> Path:
    """A library folder of :func:`synthetic_case` phantoms (``subjects`` subjects, each with its
    left-right mirrored twin when ``mirrored``), in the library format; returns the folder.

    For tests and benchmarks on machines without the real library: only the format, the
    grid and the labels' protocol are those of a real library.
    """
    import nibabel as nb

    from .bids import atomic_write_json
    from .core.files import save_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(CROP_AFFINE if affine is None else affine, dtype=float)
    cases = []
    for s in range(subjects):
        image, labels = synthetic_case(shape, seed=seed * 1000 + s, deform=deform)
        versions = [(f"synth-{s:02d}", image, labels, False)]
        if mirrored:
            versions.append((f"synth-{s:02d}-mirror", image[::-1].copy(), mirror_labels(labels), True))
        for case, img, lab, mir in versions:
            save_atomic(nb.Nifti1Image(img.astype(np.float32), affine), out / f"{case}_T1w.nii.gz")
            save_atomic(nb.Nifti1Image(lab.astype(np.int16), affine), out / f"{case}_dseg.nii.gz")
            cases.append({"case": case, "subject": f"synth-{s:02d}", "mirrored": mir, "kind": "synthetic",
                          "t1w": f"{case}_T1w.nii.gz", "dseg": f"{case}_dseg.nii.gz"})
    atomic_write_json(out / LIBRARY_FILE, {
        "format": LIBRARY_FORMAT, "format_version": 2, "space": LIBRARY_SPACE, "shape": list(shape),
        "protocol": "lobules", "voxel_size_mm": float(np.sqrt((affine[:3, :3] ** 2).sum(0))[0]),
        "affine": affine.tolist(), "cases": cases, "kind": "synthetic"})
    return out
