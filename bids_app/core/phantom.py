"""Procedural digital head phantom (T1w and T2w) used as ArborSeg's demo dataset.

The phantom is built from smooth implicit shapes evaluated on a voxel grid in
world coordinates (millimetres, RAS+).  The default anatomy is laid out in
MNI152NLin6Asym space, so an affine registration of a rendered phantom to the
MNI152 head template converges to a sensible solution, and brain masking,
N4 bias correction and denoising behave the way they do on real heads.

Tissues (see :data:`LABELS`): scalp, skull, extra-cerebral CSF, a folded
cerebral cortex around the cerebral white matter, lateral / third / fourth
ventricles, deep grey matter (lentiform nuclei, caudate heads, thalami), an
interhemispheric fissure, a cerebellum with its own folded cortex and white
matter core below a tentorial CSF gap, and a brainstem running down to the
bottom of the field of view.

Main entry points:

* :func:`make_label_phantom` - integer tissue labels and the grid affine;
* :func:`render_contrast` - a T1w- or T2w-like image from labels, with
  texture, partial volume, a bias field and Rician noise;
* :func:`make_head_phantom` - both steps at once, as a NIfTI image;
* :func:`write_demo_dataset` - a small BIDS raw dataset of phantom subjects.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .. import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "CONTRAST_INTENSITIES",
    "LABELS",
    "make_head_phantom",
    "make_label_phantom",
    "render_contrast",
    "write_demo_dataset",
]

#: Tissue label values of the phantom.
LABELS: dict[str, int] = {
    "background": 0,
    "scalp": 1,
    "skull": 2,
    "csf": 3,
    "gm": 4,
    "wm": 5,
    "ventricles": 6,
    "cerebellum_gm": 7,
    "cerebellum_wm": 8,
    "brainstem": 9,
    "deep_gm": 10,
}

#: Nominal (noise-free, bias-free) intensity of each tissue per contrast.
CONTRAST_INTENSITIES: dict[str, dict[str, float]] = {
    "T1w": {
        "background": 0.0,
        "scalp": 0.75,
        "skull": 0.08,
        "csf": 0.15,
        "gm": 0.50,
        "wm": 0.85,
        "ventricles": 0.15,
        "cerebellum_gm": 0.52,
        "cerebellum_wm": 0.80,
        "brainstem": 0.72,
        "deep_gm": 0.62,
    },
    "T2w": {
        "background": 0.0,
        "scalp": 0.55,
        "skull": 0.05,
        "csf": 1.0,
        "gm": 0.62,
        "wm": 0.42,
        "ventricles": 1.0,
        "cerebellum_gm": 0.62,
        "cerebellum_wm": 0.45,
        "brainstem": 0.5,
        "deep_gm": 0.55,
    },
}

# Relative amplitude of the smooth within-tissue texture (multiplicative).
# Scalp and skull get much more: they stand for fat/muscle and marrow/bone mixes.
_TEXTURE_AMPLITUDE: dict[str, float] = {
    "background": 0.0,
    "scalp": 0.15,
    "skull": 0.35,
    "csf": 0.03,
    "gm": 0.03,
    "wm": 0.025,
    "ventricles": 0.02,
    "cerebellum_gm": 0.03,
    "cerebellum_wm": 0.025,
    "brainstem": 0.03,
    "deep_gm": 0.03,
}

VoxelSize = Union[float, Sequence[float]]
Vec3 = tuple[float, float, float]

# Anatomical bounding box of the head in MNI mm (generous: covers shape jitter).
# The bottom is where the field of view cuts the neck, so it gets no margin.
_HEAD_BOX_LO: Vec3 = (-92.0, -126.0, -80.0)
_HEAD_BOX_HI: Vec3 = (92.0, 92.0, 104.0)
_GRID_MARGIN_MM = 8.0
_BLOCK = 32  # edge of the cubic blocks the grid is evaluated in (voxels)

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _as_voxel_size(voxel_size: VoxelSize) -> Vec3:
    """Return ``voxel_size`` as three positive finite floats."""
    if np.isscalar(voxel_size):
        values = [float(voxel_size)] * 3  # type: ignore[arg-type]
    else:
        values = [float(v) for v in voxel_size]  # type: ignore[union-attr]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"voxel_size must be a positive number or three of them, got {voxel_size!r}")
    return (values[0], values[1], values[2])


def _as_vec3(value: Sequence[float], name: str) -> Vec3:
    """Return ``value`` as three finite floats, or raise ValueError."""
    values = [float(v) for v in value]
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be three finite numbers, got {value!r}")
    return (values[0], values[1], values[2])


def _rotation_matrix(rotation_deg: Vec3) -> np.ndarray:
    """Rotation about x, then y, then z (degrees, right-handed): ``Rz @ Ry @ Rx``."""
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sdf_ellipsoid(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    center: Sequence[float],
    radii: Sequence[float],
    *,
    pz: int = 2,
    rz_low: float | None = None,
    cylinder_below: bool = False,
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a (super)ellipsoid.

    The implicit function is ``h = sqrt(qx^2 + qy^2 + |qz|^pz)`` with ``q`` the
    offset from ``center`` divided by the radii (``pz`` = 3 flattens the poles).
    Below the centre the vertical radius is ``rz_low`` if given.  The distance
    estimate is ``(h - 1) / |grad h|``: exact on the surface and accurate
    within a few centimetres of it.  With ``cylinder_below`` the shape
    continues below its centre as an elliptic cylinder.
    """
    cx, cy, cz = (float(c) for c in center)
    rx, ry, rz = (float(r) for r in radii)
    qx = (x - cx) / rx
    qy = (y - cy) / ry
    dz = z - cz
    if cylinder_below:
        dz = np.maximum(dz, 0.0)
    rzz: float | np.ndarray = rz if rz_low is None else np.where(dz > 0, np.float32(rz), np.float32(rz_low))
    qz = dz / rzz
    if pz == 2:
        tz = qz * qz
        gz = qz / rzz
    elif pz == 3:
        aqz = np.abs(qz)
        tz = qz * qz * aqz
        gz = 1.5 * qz * aqz / rzz
    else:
        raise ValueError(f"pz must be 2 or 3, got {pz!r}")
    h = np.sqrt(qx * qx + qy * qy + tz)
    g = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2 + gz * gz)
    eps = 1e-6
    rmin = min(rx, ry, rz, rz if rz_low is None else float(rz_low))
    return (h - 1.0) * (h + eps) / (g + eps / rmin)


def _inside_ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, center: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """Boolean mask of points inside an axis-aligned ellipsoid."""
    return (
        ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((z - center[2]) / radii[2]) ** 2
    ) < 1.0


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (smooth union of two distance fields)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth maximum (smooth intersection of two distance fields)."""
    return -_smin(-a, -b, k)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random unit vectors, shape (n, 3)."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# anatomy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Shape parameters of one phantom head (MNI mm); drawn by :func:`_draw_anatomy`."""

    head_c: Vec3
    head_r: Vec3
    cer_c: Vec3
    cer_r: Vec3
    cer_rz_low: float
    frontal_floor: float
    temporal_c: Vec3  # right side; mirrored for the left
    temporal_r: Vec3
    env_waves: tuple[tuple[float, float, float, float, float], ...]  # kx, ky, kz, phase, amp
    cb_c: Vec3  # right hemisphere; mirrored for the left
    cb_r: Vec3
    vermis_c: Vec3
    vermis_r: Vec3
    cb_kappa: int
    cb_phase: float
    bs_radius: float
    pons_c: Vec3
    pons_r: Vec3
    midbrain_c: Vec3
    midbrain_r: Vec3
    csf_thickness: float
    skull_thickness: float
    scalp_thickness: float
    cortex_thickness: float
    tentorium_gap: float
    fissure_halfwidth: float
    sulcus_halfwidth: float
    sulcus_depth: float
    sulcus_depth_var: float
    gyri_center: Vec3
    gyri_dirs: tuple[Vec3, ...]
    gyri_kappa: tuple[float, ...]
    gyri_phase: tuple[float, ...]
    depth_dirs: tuple[Vec3, ...]
    depth_phase: tuple[float, ...]
    lentiform_c: Vec3
    lentiform_r: Vec3
    caudate_c: Vec3
    caudate_r: Vec3
    thalamus_c: Vec3
    thalamus_r: Vec3
    ventricle_c: Vec3
    ventricle_r: Vec3
    atrium_c: Vec3
    atrium_r: Vec3


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw the random shape variations of one head.

    Every random number is drawn here, in a fixed order and independently of
    the sampling grid, so the same seed gives the same anatomy at any voxel size.
    """

    def jit(values: Sequence[float], spread: float) -> Vec3:
        f = rng.uniform(1.0 - spread, 1.0 + spread, size=3)
        return (float(values[0] * f[0]), float(values[1] * f[1]), float(values[2] * f[2]))

    def shift(values: Sequence[float], mm: float) -> Vec3:
        d = rng.uniform(-mm, mm, size=3)
        return (float(values[0] + d[0]), float(values[1] + d[1]), float(values[2] + d[2]))

    def scalar(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    cer_r = jit((68.5, 90.5, 74.0), 0.03)
    env_dirs = _unit_vectors(rng, 3)
    env_waves = tuple(
        (
            float(d[0] * k),
            float(d[1] * k),
            float(d[2] * k),
            float(ph),
            float(amp),
        )
        for d, k, ph, amp in zip(
            env_dirs,
            rng.uniform(2 * math.pi / 110, 2 * math.pi / 60, size=3),
            rng.uniform(0, 2 * math.pi, size=3),
            rng.uniform(0.5, 1.2, size=3),
        )
    )
    n_gyri = 16
    return _Anatomy(
        head_c=shift((0.0, -17.0, -8.0), 1.0),
        head_r=jit((86.0, 103.0, 106.0), 0.03),
        cer_c=shift((0.0, -16.5, 4.0), 1.0),
        cer_r=cer_r,
        cer_rz_low=scalar(45.0, 49.0),
        frontal_floor=scalar(-31.0, -28.0),
        temporal_c=shift((41.0, -10.0, -26.0), 1.5),
        temporal_r=jit((20.0, 40.0, 21.0), 0.05),
        env_waves=env_waves,
        cb_c=shift((25.0, -62.0, -36.0), 1.0),
        cb_r=jit((30.0, 31.0, 29.0), 0.04),
        vermis_c=shift((0.0, -60.0, -30.0), 1.0),
        vermis_r=jit((11.0, 29.0, 27.0), 0.05),
        cb_kappa=int(rng.integers(22, 29)),
        cb_phase=scalar(0.0, 2 * math.pi),
        bs_radius=scalar(8.5, 10.0),
        pons_c=shift((0.0, -23.0, -29.0), 1.0),
        pons_r=jit((15.0, 13.0, 13.0), 0.05),
        midbrain_c=shift((0.0, -26.0, -10.0), 1.0),
        midbrain_r=jit((12.0, 11.0, 10.0), 0.05),
        csf_thickness=scalar(2.8, 3.2),
        skull_thickness=scalar(5.5, 6.5),
        scalp_thickness=scalar(4.5, 5.5),
        cortex_thickness=scalar(2.6, 3.0),
        tentorium_gap=scalar(2.5, 3.0),
        fissure_halfwidth=scalar(1.1, 1.4),
        sulcus_halfwidth=scalar(0.9, 1.1),
        sulcus_depth=scalar(11.0, 13.0),
        sulcus_depth_var=scalar(3.5, 4.5),
        gyri_center=(0.0, -17.0, 6.0),
        gyri_dirs=tuple(tuple(float(c) for c in v) for v in _unit_vectors(rng, n_gyri)),  # type: ignore[misc]
        gyri_kappa=tuple(float(k) for k in rng.uniform(32.0, 42.0, size=n_gyri)),
        gyri_phase=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, size=n_gyri)),
        depth_dirs=tuple(tuple(float(c) for c in v) for v in _unit_vectors(rng, 3)),  # type: ignore[misc]
        depth_phase=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, size=3)),
        lentiform_c=shift((23.0, 2.0, 0.0), 1.0),
        lentiform_r=jit((8.5, 16.0, 11.0), 0.05),
        caudate_c=shift((15.0, 11.0, 11.0), 1.0),
        caudate_r=jit((6.0, 12.0, 9.0), 0.05),
        thalamus_c=shift((12.0, -17.0, 5.0), 1.0),
        thalamus_r=jit((9.5, 14.0, 10.0), 0.05),
        ventricle_c=shift((9.5, -9.0, 15.0), 1.0),
        ventricle_r=jit((6.0, 32.0, 7.5), 0.05),
        atrium_c=shift((22.0, -40.0, 6.0), 1.0),
        atrium_r=jit((7.0, 12.0, 10.0), 0.05),
    )


def _mirror(c: Vec3) -> Vec3:
    return (-c[0], c[1], c[2])


def _cerebrum_envelope(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Signed distance of the smooth outer (pial hull) surface of the cerebrum."""
    # Above the centre the hull narrows faster in y than in x and its top sits
    # posteriorly: warp y accordingly before evaluating the superellipsoid.
    t = np.clip((z - 16.0) / 64.0, 0.0, 1.0)
    yw = a.cer_c[1] + (y - (a.cer_c[1] - 8.0 * t)) / (1.0 - 0.2 * t)
    main = _sdf_ellipsoid(x, yw, z, a.cer_c, a.cer_r, pz=3, rz_low=a.cer_rz_low)
    # floor: frontal base flat, rising behind the temporal lobes (over the cerebellum)
    floor = a.frontal_floor + 0.3 * np.maximum(-35.0 - y, 0.0)
    main = _smax(main, floor - z, 6.0)
    tr = _sdf_ellipsoid(x, y, z, a.temporal_c, a.temporal_r)
    tl = _sdf_ellipsoid(x, y, z, _mirror(a.temporal_c), a.temporal_r)
    env = _smin(_smin(main, tr, 8.0), tl, 8.0)
    for kx, ky, kz, phase, amp in a.env_waves:
        env += amp * np.sin(kx * x + ky * y + kz * z + phase)
    return env


def _cerebellum_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Signed distance of the cerebellar hull (two hemispheres and the vermis)."""
    right = _sdf_ellipsoid(x, y, z, a.cb_c, a.cb_r)
    left = _sdf_ellipsoid(x, y, z, _mirror(a.cb_c), a.cb_r)
    vermis = _sdf_ellipsoid(x, y, z, a.vermis_c, a.vermis_r)
    return _smin(_smin(right, left, 6.0), vermis, 6.0)


def _brainstem_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Signed distance of the brainstem: midbrain, pons and a medulla running down."""
    # medulla axis at (0, -28) at the pons, tilting backwards further down
    yc = -28.0 - 0.2 * np.clip(-30.0 - z, 0.0, 60.0)
    radial = np.sqrt(x * x + (y - yc) ** 2) - a.bs_radius
    column = np.maximum(radial, z + 4.0)
    pons = _sdf_ellipsoid(x, y, z, a.pons_c, a.pons_r)
    midbrain = _sdf_ellipsoid(x, y, z, a.midbrain_c, a.midbrain_r)
    return _smin(_smin(column, pons, 5.0), midbrain, 5.0)


def _fissure_allowed(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Where the interhemispheric fissure may cut (outside corpus callosum / diencephalon)."""
    above = z > 4.0
    arch = ((y + 6.0) / 38.0) ** 2 + ((z - 4.0) / 22.0) ** 2 < 1.0
    band = (y > -44.0) & (y < 32.0)
    return ~np.where(above, arch, band)


def _sulcal_distance(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, depth: np.ndarray, a: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Sulcal CSF mask and distance (mm) to the nearest sulcus, for 1-D point arrays.

    Sulci are the zero set of a smooth random field defined on directions from
    the centre of the cerebrum, so they are sheets normal to the brain surface
    reaching a (spatially varying) depth below the pial hull.
    """
    cx, cy, cz = a.gyri_center
    dx, dy, dz = x - cx, y - cy, z - cz
    rho = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    ux, uy, uz = dx / rho, dy / rho, dz / rho
    g = np.zeros_like(x)
    gx = np.zeros_like(x)
    gy = np.zeros_like(x)
    gz = np.zeros_like(x)
    amp = 1.0 / math.sqrt(len(a.gyri_dirs))
    for (vx, vy, vz), kappa, phase in zip(a.gyri_dirs, a.gyri_kappa, a.gyri_phase):
        arg = kappa * (vx * ux + vy * uy + vz * uz) + phase
        g += amp * np.sin(arg)
        c = (amp * kappa) * np.cos(arg)
        gx += c * vx
        gy += c * vy
        gz += c * vz
    # gradient w.r.t. position: tangential part of the direction gradient / rho
    gu = gx * ux + gy * uy + gz * uz
    tx, ty, tz = gx - gu * ux, gy - gu * uy, gz - gu * uz
    grad = np.sqrt(tx * tx + ty * ty + tz * tz) / rho
    sdist = np.minimum(np.abs(g) / np.maximum(grad, 1e-3), 50.0)
    # sulcal depth varies smoothly over the brain
    var = np.zeros_like(x)
    for (vx, vy, vz), phase in zip(a.depth_dirs, a.depth_phase):
        var += np.sin(4.0 * (vx * ux + vy * uy + vz * uz) + phase)
    sdepth = a.sulcus_depth + a.sulcus_depth_var * var / len(a.depth_dirs) * 1.5
    w = a.sulcus_halfwidth
    sulcus = (sdist < w) & (depth < sdepth)
    dist = np.hypot(np.maximum(sdist - w, 0.0), np.maximum(depth - sdepth, 0.0))
    return sulcus, dist


def _cerebellar_tissue(
    y: np.ndarray, z: np.ndarray, depth: np.ndarray, a: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Cerebellar fissure mask and white-matter mask for 1-D point arrays inside the hull.

    Folia are lamellae radiating (in the sagittal plane) from the cerebellar
    centre; thin CSF fissures cut between them and the white matter core sends
    branches into each folium (a crude arbor vitae).
    """
    theta = np.arctan2(z - a.cb_c[2], y - a.cb_c[1])
    lam = np.sin(a.cb_kappa * theta + a.cb_phase)
    fissure = (lam > 0.88) & (depth < 4.5)
    wm = depth > 6.0 + 5.0 * (lam + 1.0) * 0.5
    return fissure, wm


# Generous anatomical bounding boxes (MNI mm, covering the shape jitter) of the
# structures, used to skip blocks of the grid that cannot contain them.
_Box = tuple[Vec3, Vec3]
_CEREBRUM_BOX: _Box = ((-79.0, -119.0, -59.0), (79.0, 86.0, 90.0))
_CEREBELLUM_BOX: _Box = ((-60.0, -98.0, -70.0), (60.0, -25.0, 1.0))
_BRAINSTEM_BOX: _Box = ((-18.0, -54.0, -1.0e6), (18.0, -5.0, 3.0))
_DEEP_GM_BOX: _Box = ((-36.0, -38.0, -14.0), (36.0, 30.0, 25.0))
_VENTRICLE_BOX: _Box = ((-33.0, -56.0, -40.0), (33.0, 32.0, 27.0))
# beyond this distance from the brain boxes no intracranial tissue or skull can occur
_BRAIN_MARGIN_MM = 30.0


def _evaluate_labels(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Tissue labels at anatomical (MNI mm) coordinate arrays ``x, y, z``.

    All operations are point-wise, so the grid can be evaluated block by block;
    structures whose bounding box is far from the block are skipped.
    """
    L = LABELS
    labels = np.zeros(x.shape, dtype=np.uint8)
    lo = (float(x.min()), float(y.min()), float(z.min()))
    hi = (float(x.max()), float(y.max()), float(z.max()))

    def near(box: _Box, margin: float) -> bool:
        return all(lo[d] <= box[1][d] + margin and hi[d] >= box[0][d] - margin for d in range(3))

    env = _cerebrum_envelope(x, y, z, a) if near(_CEREBRUM_BOX, _BRAIN_MARGIN_MM) else None
    cb = _cerebellum_sdf(x, y, z, a) if near(_CEREBELLUM_BOX, _BRAIN_MARGIN_MM) else None
    bs = _brainstem_sdf(x, y, z, a) if near(_BRAINSTEM_BOX, _BRAIN_MARGIN_MM) else None
    brain: np.ndarray | None = None
    for part in (env, cb, bs):
        if part is not None:
            brain = part if brain is None else _smin(brain, part, 6.0)
    intracranial = None if brain is None else brain - a.csf_thickness
    del brain

    # head: scalp outside, skull (calvarium and a shell around the cranial cavity)
    head = _sdf_ellipsoid(x, y, z, a.head_c, a.head_r, cylinder_below=True)
    if intracranial is not None:
        head = np.minimum(head, intracranial - (a.skull_thickness + 4.0))
    in_head = head < 0
    if not in_head.any():
        return labels
    labels[in_head] = L["scalp"]
    skull = (head < -a.scalp_thickness) & (z > -15.0)
    if intracranial is not None:
        skull |= intracranial < a.skull_thickness
    labels[in_head & skull] = L["skull"]
    del head, in_head, skull
    if intracranial is None:
        return labels
    labels[intracranial < 0] = L["csf"]
    del intracranial

    # cerebrum: a cortex ribbon around white matter, cut by sulci and the fissure
    tissue: np.ndarray | None = None
    if env is not None:
        cerebrum = env < 0
        dist = -env
        if cb is not None:
            cerebrum &= cb > a.tentorium_gap
            dist = np.minimum(dist, cb - a.tentorium_gap)
        fissure_ok = _fissure_allowed(y, z)
        fissure_dist = np.abs(x) - a.fissure_halfwidth
        dist = np.where(fissure_ok, np.minimum(dist, fissure_dist), dist)
        tissue = cerebrum & ~(fissure_ok & (fissure_dist < 0))
        del cerebrum, fissure_ok, fissure_dist
        max_depth = a.sulcus_depth + 1.5 * a.sulcus_depth_var + a.cortex_thickness + 1.0
        shell = np.nonzero(tissue & (env > -max_depth))
        if shell[0].size:
            sulcus, sulcus_dist = _sulcal_distance(x[shell], y[shell], z[shell], -env[shell], a)
            dist[shell] = np.minimum(dist[shell], sulcus_dist)
            tissue[tuple(idx[sulcus] for idx in shell)] = False
            del sulcus, sulcus_dist
        del shell
        gm = tissue & (dist < a.cortex_thickness)
        labels[gm] = L["gm"]
        labels[tissue & ~gm] = L["wm"]
        del gm, dist

    # cerebellum: folded cortex around a branching white-matter core
    if cb is not None:
        inside = np.nonzero(cb < 0)
        if inside[0].size:
            fissure, wm = _cerebellar_tissue(y[inside], z[inside], -cb[inside], a)
            values = np.where(wm, L["cerebellum_wm"], L["cerebellum_gm"]).astype(np.uint8)
            values[fissure] = L["csf"]
            labels[inside] = values
        del inside

    # deep grey matter (within cerebral tissue only)
    if tissue is not None and near(_DEEP_GM_BOX, 0.0):
        deep = np.zeros(x.shape, dtype=bool)
        for c, r in (
            (a.lentiform_c, a.lentiform_r),
            (a.caudate_c, a.caudate_r),
            (a.thalamus_c, a.thalamus_r),
        ):
            deep |= _inside_ellipsoid(x, y, z, c, r)
            deep |= _inside_ellipsoid(x, y, z, _mirror(c), r)
        labels[deep & tissue] = L["deep_gm"]
        del deep

    if bs is not None:
        labels[bs < 0] = L["brainstem"]

    # ventricles: lateral (arched, posteriorly diverging bodies + atria), third, fourth
    if near(_VENTRICLE_BOX, 0.0):
        vx, vy, vz = a.ventricle_c
        rx, ry, rz = a.ventricle_r
        yy = y - vy
        bend = (yy * yy) / 90.0
        flare = 0.22 * np.maximum(-yy, 0.0)
        ventricles = (
            ((np.abs(x) - (vx + flare)) / rx) ** 2 + (yy / ry) ** 2 + ((z - vz + bend) / rz) ** 2
        ) < 1.0
        ventricles |= _inside_ellipsoid(x, y, z, a.atrium_c, a.atrium_r)
        ventricles |= _inside_ellipsoid(x, y, z, _mirror(a.atrium_c), a.atrium_r)
        ventricles |= _inside_ellipsoid(x, y, z, (0.0, -8.0, 2.0), (2.0, 15.0, 9.0))
        ventricles |= _inside_ellipsoid(x, y, z, (0.0, -41.0, -31.0), (6.0, 4.5, 8.0))
        labels[ventricles] = L["ventricles"]
    return labels


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def make_label_phantom(
    *,
    voxel_size: VoxelSize = 1.0,
    seed: int = 0,
    scale: float = 1.0,
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Build the tissue label volume of a procedural head.

    Parameters
    ----------
    voxel_size
        Voxel size in mm: one number (isotropic) or three (x, y, z).
    seed
        Seed of the small random shape variations (radii, cortical folding
        pattern, tissue thicknesses); the same seed gives the same anatomy.
    scale
        Isotropic size factor of the head relative to MNI152.
    rotation_deg
        Rotation of the head about the world x, y and z axes (degrees, applied
        in that order about the MNI origin, i.e. ``R = Rz @ Ry @ Rx``).
    shift_mm
        Translation of the head in mm (applied after the rotation).

    Returns
    -------
    labels, affine
        ``labels`` is a ``uint8`` array with the values of :data:`LABELS` on a
        RAS-oriented grid covering the head plus a margin (the field of view
        cuts the neck at about z = -80 mm); ``affine`` is its 4x4 voxel-to-world
        (RAS mm) matrix.  The world position of an anatomical point ``p`` is
        ``scale * R @ p + shift_mm``.
    """
    vs = _as_voxel_size(voxel_size)
    rotation = _as_vec3(rotation_deg, "rotation_deg")
    shift = np.asarray(_as_vec3(shift_mm, "shift_mm"))
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")

    anatomy = _draw_anatomy(np.random.default_rng(seed))
    rot = _rotation_matrix(rotation)
    forward = scale * rot

    # grid bounds: the anatomical head box mapped to the world, plus a margin
    corners = np.array(
        [[cx, cy, cz] for cx in (_HEAD_BOX_LO[0], _HEAD_BOX_HI[0]) for cy in (_HEAD_BOX_LO[1], _HEAD_BOX_HI[1])
         for cz in (_HEAD_BOX_LO[2], _HEAD_BOX_HI[2])]
    )
    world = corners @ forward.T + shift
    lo = world.min(axis=0) - _GRID_MARGIN_MM
    hi = world.max(axis=0) + _GRID_MARGIN_MM
    lo[2] = world[corners[:, 2] == _HEAD_BOX_LO[2], 2].min()  # the field of view cuts the neck
    affine = np.diag([vs[0], vs[1], vs[2], 1.0])
    axes = []
    for d in range(3):
        start = math.floor(lo[d] / vs[d]) * vs[d]
        n = int(math.ceil((hi[d] - start) / vs[d])) + 1
        affine[d, 3] = start
        axes.append((start + vs[d] * np.arange(n)).astype(np.float32))

    # anatomical coordinates of every voxel, p = R^T (w - shift) / scale,
    # evaluated in cache-sized blocks
    inverse = rot.T / scale
    offset = -inverse @ shift
    shape = (len(axes[0]), len(axes[1]), len(axes[2]))
    labels = np.zeros(shape, dtype=np.uint8)
    b = _BLOCK
    for i0 in range(0, shape[0], b):
        xw = axes[0][i0 : i0 + b, None, None]
        for j0 in range(0, shape[1], b):
            yw = axes[1][None, j0 : j0 + b, None]
            for k0 in range(0, shape[2], b):
                zw = axes[2][None, None, k0 : k0 + b]
                x, y, z = (
                    float(inverse[r, 0]) * xw + float(inverse[r, 1]) * yw + float(inverse[r, 2]) * zw + float(offset[r])
                    for r in range(3)
                )
                block_shape = (xw.shape[0], yw.shape[1], zw.shape[2])
                x, y, z = (np.broadcast_to(c, block_shape) for c in (x, y, z))
                labels[i0 : i0 + b, j0 : j0 + b, k0 : k0 + b] = _evaluate_labels(x, y, z, anatomy)
    return labels, affine


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], vs: Vec3, sigma_mm: float) -> np.ndarray:
    """Zero-mean, (about) unit-variance Gaussian random field, smoothed with ``sigma_mm``."""
    field = rng.standard_normal(shape, dtype=np.float32)
    field = ndi.gaussian_filter(field, sigma=[sigma_mm / v for v in vs], mode="wrap", truncate=3.0)
    step = max(1, int(round(min(shape) / 32)))  # the std of a subsample is plenty accurate
    std = float(field[::step, ::step, ::step].std())
    if std > 0:
        field *= np.float32(1.0 / std)
    return field


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Smooth multiplicative field ``1 + amplitude * f``, ``f`` a random quadratic with peak |f| = 1."""
    c = rng.normal(size=9)
    c[:3] *= 1.5  # linear terms dominate, as in real receive-coil profiles
    u, v, w = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    # f = sum of x-, y-, z-only terms and the three cross terms, built from 2-D pieces
    fu = float(c[0]) * u + float(c[3]) * (u * u - 0.5)
    fv = float(c[1]) * v + float(c[4]) * (v * v - 0.5)
    fw = float(c[2]) * w + float(c[5]) * (w * w - 0.5)
    uv = fu[:, None] + fv[None, :] + float(c[6]) * u[:, None] * v[None, :]
    uw = float(c[7]) * u[:, None] * w[None, :]
    vw = fw[None, :] + float(c[8]) * v[:, None] * w[None, :]
    field = uv[:, :, None] + uw[:, None, :]
    field += vw[None, :, :]
    peak = float(np.abs(field).max())
    if peak == 0 or amplitude == 0:
        field.fill(1.0)
        return field
    field *= np.float32(amplitude / peak)
    field += 1.0
    return field


def render_contrast(
    labels: np.ndarray,
    *,
    contrast: str,
    voxel_size: VoxelSize,
    seed: int = 0,
    noise_sigma: float = 0.03,
    bias_amplitude: float = 0.25,
    pv_fwhm_mm: float | Sequence[float] = 1.2,
) -> np.ndarray:
    """Render an MR-like image from a label volume.

    Parameters
    ----------
    labels
        Integer label volume with the values of :data:`LABELS`.
    contrast
        ``"T1w"`` or ``"T2w"``; tissue intensities follow
        :data:`CONTRAST_INTENSITIES`.
    voxel_size
        Voxel size of ``labels`` in mm (one number or three).
    seed
        Seed of the texture, bias field and noise (T1w and T2w draw
        independent streams from the same seed).
    noise_sigma
        Standard deviation of each of the real and imaginary Gaussian noise
        channels, relative to the white-matter intensity; the magnitude image
        is then Rician.  0 disables noise.
    bias_amplitude
        Peak relative deviation of the smooth multiplicative bias field
        (0 <= value < 1); 0 disables it.
    pv_fwhm_mm
        Full width at half maximum (mm, one number or per axis) of the Gaussian
        blur that models partial volume; 0 disables it.

    Returns
    -------
    numpy.ndarray
        ``float32`` image, same shape as ``labels``, WM around 0.85 (T1w).
    """
    if contrast not in CONTRAST_INTENSITIES:
        raise ValueError(f"contrast must be one of {sorted(CONTRAST_INTENSITIES)}, got {contrast!r}")
    if not 0.0 <= bias_amplitude < 1.0:
        raise ValueError(f"bias_amplitude must be in [0, 1), got {bias_amplitude!r}")
    if not noise_sigma >= 0.0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
    vs = _as_voxel_size(voxel_size)
    fwhm = np.broadcast_to(np.asarray(pv_fwhm_mm, dtype=float), (3,))
    if not np.all(np.isfinite(fwhm) & (fwhm >= 0)):
        raise ValueError(f"pv_fwhm_mm must be one or three non-negative numbers, got {pv_fwhm_mm!r}")
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 3-D integer array, got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > max(LABELS.values())):
        raise ValueError("labels contains values outside LABELS")
    shape = labels.shape

    table = CONTRAST_INTENSITIES[contrast]
    rng = np.random.default_rng([int(seed), sorted(CONTRAST_INTENSITIES).index(contrast) + 1])
    lut = np.zeros(max(LABELS.values()) + 1, dtype=np.float32)
    tex = np.zeros_like(lut)
    for name, value in LABELS.items():
        lut[value] = table[name]
        tex[value] = _TEXTURE_AMPLITUDE[name]

    # tissue intensities with a smooth within-tissue texture
    image = lut[labels]
    texture = tex[labels]
    texture *= _smooth_noise(rng, shape, vs, sigma_mm=2.0)
    texture += 1.0
    image *= texture
    del texture
    # partial volume
    if np.any(fwhm > 0):
        sigma = [float(f) * _FWHM_TO_SIGMA / v for f, v in zip(fwhm, vs)]
        image = ndi.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)
    # receive bias
    image *= _bias_field(rng, shape, float(bias_amplitude))
    # Rician noise: magnitude of the signal plus complex Gaussian noise
    if noise_sigma > 0:
        sigma_abs = np.float32(noise_sigma * table["wm"])
        real = rng.standard_normal(shape, dtype=np.float32)
        real *= sigma_abs
        real += image
        image = rng.standard_normal(shape, dtype=np.float32)
        image *= sigma_abs
        np.hypot(real, image, out=image)
    return np.asarray(image, dtype=np.float32)


def _scaled_0_1000(image: np.ndarray) -> np.ndarray:
    """``image`` clipped at 0 and scaled so that its maximum is 1000 (float32)."""
    image = np.clip(image, 0.0, None)
    peak = float(image.max())
    return (image * (1000.0 / peak) if peak > 0 else image).astype(np.float32)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with scanner-anatomical qform/sform and mm units."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(data.dtype)
    return img


def make_head_phantom(
    *,
    contrast: str = "T1w",
    voxel_size: VoxelSize = 1.0,
    seed: int = 0,
    **geometry: Any,
) -> nib.Nifti1Image:
    """Make a phantom head image in one call.

    Parameters
    ----------
    contrast
        ``"T1w"`` or ``"T2w"``.
    voxel_size
        Voxel size in mm (one number or three).
    seed
        Seed of the anatomy and of the rendering.
    **geometry
        ``scale``, ``rotation_deg`` and/or ``shift_mm``, passed to
        :func:`make_label_phantom`.

    Returns
    -------
    nibabel.Nifti1Image
        ``float32`` image on a RAS grid, intensities scaled to 0..1000.
    """
    labels, affine = make_label_phantom(voxel_size=voxel_size, seed=seed, **geometry)
    image = render_contrast(labels, contrast=contrast, voxel_size=voxel_size, seed=seed)
    return _nifti(_scaled_0_1000(image), affine)


def _sidecar(contrast: str, voxel_size: Vec3, params: dict[str, Any]) -> dict[str, Any]:
    """BIDS JSON sidecar of one phantom image."""
    common: dict[str, Any] = {
        "Manufacturer": "ArborSeg phantom",
        "ManufacturersModelName": "procedural digital head phantom",
        "MagneticFieldStrength": 3,
        "MRAcquisitionType": "3D",
        "SliceThickness": voxel_size[2],
    }
    if contrast == "T1w":
        common.update(
            {
                "PulseSequenceType": "MPRAGE",
                "RepetitionTime": 2.3,
                "EchoTime": 0.00226,
                "InversionTime": 0.9,
                "FlipAngle": 8,
            }
        )
    else:
        common.update(
            {
                "PulseSequenceType": "3D turbo spin echo",
                "RepetitionTime": 3.2,
                "EchoTime": 0.409,
                "FlipAngle": 120,
            }
        )
    common["PhantomParameters"] = params
    return common


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


_README = """\
ArborSeg phantom demo
=====================

Synthetic BIDS dataset written by ArborSeg (bids_app.core.phantom).  Each
subject is a procedural digital head phantom (T1w and T2w contrast) in
roughly MNI152 position, with a per-subject size, pose and shape variation.
The files deliberately differ in orientation, data type and voxel size so that
the app's input conforming is exercised.  No human data are included.
"""


def write_demo_dataset(
    dest: str | Path,
    *,
    n_subjects: int = 2,
    voxel_size: VoxelSize = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a small BIDS raw dataset of phantom subjects.

    Each subject has its own anatomy seed, a size within +-6 % of MNI152, a
    rotation of up to 4 degrees about each axis and a shift of up to 4 mm per
    axis (recorded as ``PhantomParameters`` in the JSON sidecars).  The T1w and
    T2w of a subject share one anatomy.  Intensities are integers in 0..1000.
    To exercise input conforming, ``sub-phantom01`` is stored RAS as float32,
    ``sub-phantom02`` in LAS orientation as int16, the T1w of
    ``sub-phantom03`` (if requested) with voxels ``(v, v, 2.5 v)`` as uint16;
    further subjects are stored like the first.

    Parameters
    ----------
    dest
        Dataset root directory (created if needed).
    n_subjects
        Number of subjects, 1 to 99.
    voxel_size
        Base voxel size in mm (one number or three).
    seed
        Seed of the whole dataset (subject poses, anatomy, noise).
    overwrite
        Allow writing into an existing non-empty directory; the files this
        function writes are replaced, other files are left alone.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    FileExistsError
        If ``dest`` is a non-empty directory (or a file) and ``overwrite`` is False.
    """
    dest = Path(dest)
    if not 1 <= int(n_subjects) <= 99:
        raise ValueError(f"n_subjects must be between 1 and 99, got {n_subjects!r}")
    vs = _as_voxel_size(voxel_size)
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a directory")
        if not overwrite and any(dest.iterdir()):
            raise FileExistsError(f"{dest} exists and is not empty (pass overwrite=True to write into it)")
    dest.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    _write_json(
        dest / "dataset_description.json",
        {
            "Name": "ArborSeg phantom demo",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["ArborSeg"],
            "GeneratedBy": [{"Name": "arborseg-phantom", "Version": __version__}],
        },
    )
    (dest / "README").write_text(_README, encoding="utf-8")
    _write_json(
        dest / "participants.json",
        {
            "participant_id": {"Description": "Phantom subject identifier"},
            "age": {"Description": "Made-up age of the phantom", "Units": "year"},
            "sex": {"Description": "Made-up sex of the phantom", "Levels": {"F": "female", "M": "male"}},
        },
    )

    rows = ["participant_id\tage\tsex"]
    for index in range(1, int(n_subjects) + 1):
        sub = f"sub-phantom{index:02d}"
        subject_seed = int(rng.integers(0, 2**31 - 1))
        params: dict[str, Any] = {
            "seed": subject_seed,
            "scale": round(float(rng.uniform(0.94, 1.06)), 4),
            "rotation_deg": [round(float(r), 3) for r in rng.uniform(-4.0, 4.0, size=3)],
            "shift_mm": [round(float(s), 3) for s in rng.uniform(-4.0, 4.0, size=3)],
        }
        age = int(rng.integers(20, 76))
        rows.append(f"{sub}\t{age}\t{'F' if index % 2 else 'M'}")
        geometry = {k: params[k] for k in ("scale", "rotation_deg", "shift_mm")}

        anat = dest / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        labels, affine = make_label_phantom(voxel_size=vs, seed=subject_seed, **geometry)
        t1_voxels = vs
        t1_labels, t1_affine = labels, affine
        if index == 3:
            t1_voxels = (vs[0], vs[1], 2.5 * vs[2])
            t1_labels, t1_affine = make_label_phantom(voxel_size=t1_voxels, seed=subject_seed, **geometry)

        for contrast, lab, aff, voxels in (
            ("T1w", t1_labels, t1_affine, t1_voxels),
            ("T2w", labels, affine, vs),
        ):
            fwhm = tuple(max(1.2, 0.8 * v) for v in voxels)  # thick slices average more tissue
            image = _scaled_0_1000(
                render_contrast(lab, contrast=contrast, voxel_size=voxels, seed=subject_seed, pv_fwhm_mm=fwhm)
            )
            # integer intensities, as scanners write them (also compresses far better)
            image = np.round(image, out=image)
            if index == 2:  # LAS orientation: flip the first axis, fix the affine, int16
                image = image[::-1].astype(np.int16)
                flip = np.eye(4)
                flip[0, 0] = -1.0
                flip[0, 3] = lab.shape[0] - 1
                aff = aff @ flip
            elif index == 3 and contrast == "T1w":  # anisotropic voxels, uint16
                image = image.astype(np.uint16)
            stem = anat / f"{sub}_{contrast}"
            nib.save(_nifti(image, aff), str(stem) + ".nii.gz")
            _write_json(Path(str(stem) + ".json"), _sidecar(contrast, voxels, params))
        logger.info(
            "Wrote phantom %s (seed %d, scale %.3f, rotation %s deg, shift %s mm) to %s",
            sub,
            subject_seed,
            params["scale"],
            params["rotation_deg"],
            params["shift_mm"],
            anat,
        )
    (dest / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return dest
