"""Cerebellar lobule labels: tissue images for label-driven registration, constrained label fusion,
left-right mirroring and agreement with the manual vermis lobule groups.

Pure functions on arrays; the library builder (:mod:`bids_app.training.library`) strings them together.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import Protocol, load_mapping, load_protocol

#: intensities of the tissue images used to register a label map onto a subject (WM bright, as in T1w)
TISSUE_GM = 0.5
TISSUE_WM = 1.0


def tissue_image(cortex: np.ndarray, white_matter: np.ndarray, *, sigma_vox: float = 0.0) -> np.ndarray:
    """A T1w-like float32 image of the cerebellum from its cortex and white-matter masks (GM 0.5,
    WM 1.0, outside 0), optionally smoothed (against aliasing before a resampling)."""
    out = np.zeros(np.shape(cortex), dtype=np.float32)
    out[np.asarray(cortex, bool)] = TISSUE_GM
    out[np.asarray(white_matter, bool)] = TISSUE_WM
    if sigma_vox > 0:
        out = ndimage.gaussian_filter(out, sigma_vox).astype(np.float32)
    return out


def lobule_tissue(labels: np.ndarray, protocol: Protocol | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cortex and white-matter masks of a lobule label map (white matter: the ``*White-Matter`` labels)."""
    protocol = protocol or load_protocol("lobules")
    labels = np.asarray(labels)
    wm_values = [v for v, n in zip(protocol.indices, protocol.names) if n.endswith("White-Matter")]
    fg = labels > 0
    wm = np.isin(labels, wm_values)
    return fg & ~wm, wm


def vote_counts(label_maps: list[np.ndarray], values, *, sigma_vox: float = 0.0) -> np.ndarray:
    """``(K, X, Y, Z)`` float32: how many maps carry each label value at each voxel, optionally
    Gaussian-smoothed so that a voxel just outside every propagated label still gets the nearby votes."""
    shape = np.shape(label_maps[0])
    votes = np.zeros((len(values),) + tuple(shape), dtype=np.float32)
    for lab in label_maps:
        lab = np.asarray(lab)
        for k, v in enumerate(values):
            votes[k] += lab == v
    if sigma_vox > 0:
        for k in range(len(values)):
            votes[k] = ndimage.gaussian_filter(votes[k], sigma_vox)
    return votes


def constrained_fusion(votes: np.ndarray, values, allowed: dict[int, list[int]], regions: np.ndarray) -> np.ndarray:
    """Label every voxel of ``regions`` with the most voted label among those ``allowed`` for its region.

    ``regions`` is an integer image (0 = outside); ``allowed[r]`` lists the label values permitted
    in region ``r`` (e.g. the left lobules in the manual left cerebellar cortex). Ties go to the
    first allowed value. Voxels where no allowed label has a vote take the label of the nearest
    voxel of the same region that has one (so the fused map covers the region exactly). Returns
    int16 labels.
    """
    values = [int(v) for v in values]
    pos = {v: k for k, v in enumerate(values)}
    out = np.zeros(regions.shape, dtype=np.int16)
    for region, labels in allowed.items():
        inside = regions == region
        if not inside.any():
            continue
        cand = np.array([pos[int(v)] for v in labels])
        sub = votes[cand][:, inside]
        best = np.argmax(sub, axis=0)
        chosen = np.asarray(labels, dtype=np.int16)[best]
        voted = sub.max(axis=0) > 0
        if not voted.any():
            continue
        region_labels = np.zeros(regions.shape, dtype=np.int16)
        region_labels[inside] = np.where(voted, chosen, 0)
        if not voted.all():
            # nearest voted voxel of this region
            _, nearest = ndimage.distance_transform_edt(region_labels == 0, return_indices=True)
            filled = region_labels[tuple(nearest)]
            region_labels[inside] = filled[inside]
        out[inside] = region_labels[inside]
    return out


def mirror_lr(data: np.ndarray, affine: np.ndarray, *, fill=0) -> np.ndarray:
    """Mirror an image through the mid-sagittal plane x = 0 of its world space (axis-aligned grids).

    Voxel ``i`` of the output holds the input voxel whose world x is the negative of ``i``'s; voxels
    whose mirror falls outside the grid get ``fill``. Needs x along one voxel axis and integer
    mirrored positions (a grid symmetric about x = 0 up to whole voxels).
    """
    affine = np.asarray(affine, dtype=float)
    axis = int(np.argmax(np.abs(affine[0, :3])))
    if np.count_nonzero(np.abs(affine[0, :3]) > 1e-6) != 1:
        raise ValueError("mirroring needs world x along one voxel axis")
    step, origin = affine[0, axis], affine[0, 3]
    n = data.shape[axis]
    i = np.arange(n)
    j = (-(origin + step * i) - origin) / step  # voxel whose x is -x(i)
    if not np.allclose(j, np.round(j), atol=1e-3):
        raise ValueError("the grid is not symmetric about x = 0 by whole voxels")
    j = np.round(j).astype(int)
    ok = (j >= 0) & (j < n)
    out = np.full_like(data, fill)
    src = [slice(None)] * data.ndim
    dst = [slice(None)] * data.ndim
    src[axis] = j[ok]
    dst[axis] = i[ok]
    out[tuple(dst)] = data[tuple(src)]
    return out


def swap_sides(labels: np.ndarray, protocol: Protocol | None = None) -> np.ndarray:
    """Left labels become right ones and back (the protocol's ``lr_swap``), for mirrored copies."""
    protocol = protocol or load_protocol("lobules")
    swap = protocol.lr_swap()
    classes = protocol.to_classes(labels)
    return protocol.to_labels(np.asarray(swap)[classes.astype(np.int64)])


def vermis_agreement(lobules: np.ndarray, vermis: np.ndarray) -> dict[str, float]:
    """Dice of each manual vermis lobule group (630 = I-V, 631 = VI-VII, 632 = VIII-X) with the
    lobule labels folded to those groups (``lobules_to_vermisgroups``), inside the manual vermis."""
    mapping = load_mapping("lobules", "vermisgroups")
    groups = load_protocol("vermisgroups")
    lobules = np.asarray(lobules)
    vermis = np.asarray(vermis)
    inside = np.isin(vermis, [v for v in groups.indices if v])
    folded = np.zeros(lobules.shape, dtype=np.int32)
    for src, dst in mapping.table.items():
        if src and dst[0]:
            folded[lobules == src] = dst[0]
    out = {}
    for value, name in zip(groups.indices, groups.names):
        if not value:
            continue
        a = vermis == value
        b = inside & (folded == value)
        denom = a.sum() + b.sum()
        out[name] = float(2.0 * (a & b).sum() / denom) if denom else float("nan")
    return out
