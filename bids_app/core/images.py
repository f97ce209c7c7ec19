"""Loading, validating and converting anatomical images.

Everything here works on ``nibabel`` images and numpy arrays. Problems with an input become an
:class:`~bids_app.errors.InputFileError` naming the file and the problem in one line.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputFileError

LOGGER = logging.getLogger(__name__)

#: Voxel sizes (mm) outside this range are refused; inside it but outside 0.5-6 mm give a warning.
HARD_VOXEL_RANGE = (0.1, 12.0)
SOFT_VOXEL_RANGE = (0.5, 6.0)
#: A head needs at least this extent (mm) along every axis.
MIN_EXTENT_MM = 40.0


def load_image(path: str | Path):
    """Read a NIfTI/MGH file fully, turning every way it can be broken into one clear error."""
    import nibabel as nb
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file does not exist (or is a broken link)")
    if path.is_dir():
        raise InputFileError(path, "is a directory, expected an image file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror})") from None
    try:
        img = nb.load(str(path))
    except ImageFileError as exc:
        raise InputFileError(path, f"not a readable NIfTI/MGH image ({exc})") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputFileError(path, f"corrupt image header ({exc})") from None
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error) as exc:
        raise InputFileError(path, f"truncated or corrupt image data ({exc})") from None
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"image data cannot be read, the file may be truncated ({exc})") from None
    return img.__class__(data, img.affine, img.header)


def validate_anatomical(img, path: str | Path) -> tuple[object, list[str]]:
    """Check an anatomical image and return ``(3D float32 Nifti1Image, warnings)``.

    Refused: fewer than 3 dimensions or a singleton spatial axis (2D), more than one volume in a
    5D+ image, complex/RGB data, NaN or Inf voxels, an all-zero or constant image, an invalid
    affine, voxel sizes outside :data:`HARD_VOXEL_RANGE`, a field of view smaller than a head.
    A 4D image with several volumes: the first volume is used and a warning says so.
    """
    import nibabel as nb

    warnings: list[str] = []
    data = np.asanyarray(img.dataobj)
    if data.dtype.fields is not None:
        raise InputFileError(path, f"RGB/structured voxel type {data.dtype} is not an anatomical image")
    if np.iscomplexobj(data):
        raise InputFileError(path, "complex-valued voxels; a magnitude image is needed")
    shape = data.shape
    if data.ndim < 3 or min(shape[:3]) < 2:
        raise InputFileError(path, f"2D image (shape {tuple(shape)}); a 3D volume is needed")
    if data.ndim > 3:
        extra = shape[3:]
        if int(np.prod(extra)) == 1:
            data = data.reshape(shape[:3])
        elif data.ndim == 4:
            warnings.append(f"{Path(path).name}: 4D image with {shape[3]} volumes; using the first volume (index 0)")
            data = data[..., 0]
        else:
            raise InputFileError(path, f"{data.ndim}D image (shape {tuple(shape)}); expected one 3D volume")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputFileError(path, "invalid (singular or non-finite) orientation matrix in the header")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < HARD_VOXEL_RANGE[0]) or np.any(zooms > HARD_VOXEL_RANGE[1]):
        raise InputFileError(
            path, f"voxel size {tuple(np.round(zooms, 3))} mm is outside {HARD_VOXEL_RANGE[0]}-{HARD_VOXEL_RANGE[1]} mm"
        )
    if np.any(zooms < SOFT_VOXEL_RANGE[0]) or np.any(zooms > SOFT_VOXEL_RANGE[1]):
        warnings.append(
            f"{Path(path).name}: voxel size {tuple(np.round(zooms, 2))} mm is outside the tested range "
            f"{SOFT_VOXEL_RANGE[0]}-{SOFT_VOXEL_RANGE[1]} mm"
        )
    extent = zooms * np.array(data.shape[:3])
    if np.any(extent < MIN_EXTENT_MM):
        raise InputFileError(
            path, f"field of view {tuple(np.round(extent, 1))} mm is too small for a head (min {MIN_EXTENT_MM} mm per axis)"
        )
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputFileError(path, f"{bad} voxels are NaN or Inf")
    vmin, vmax = float(data.min()), float(data.max())
    if vmax == vmin:
        what = "all voxels are zero" if vmax == 0 else f"all voxels have the same value ({vmax:g})"
        raise InputFileError(path, f"{what}; the image is empty")
    if vmin < 0:
        warnings.append(f"{Path(path).name}: negative intensities (min {vmin:g}); they are kept")
    out = nb.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    return out, warnings


def load_anatomical(path: str | Path) -> tuple[object, list[str]]:
    """:func:`load_image` then :func:`validate_anatomical`."""
    return validate_anatomical(load_image(path), path)


def describe_image(path: str | Path) -> dict:
    """A small summary for reports (shape, voxel size, orientation, datatype), from the header only."""
    import nibabel as nb

    img = nb.load(str(path))
    zooms = [round(float(z), 3) for z in img.header.get_zooms()[:3]]
    return {
        "shape": [int(s) for s in img.shape],
        "voxel_size": zooms,
        "orientation": "".join(nb.aff2axcodes(img.affine)),
        "datatype": str(img.get_data_dtype()),
    }


# --------------------------------------------------------------------------- ANTs bridge
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def to_ants(img):
    """A nibabel image as an ``ants.ANTsImage`` (float32), without going through a file."""
    import ants

    affine = np.asarray(img.affine, dtype=float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = _RAS_TO_LPS @ (affine[:3, :3] / spacing)
    origin = _RAS_TO_LPS @ affine[:3, 3]
    data = np.ascontiguousarray(np.asanyarray(img.dataobj), dtype=np.float32)
    return ants.from_numpy(data, origin=tuple(origin), spacing=tuple(spacing), direction=direction)


def from_ants(aimg, dtype=np.float32):
    """An ``ants.ANTsImage`` as a ``nibabel.Nifti1Image`` (RAS+ affine)."""
    import nibabel as nb

    spacing = np.asarray(aimg.spacing, dtype=float)
    direction = np.asarray(aimg.direction, dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ direction * spacing
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(aimg.origin, dtype=float)
    out = nb.Nifti1Image(np.asarray(aimg.numpy(), dtype=dtype), affine)
    out.header.set_xyzt_units("mm")
    return out


def new_image(data, affine, dtype=None):
    """A ``Nifti1Image`` (units mm) from an array and a 4x4 affine."""
    import nibabel as nb

    data = np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)
    out = nb.Nifti1Image(data, np.asarray(affine, dtype=float))
    out.header.set_xyzt_units("mm")
    return out


def like(img, data, dtype=None):
    """A new Nifti1Image with ``img``'s grid and ``data``."""
    return new_image(data, img.affine, dtype=dtype)


def zooms_of(img) -> np.ndarray:
    return np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
