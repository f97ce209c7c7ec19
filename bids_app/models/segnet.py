"""SegNet (de Brebisson & Montana): a per-voxel, multi-pathway network for whole-brain labelling.

Each voxel is classified from (paper section 3.1, MICCAI sizes as defaults):

* a 3D patch of ``patch_3d**3`` intensities (13^3),
* three orthogonal 2D patches of ``patch_2d**2`` (29^2), one per plane through the voxel,
* three orthogonal "compressed" 2D patches: a ``compressed_size * compressed_scale`` square
  (87^2) averaged over ``compressed_scale``-wide squares (3x3) down to ``compressed_size**2``
  (29^2),
* the distances from the voxel to the centroids of the ``n_centroids`` regions (134).

Pathways (the final MICCAI network of the paper, figure 1; 7 layers):

* orthogonal patches: 2DconvPool(20 maps, 5x5, max-pool 2) whose weights are **shared by the
  three orientations** (one module applied three times), then a per-orientation
  2DconvPool(50, 5x5, pool 2): 29 -> 25 -> 12 -> 8 -> 4, i.e. 50*4*4 = 800 features per plane;
* compressed patches: the same structure with its own weights (shared first layer);
* 3D patch: two fully connected layers of 1000 ReLUs on the flattened patch (the text speaks of
  3DconvPool blocks in general, but the final network's parameter count is met exactly with
  these two layers, see below);
* centroid distances: passed through (Gaussian noise during training only);
* merge (concatenation, 5934 features) -> FullyCon 3000 -> FullyCon 3000 -> n_classes logits
  (softmax is left to the loss / the predictor).

With these sizes the network has 30,563,475 distinct parameters; the paper reports 30,565,555,
which is exactly this count with the two shared first layers (520 parameters each) counted
once per orientation (3 times instead of once): the same architecture.

The paper shares only the first 2DconvPool layer across orientations (section 3.2, "in the
lowest layer"); ``shared_layers=2`` shares the whole 2D pathway (one module for all three
orientations), ``shared_layers=0`` shares nothing.

Conventions:

* Coordinates are integer voxel indices ``(i, j, k)`` on the array axes of the (conformed,
  1 mm isotropic) grid; centroids are in the same (fractional) voxel units, and distances are
  Euclidean distances in voxels (= mm on the conformed grid).  The network scales them by
  ``distance_scale`` (1/100 by default) internally, so callers always pass voxel units.
* Orthogonal patch ``k`` (k = 0, 1, 2) lies in the plane where axis ``k`` is fixed; its two
  patch axes are the remaining volume axes in increasing order.
* Outside the volume intensities are 0 (zero padding).
* Class 0 is the background; the centroid of the region labelled ``l`` (l = 1..n_centroids)
  is the ``l-1``-th entry of the centroid vector.

Deviations from the paper (and why):

* Dropout (``nn.Dropout``, default 0.2) after each hidden fully connected layer, for MC-dropout;
  the paper uses none.
* Two-stage inference with a single network: stage 1 gives the centroid pathway the neutral
  value 0 (all distances 0), stage 2 the distances to the centroids estimated from stage 1's
  labels.  The paper instead trains a separate sub-network without the centroid pathway for
  stage 1; that is supported too (build a ``SegNet`` with ``n_centroids=0`` and pass it as
  ``stage1_net`` to :meth:`SegNet.predict_volume`).  For the single-network scheme, the
  network blanks the whole centroid vector of a sample with probability ``centroid_blank``
  during training, so it learns the stage-1 input as well.
* The paper's rescaling of distances by the mean inter-centroid distance is not applied:
  inputs live on the conformed 1 mm grid, where distances in mm are comparable between
  subjects, and brain size is part of what is being measured.
* The Gaussian noise std of the centroid corruption is not given in the paper;
  ``centroid_noise_std`` defaults to 5 voxels (mm).
* Regions absent from the stage-1 labels get the neutral distance 0 in stage 2.

Whole-volume inference (:meth:`SegNet.predict_volume`) never loops over voxels in Python.  The
per-voxel cost at the paper's sizes is dominated by the fully connected layers
(5934 -> 3000 -> 3000 -> 135, plus 2197 -> 1000 -> 1000 for the 3D patch: ~30 M multiply-adds
per voxel and pass, which no reorganisation can share between voxels).  The convolutional 2D
pathways, which would cost another ~12 M multiply-adds per voxel on extracted patches (and run
far below peak speed on 29x29 inputs), are instead evaluated densely: dilated convolutions and
stride-1 dilated max-pooling over whole planes of thin slabs (:class:`DenseOrthoFeatures`),
from which each voxel's 4x4 feature taps are gathered; this is exact, not an approximation.
Measured on a 2-core Xeon (Sapphire Rapids, shared VM: +-30 % run to run) for a 160x192x160
volume with a 1.52 M-voxel ellipsoidal mask, both passes, random weights, ``batch_size=2048``,
``slab=16``: 13 min in float32 (87 % fully connected layers, 7 % dense 2D maps, 5 % gathering)
and 9 min with ``autocast=True`` (bfloat16 on AMX; 55 % fully connected layers, 25 %
gathering, 16 % dense 2D maps); peak memory 5 GB, of which 2.6 GB is the (135, D, H, W) float32
result.  Extracting every patch instead (``dense=False``) costs ~2.5 ms per voxel and pass in
float32, i.e. about two hours.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet

logger = logging.getLogger(__name__)

#: order of the pathway inputs when a tuple is given to ``forward``
INPUT_KEYS = ("patch3d", "ortho", "compressed", "centroids")


# --------------------------------------------------------------------------- patch extraction


def _check_odd(name: str, value: int) -> None:
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd number (patches are centred on a voxel), got {value}")


def _check_patch_sizes(patch_3d: int, patch_2d: int, compressed_size: int, compressed_scale: int) -> None:
    """Every patch size and the compression factor must be odd (centred on the voxel)."""
    for name, value in (("patch_3d", patch_3d), ("patch_2d", patch_2d), ("compressed_size", compressed_size),
                        ("compressed_scale", compressed_scale)):
        _check_odd(name, value)


def _as_channels(volume: torch.Tensor) -> torch.Tensor:
    if volume.dim() == 3:
        return volume.unsqueeze(0)
    if volume.dim() == 4:
        return volume
    raise ValueError(f"volume must be (D, H, W) or (C, D, H, W), got shape {tuple(volume.shape)}")


def _row_grid(spans: Sequence[Sequence[int]], strides: Sequence[int], device) -> tuple[torch.Tensor, int, int]:
    """Describe a patch (offsets ``spans[a]`` along each axis a, C order) as rows along its last
    axis with more than one offset: ``(row_offsets (R,), element_stride, row_length)``."""
    run = max(a for a in range(3) if len(spans[a]) > 1) if any(len(sp) > 1 for sp in spans) else 2
    run_span = list(spans[run])
    step = run_span[1] - run_span[0] if len(run_span) > 1 else 1
    row_spans = [list(spans[a]) if a != run else [run_span[0]] for a in range(3)]
    grids = torch.meshgrid(*[torch.as_tensor(sp, dtype=torch.long, device=device) for sp in row_spans], indexing="ij")
    rows = sum(g * st for g, st in zip(grids, strides)).reshape(-1)
    return rows, step * strides[run], len(run_span)


def _gather_rows(flat: torch.Tensor, base: torch.Tensor, grid: tuple[torch.Tensor, int, int]) -> torch.Tensor:
    """Values (N, C, R * length) of the patch ``grid`` (from :func:`_row_grid`) at flat indices
    ``base`` of ``flat`` (C, L): one ``index_select`` of whole rows per channel."""
    rows, stride, length = grid
    starts = (base[:, None] + rows[None, :]).reshape(-1)
    n_rows = flat.shape[1] - (length - 1) * stride
    out = [
        flat[ch].as_strided((n_rows, length), (1, stride)).index_select(0, starts).reshape(base.shape[0], -1)
        for ch in range(flat.shape[0])
    ]
    return torch.stack(out, dim=1)


class PatchExtractor:
    """Vectorised SegNet patch extraction from one volume, for many voxels at once.

    The volume is zero-padded once and the three in-plane averaged volumes (for the compressed
    patches) are computed once with ``avg_pool3d`` (stride 1).  Every call then gathers the
    patches of a whole batch of voxels with one ``index_select`` per input and channel over
    precomputed offset grids, copying whole patch rows (no Python loop over voxels).
    """

    def __init__(
        self,
        volume: torch.Tensor,
        patch_3d: int = 13,
        patch_2d: int = 29,
        compressed_size: int = 29,
        compressed_scale: int = 3,
    ):
        _check_patch_sizes(patch_3d, patch_2d, compressed_size, compressed_scale)
        vol = _as_channels(volume).float()
        self.shape = tuple(vol.shape[1:])
        self.n_channels = vol.shape[0]
        self.patch_3d, self.patch_2d = patch_3d, patch_2d
        self.compressed_size, self.compressed_scale = compressed_size, compressed_scale
        s, c = compressed_scale, compressed_size
        self._comp_radius = (c * s) // 2
        self.pad = max(patch_3d // 2, patch_2d // 2, self._comp_radius)
        device = vol.device
        padded = F.pad(vol, (self.pad,) * 6)
        self.padded = padded  # (C, D+2p, H+2p, W+2p), zero padded
        self._padded = padded.reshape(self.n_channels, -1)
        padded_shape = padded.shape[1:]
        self._strides = (padded_shape[1] * padded_shape[2], padded_shape[2], 1)

        r3, r2 = patch_3d // 2, patch_2d // 2
        span3 = range(-r3, r3 + 1)
        span2 = range(-r2, r2 + 1)
        self._grid3d = _row_grid((span3, span3, span3), self._strides, device)
        self._grid2d = [_row_grid([[0] if a == k else span2 for a in range(3)], self._strides, device) for k in range(3)]
        # compressed: per orientation k, average over s x s squares in the two other axes
        # (stride 1, so every voxel's grid of squares can be gathered), then take every s-th
        # square starting at the corner of the (c*s)^2 region centred on the voxel.
        self.pooled = []  # per orientation k: (C, ...) in-plane s x s means, index = square corner
        self._pooled = []
        self._pooled_strides = []
        self._gridcomp = []
        starts = [-self._comp_radius + s * u for u in range(c)]
        for k in range(3):
            kernel = tuple(1 if a == k else s for a in range(3))
            pooled = F.avg_pool3d(padded.unsqueeze(0), kernel, stride=1).squeeze(0)
            shape = pooled.shape[1:]
            strides = (shape[1] * shape[2], shape[2], 1)
            self.pooled.append(pooled)
            self._pooled.append(pooled.reshape(self.n_channels, -1))
            self._pooled_strides.append(strides)
            self._gridcomp.append(_row_grid([[0] if a == k else starts for a in range(3)], strides, device))

    def _base(self, coords: torch.Tensor, strides: Sequence[int]) -> torch.Tensor:
        shifted = coords + self.pad
        return shifted[:, 0] * strides[0] + shifted[:, 1] * strides[1] + shifted[:, 2] * strides[2]

    def _coords(self, coords: torch.Tensor) -> torch.Tensor:
        coords = torch.as_tensor(coords, device=self._padded.device).long().reshape(-1, 3)
        if coords.numel() and (
            (coords < 0).any() or (coords >= torch.tensor(self.shape, device=coords.device)).any()
        ):
            raise ValueError("coordinates outside the volume")
        return coords

    def patch3d(self, coords: torch.Tensor) -> torch.Tensor:
        """3D patches (N, C, a, a, a) of the voxels ``coords`` ((N, 3) voxel indices)."""
        coords = self._coords(coords)
        a = self.patch_3d
        vals = _gather_rows(self._padded, self._base(coords, self._strides), self._grid3d)
        return vals.reshape(coords.shape[0], self.n_channels, a, a, a)

    def ortho(self, coords: torch.Tensor) -> torch.Tensor:
        """Orthogonal 2D patches (N, 3, C, b, b); patch k lies in the plane where axis k is fixed,
        its axes are the two other volume axes in increasing order."""
        coords = self._coords(coords)
        b = self.patch_2d
        base = self._base(coords, self._strides)
        vals = torch.stack([_gather_rows(self._padded, base, grid) for grid in self._grid2d], dim=1)
        return vals.reshape(coords.shape[0], 3, self.n_channels, b, b)

    def compressed(self, coords: torch.Tensor) -> torch.Tensor:
        """Compressed orthogonal patches (N, 3, C, c, c): means of s x s squares over (c*s)^2."""
        coords = self._coords(coords)
        c = self.compressed_size
        vals = torch.stack(
            [
                _gather_rows(pooled, self._base(coords, strides), grid)
                for pooled, strides, grid in zip(self._pooled, self._pooled_strides, self._gridcomp)
            ],
            dim=1,
        )
        return vals.reshape(coords.shape[0], 3, self.n_channels, c, c)

    def __call__(self, coords: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patches of the voxels ``coords`` ((N, 3) integer voxel indices inside the volume).

        Returns ``{"patch3d": (N, C, a, a, a), "ortho": (N, 3, C, b, b),
        "compressed": (N, 3, C, c, c)}``.
        """
        coords = self._coords(coords)
        return {"patch3d": self.patch3d(coords), "ortho": self.ortho(coords), "compressed": self.compressed(coords)}


def extract_patches(
    volume: torch.Tensor,
    coords: torch.Tensor,
    patch_3d: int = 13,
    patch_2d: int = 29,
    compressed_size: int = 29,
    compressed_scale: int = 3,
) -> dict[str, torch.Tensor]:
    """All SegNet intensity inputs of the voxels ``coords`` of ``volume`` ((D,H,W) or (C,D,H,W)).

    Vectorised (see :class:`PatchExtractor`; build one extractor to reuse it across batches).
    """
    return PatchExtractor(volume, patch_3d, patch_2d, compressed_size, compressed_scale)(coords)


def centroid_distances(coords: torch.Tensor, centroids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances (voxel units) from each voxel ``coords`` (N, 3) to each centroid (R, 3).

    Returns (N, R).  Where ``valid`` (R,) is False (region absent, centroid unknown) the distance
    is the neutral value 0, the value stage 1 uses for every region.
    """
    coords = torch.as_tensor(coords).float().reshape(-1, 3)
    centroids = torch.as_tensor(centroids, device=coords.device).float().reshape(-1, 3)
    dist = torch.cdist(coords.unsqueeze(0), centroids.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
    if valid is not None:
        dist = dist * torch.as_tensor(valid, device=dist.device).to(dist.dtype)[None, :]
    return dist


def estimate_centroids(coords: torch.Tensor, labels: torch.Tensor, n_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (voxel units) of regions 1..n_regions from the labels of the voxels ``coords``.

    Returns ``(centroids (n_regions, 3), present (n_regions,) bool)``; absent regions get the
    centroid (0, 0, 0) and ``present`` False.  Label 0 (background) and labels above
    ``n_regions`` are ignored.
    """
    coords = torch.as_tensor(coords).reshape(-1, 3).double()
    labels = torch.as_tensor(labels, device=coords.device).reshape(-1).long()
    keep = (labels >= 1) & (labels <= n_regions)
    index = labels[keep] - 1
    sums = torch.zeros(n_regions, 3, dtype=torch.float64, device=coords.device).index_add_(0, index, coords[keep])
    counts = torch.bincount(index, minlength=n_regions).to(torch.float64)
    present = counts > 0
    centroids = sums / counts.clamp(min=1)[:, None]
    return centroids.float(), present


# --------------------------------------------------------------------------- network


class CentroidInput(nn.Module):
    """Centroid-distance pathway: in training mode, Gaussian noise (paper 3.4) and blanking of
    the whole vector (stage-1 input) with probability ``blank``; identity in eval mode.  Then
    scaling by ``scale``.  Not a dropout module: MC-dropout never switches it on."""

    def __init__(self, noise_std: float, blank: float, scale: float):
        super().__init__()
        self.noise_std, self.blank, self.scale = float(noise_std), float(blank), float(scale)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.noise_std > 0:
                d = d + self.noise_std * torch.randn_like(d)
            if self.blank > 0:
                keep = (torch.rand(d.shape[0], 1, device=d.device) >= self.blank).to(d.dtype)
                d = d * keep
        return d * self.scale


def _conv_pool(in_ch: int, out_ch: int, kernel: int, pool: int) -> nn.Sequential:
    """The paper's 2DconvPool: valid convolution, ReLU, non-overlapping max-pooling."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel), nn.ReLU(inplace=True), nn.MaxPool2d(pool))


class OrthogonalPathway(nn.Module):
    """2DconvPool stack for the three orthogonal patches of one kind.

    The first ``shared_layers`` layers are ONE module applied to the three orientations (weight
    sharing, paper 3.2); the remaining layers have one copy per orientation.
    """

    def __init__(self, in_channels: int, size: int, channels: Sequence[int], kernel: int, pool: int, shared_layers: int):
        super().__init__()
        if not 0 <= shared_layers <= len(channels):
            raise ValueError(f"shared_layers must be in [0, {len(channels)}], got {shared_layers}")
        widths = [in_channels, *channels]
        self.in_size, self.kernel, self.pool = size, kernel, pool
        for _ in channels:
            size = (size - kernel + 1) // pool
            if size < 1:
                raise ValueError("orthogonal patch too small for the convolution/pooling layers")
        self.out_size, self.out_channels, self.n_layers = size, widths[-1], len(channels)
        self.out_features = 3 * widths[-1] * size * size
        self.shared = nn.Sequential(*[_conv_pool(widths[i], widths[i + 1], kernel, pool) for i in range(shared_layers)])
        self.per_orientation = nn.ModuleList(
            nn.Sequential(*[_conv_pool(widths[i], widths[i + 1], kernel, pool) for i in range(shared_layers, len(channels))])
            for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.shared(x.reshape(n * 3, *x.shape[2:]))
        h = h.reshape(n, 3, *h.shape[1:])
        return torch.cat([path(h[:, k]).reshape(n, -1) for k, path in enumerate(self.per_orientation)], dim=1)

    def dense(self, planes: torch.Tensor, orientation: int, spacing: int = 1) -> torch.Tensor:
        """The pathway of ``orientation`` evaluated densely over whole planes.

        ``planes``: (P, C, L1, L2) images whose patch samples are ``spacing`` pixels apart
        (1 for the orthogonal patches, s for the compressed ones, on the s x s mean image).
        Returns maps (P, out_channels, O1, O2) such that the pathway output of the patch whose
        first sample is at pixel ``q`` is ``maps[..., q + G*i, q' + G*j]`` (i, j < out_size,
        ``G = spacing * pool**n_layers``): each convolution becomes a dilated convolution and
        each max-pooling a stride-1 dilated max over the whole plane (no per-voxel work).
        """
        dilation = spacing
        x = planes
        for layer in [*self.shared, *self.per_orientation[orientation]]:
            conv = layer[0]
            x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation).relu_()
            x = _dilated_max(x, self.pool, dilation)
            dilation *= self.pool
        return x


def _dilated_max(x: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
    """Stride-1 max over ``kernel x kernel`` taps ``dilation`` apart on the last two axes (valid)."""
    reach = dilation * (kernel - 1)
    n1, n2 = x.shape[-2] - reach, x.shape[-1] - reach
    out = None
    for t1 in range(kernel):
        for t2 in range(kernel):
            tap = x[..., t1 * dilation : t1 * dilation + n1, t2 * dilation : t2 * dilation + n2]
            if out is None:
                out = tap.clone()
            elif torch.is_grad_enabled() and (out.requires_grad or tap.requires_grad):
                out = torch.maximum(out, tap)
            else:
                torch.maximum(out, tap, out=out)
    return out


class DenseOrthoFeatures:
    """Features of both 2D pathways for all voxels of a box, from dense per-plane maps.

    For orientation k the planes are the slices along axis k through the box; each is cropped
    in-plane to what the box's patches cover and run through :meth:`OrthogonalPathway.dense`.
    Only the map rows the box's voxels read are kept.  ``__call__(coords)`` then gathers the
    (N, 2 * 3 * out_channels * out_size**2) features of voxels inside the box, identical (up to
    float rounding) to running the pathways on extracted patches, at a fraction of the cost:
    neighbouring voxels' patches overlap almost entirely, so the per-patch convolutions repeat
    the same work ~b^2 times.

    Memory: about ``out_channels * (box + G*(out_size-1))``-sized maps per orientation and
    pathway; :meth:`SegNet.predict_volume` therefore processes thin slabs along axis 0.
    """

    def __init__(
        self,
        net: "SegNet",
        extractor: PatchExtractor,
        coords: torch.Tensor,
        max_chunk_elements: int = 2**25,
    ):
        coords = extractor._coords(coords)
        self.lo = coords.min(dim=0).values
        hi = coords.max(dim=0).values
        extent = (hi - self.lo + 1).tolist()
        pad = extractor.pad
        self.parts = []  # (maps (P, N1, N2, Ch), k, (a1, a2), tap step G, out_size)
        kinds = [
            (net.ortho_path, [extractor.padded] * 3, 1, extractor.patch_2d // 2, extractor.patch_2d),
            (net.compressed_path, extractor.pooled, extractor.compressed_scale, extractor._comp_radius,
             extractor.compressed_size),
        ]
        lo = self.lo.tolist()
        for path, images, spacing, radius, n in kinds:
            step = spacing * path.pool**path.n_layers
            span = spacing * (n - 1) + 1  # pixels covered by one patch along an axis
            for k in range(3):
                a1, a2 = [a for a in range(3) if a != k]
                index = [None, None, None]
                index[k] = slice(lo[k] + pad, lo[k] + pad + extent[k])
                for a in (a1, a2):
                    start = lo[a] + pad - radius
                    index[a] = slice(start, start + extent[a] - 1 + span)
                sub = images[k][:, index[0], index[1], index[2]].permute(k + 1, 0, a1 + 1, a2 + 1)
                need1 = extent[a1] + step * (path.out_size - 1)
                need2 = extent[a2] + step * (path.out_size - 1)
                per_plane = sub.shape[2] * sub.shape[3] * max(path.out_channels, 1) * 3
                chunk = max(1, max_chunk_elements // per_plane)
                maps = None
                for p0 in range(0, sub.shape[0], chunk):
                    out = path.dense(sub[p0 : p0 + chunk].contiguous(), k, spacing)
                    if out.shape[2] < need1 or out.shape[3] < need2:  # cannot happen for valid sizes
                        raise RuntimeError("dense map smaller than the patches it must cover")
                    if maps is None:  # channels last: a voxel's features at one tap are one row
                        maps = out.new_empty(sub.shape[0], need1, need2, out.shape[1])
                    maps[p0 : p0 + chunk] = out[:, :, :need1, :need2].permute(0, 2, 3, 1)
                self.parts.append((maps, k, (a1, a2), step, path.out_size))

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        rel = coords - self.lo
        n = coords.shape[0]
        feats = []
        for maps, k, (a1, a2), step, size in self.parts:
            n_planes, n1, n2, ch = maps.shape
            base = (rel[:, k] * n1 + rel[:, a1]) * n2 + rel[:, a2]
            ii = torch.arange(size, device=maps.device) * step
            taps = (ii[:, None] * n2 + ii[None, :]).reshape(-1)
            rows = maps.reshape(-1, ch).index_select(0, (base[:, None] + taps[None, :]).reshape(-1))
            # (N, taps, Ch) -> (N, Ch, taps): the (channel, row, column) order of the patch path
            feats.append(rows.reshape(n, -1, ch).transpose(1, 2).reshape(n, -1))
        return torch.cat(feats, dim=1)


class SegNet(SegmentationNet):
    """de Brebisson & Montana's SegNet.  ``kind = "patch"``: per-voxel classification; use
    :meth:`predict_volume` (not a dense forward) to label a volume.

    Args:
        in_channels: modalities (each patch then has this many channels).
        n_classes: output classes, background (0) included: 135 = 134 regions + background.
        n_centroids: length of the centroid-distance vector; ``None`` -> ``n_classes - 1``;
            0 builds the paper's stage-1 sub-network without the centroid pathway.
        patch_3d, patch_2d: side of the 3D patch (13) and of the orthogonal 2D patches (29).
        compressed_size, compressed_scale: compressed patches are ``compressed_size**2`` (29^2)
            averages of ``compressed_scale**2`` squares (3x3), i.e. span 87^2 voxels.
        conv_channels, conv_kernel, pool: the 2DconvPool stack of both 2D pathways ((20, 50),
            5x5 kernels, 2x2 max-pooling).
        shared_layers: how many of the 2DconvPool layers are shared across the three
            orientations (paper: 1; 2 shares the whole pathway).
        fc_3d: widths of the fully connected layers of the 3D-patch pathway ((1000, 1000)).
        fc_hidden: widths of the hidden fully connected layers after the merge ((3000, 3000)).
        dropout: rate of the ``nn.Dropout`` after each hidden merged layer.
        centroid_noise_std: std (voxels) of the training-time noise on centroid distances.
        centroid_blank: training-time probability of blanking a sample's centroid vector.
        distance_scale: factor applied to the distances (voxel units) inside the network.
    """

    kind = "patch"
    size_divisor = 1

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 135,
        n_centroids: int | None = None,
        patch_3d: int = 13,
        patch_2d: int = 29,
        compressed_size: int = 29,
        compressed_scale: int = 3,
        conv_channels: Sequence[int] = (20, 50),
        conv_kernel: int = 5,
        pool: int = 2,
        shared_layers: int = 1,
        fc_3d: Sequence[int] = (1000, 1000),
        fc_hidden: Sequence[int] = (3000, 3000),
        dropout: float = 0.2,
        centroid_noise_std: float = 5.0,
        centroid_blank: float = 0.2,
        distance_scale: float = 0.01,
    ):
        n_centroids = n_classes - 1 if n_centroids is None else int(n_centroids)
        super().__init__(
            in_channels=in_channels,
            n_classes=n_classes,
            n_centroids=n_centroids,
            patch_3d=patch_3d,
            patch_2d=patch_2d,
            compressed_size=compressed_size,
            compressed_scale=compressed_scale,
            conv_channels=list(conv_channels),
            conv_kernel=conv_kernel,
            pool=pool,
            shared_layers=shared_layers,
            fc_3d=list(fc_3d),
            fc_hidden=list(fc_hidden),
            dropout=dropout,
            centroid_noise_std=centroid_noise_std,
            centroid_blank=centroid_blank,
            distance_scale=distance_scale,
        )
        _check_patch_sizes(patch_3d, patch_2d, compressed_size, compressed_scale)
        if not 0 <= n_centroids <= n_classes - 1:
            raise ValueError(f"n_centroids must be in [0, n_classes - 1], got {n_centroids}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_classes, self.n_centroids = n_classes, n_centroids

        self.ortho_path = OrthogonalPathway(in_channels, patch_2d, conv_channels, conv_kernel, pool, shared_layers)
        self.compressed_path = OrthogonalPathway(
            in_channels, compressed_size, conv_channels, conv_kernel, pool, shared_layers
        )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * patch_3d**3
        for out in fc_3d:
            layers += [nn.Linear(width, out), nn.ReLU(inplace=True)]
            width = out
        self.patch3d_path = nn.Sequential(*layers)
        self.centroid_path = CentroidInput(centroid_noise_std, centroid_blank, distance_scale)

        self.n_features = self.ortho_path.out_features + self.compressed_path.out_features + width + n_centroids
        head: list[nn.Module] = []
        width = self.n_features
        for out in fc_hidden:
            head += [nn.Linear(width, out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = out
        head.append(nn.Linear(width, n_classes))
        self.head = nn.Sequential(*head)

    # -- inputs ---------------------------------------------------------------------------

    def _unpack(self, batch: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            inputs = dict(batch)
        else:
            inputs = dict(zip(INPUT_KEYS, batch))
        missing = [k for k in INPUT_KEYS[:3] if inputs.get(k) is None]
        if missing:
            raise ValueError(f"SegNet input lacks {missing}")
        return inputs

    def _merge(
        self, ortho: torch.Tensor, compressed: torch.Tensor, patch3d: torch.Tensor, dist: torch.Tensor | None
    ) -> torch.Tensor:
        parts = [ortho, compressed, self.patch3d_path(patch3d)]
        if self.n_centroids:
            n = parts[0].shape[0]
            if dist is None:  # stage-1 neutral value, exactly 0 (no training noise either)
                parts.append(parts[0].new_zeros(n, self.n_centroids))
            elif tuple(dist.shape) != (n, self.n_centroids):
                raise ValueError(f"centroids input must be ({n}, {self.n_centroids}), got {tuple(dist.shape)}")
            else:
                parts.append(self.centroid_path(dist.float()))
        return torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)

    def features(self, batch: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """The merged pathway features (B, n_features): everything before the FC head."""
        inputs = self._unpack(batch)
        return self._merge(
            self.ortho_path(inputs["ortho"]),
            self.compressed_path(inputs["compressed"]),
            inputs["patch3d"],
            inputs.get("centroids"),
        )

    def forward(self, batch: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, n_classes) for a batch of voxels.

        ``batch``: a dict with ``patch3d`` (B, C, a, a, a), ``ortho`` (B, 3, C, b, b),
        ``compressed`` (B, 3, C, c, c) and ``centroids`` (B, n_centroids) distances in voxels
        (missing or None: the stage-1 neutral value 0), or a tuple in that order.
        """
        return self.head(self.features(batch))

    def split_for_mc(self) -> tuple[Callable[[Any], Any], Callable[[Any], torch.Tensor]]:
        """prefix: all pathway features merged (the conv pathways, the 3D-patch FC pathway, the
        centroid input), which contain no dropout; suffix: the FC head, which holds every
        dropout.  MC sampling computes the patch features once and reruns only the head."""
        return self.features, self.head

    def patch_extractor(self, volume: torch.Tensor) -> PatchExtractor:
        """A :class:`PatchExtractor` for ``volume`` with this network's patch sizes."""
        c = self.config
        return PatchExtractor(volume, c["patch_3d"], c["patch_2d"], c["compressed_size"], c["compressed_scale"])

    # -- whole-volume inference -------------------------------------------------------------

    def estimate_centroids(self, coords: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region centroids (voxel units) and presence flags from voxel labels (see module doc)."""
        return estimate_centroids(coords, labels, self.n_centroids)

    def _run_pass(
        self,
        extractor: PatchExtractor,
        coords: torch.Tensor,
        batch_size: int,
        centroids: tuple[torch.Tensor, torch.Tensor] | None,
        sink: Callable[[slice, torch.Tensor], None],
        autocast: bool,
        dense: bool,
        slab: int,
        timing: dict[str, float],
    ) -> None:
        """Classify all ``coords`` (sorted along axis 0, as ``torch.nonzero`` returns them)."""
        device = next(self.parameters()).device

        def distances(c: torch.Tensor) -> torch.Tensor | None:
            if not self.n_centroids or centroids is None:
                return None
            with torch.autocast(device.type, enabled=False):  # distances stay float32
                return centroid_distances(c, *centroids)

        def tick(key: str, t0: float) -> float:
            now = time.perf_counter()
            timing[key] += now - t0
            return now

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if not dense:
                for start in range(0, coords.shape[0], batch_size):
                    c = coords[start : start + batch_size]
                    t = time.perf_counter()
                    batch: dict[str, Any] = extractor(c)
                    batch["centroids"] = distances(c)
                    t = tick("extract", t)
                    logits = self(batch)
                    t = tick("network", t)
                    sink(slice(start, start + c.shape[0]), logits.float())
                    tick("store", t)
                return
            half = self.ortho_path.out_features
            z = coords[:, 0].contiguous()
            z_lo, z_hi = int(z[0]), int(z[-1])
            for z0 in range(z_lo, z_hi + 1, slab):
                bounds = torch.searchsorted(z, torch.tensor([z0, z0 + slab], device=z.device)).tolist()
                if bounds[0] == bounds[1]:
                    continue
                t = time.perf_counter()
                maps = DenseOrthoFeatures(self, extractor, coords[bounds[0] : bounds[1]])
                t = tick("dense_maps", t)
                for start in range(bounds[0], bounds[1], batch_size):
                    c = coords[start : min(start + batch_size, bounds[1])]
                    t = time.perf_counter()
                    feats2d = maps(c)
                    patch3d = extractor.patch3d(c)
                    dist = distances(c)
                    t = tick("extract", t)
                    logits = self.head(self._merge(feats2d[:, :half], feats2d[:, half:], patch3d, dist))
                    t = tick("network", t)
                    sink(slice(start, start + c.shape[0]), logits.float())
                    tick("store", t)
                del maps

    @torch.no_grad()
    def predict_volume(
        self,
        volume: torch.Tensor,
        mask: torch.Tensor | None = None,
        batch_size: int = 2048,
        device: str | torch.device | None = None,
        refinements: int = 1,
        stage1_net: "SegNet | None" = None,
        autocast: bool = False,
        dense: bool = True,
        slab: int = 16,
    ) -> torch.Tensor:
        """Label a volume with the paper's two-stage scheme; returns probabilities (n_classes, D, H, W).

        Stage 1 classifies every voxel of ``mask`` with the centroid distances at the neutral
        value 0 (or with ``stage1_net``, the paper's centroid-free sub-network); the centroids of
        regions 1..n_centroids are then estimated from the stage-1 labels
        (:meth:`estimate_centroids`), and stage 2 classifies again with the distances to them.
        ``refinements`` > 1 repeats stage 2 with centroids re-estimated from the previous pass
        (the paper iterates "until convergence"); 0 stops after stage 1.

        ``volume``: (D, H, W) or (C, D, H, W) intensities on the conformed grid.  ``mask``:
        voxels to classify (default: voxels where some channel is non-zero); the others get
        probability 1 for the background class 0.  Coordinates, centroids and distances are in
        voxel units of this grid (1 mm when conformed).

        ``dense`` (default): the 2D pathways are evaluated as dilated convolutions over whole
        planes of slabs of ``slab`` slices along axis 0 (:class:`DenseOrthoFeatures`), which
        gives the same features as patch extraction without repeating the overlapping
        convolutions of neighbouring voxels; ``dense=False`` extracts every patch and runs
        :meth:`forward` (the training path).  ``batch_size`` voxels go through the fully
        connected layers at a time.  ``device``: where the patches are gathered and the network
        runs (the network is moved there, in place); the result is on the CPU, float32.
        ``autocast``: run the network in bfloat16 (several times faster on CPUs with
        AMX/AVX512-BF16; small rounding changes).

        The network runs in its current mode, except the centroid-input module, which is held in
        eval mode: call ``.eval()`` first for deterministic output (or switch only the dropout
        modules to train mode for an MC sample).  Timings of the last call are in
        ``self.last_timing``.
        """
        if refinements < 0:
            raise ValueError("refinements must be >= 0")
        if batch_size < 1 or slab < 1:
            raise ValueError("batch_size and slab must be >= 1")
        vol = _as_channels(torch.as_tensor(volume))
        if vol.shape[0] != self.config["in_channels"]:
            raise ValueError(f"volume has {vol.shape[0]} channels, the network {self.config['in_channels']}")
        shape = tuple(vol.shape[1:])
        if mask is None:
            mask = (vol != 0).any(dim=0)
        mask = torch.as_tensor(mask).bool().reshape(shape)
        shared_keys = ("in_channels", "patch_3d", "patch_2d", "compressed_size", "compressed_scale")
        if stage1_net is not None and any(stage1_net.config[k] != self.config[k] for k in shared_keys):
            raise ValueError("stage1_net must use the same patch sizes and channels as this network")
        if device is not None:
            self.to(device)
            if stage1_net is not None:
                stage1_net.to(device)
        run_device = next(self.parameters()).device
        coords = torch.nonzero(mask.to(run_device))  # (N, 3) voxel indices, sorted along axis 0
        n_vox = coords.shape[0]
        n_classes = self.n_classes
        probs = torch.zeros(n_classes, math.prod(shape), dtype=torch.float32)
        probs[0] = 1.0
        if n_vox == 0:
            return probs.reshape(n_classes, *shape)
        linear = (coords[:, 0] * shape[1] * shape[2] + coords[:, 1] * shape[2] + coords[:, 2]).cpu()

        nets = [net for net in (self, stage1_net) if net is not None]
        modes = [(m, m.training) for net in nets for m in net.modules()]
        for net in nets:
            net.centroid_path.eval()
        timing = {"prepare": 0.0, "dense_maps": 0.0, "extract": 0.0, "network": 0.0, "store": 0.0}
        t_start = time.perf_counter()
        passes = 1 + (refinements if self.n_centroids else 0)
        try:
            extractor = self.patch_extractor(vol.to(run_device))
            timing["prepare"] = time.perf_counter() - t_start
            labels = torch.empty(n_vox, dtype=torch.long, device=run_device)

            def store_labels(sl: slice, logits: torch.Tensor) -> None:
                labels[sl] = logits.argmax(dim=1)

            def store_probs(sl: slice, logits: torch.Tensor) -> None:
                probs[:, linear[sl]] = torch.softmax(logits, dim=1).T.cpu()

            centroids = None
            for p in range(passes):
                net = stage1_net if (p == 0 and stage1_net is not None) else self
                last = p == passes - 1
                t_pass = time.perf_counter()
                net._run_pass(
                    extractor, coords, batch_size, centroids, store_probs if last else store_labels,
                    autocast, dense, slab, timing,
                )
                logger.info("SegNet pass %d/%d: %d voxels in %.1f s", p + 1, passes, n_vox, time.perf_counter() - t_pass)
                if not last:
                    centroids = self.estimate_centroids(coords, labels)
                    logger.info("SegNet: %d/%d regions present after pass %d", int(centroids[1].sum()),
                                self.n_centroids, p + 1)
        finally:
            for module, mode in modes:
                module.train(mode)
        total = time.perf_counter() - t_start
        logger.info(
            "SegNet predict_volume: %d voxels, %d pass(es), %.1f s (volume preparation %.1f s, dense 2D maps %.1f s, "
            "patch/feature gathering %.1f s, network %.1f s, storing %.1f s)",
            n_vox, passes, total, timing["prepare"], timing["dense_maps"], timing["extract"], timing["network"],
            timing["store"],
        )
        self.last_timing = dict(timing, total=total, n_voxels=n_vox, passes=passes)
        return probs.reshape(n_classes, *shape)
