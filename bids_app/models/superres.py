"""Residual super-resolution network (DeepCERES stage 4: x2, 1 mm -> 0.5 mm in the cerebellum crop).

DeepCERES up-samples the 1 mm crop with a ResNet-like network before segmenting at 0.5 mm. This
one works at the *input* resolution and up-samples at the end (sub-pixel convolution, as in
ESPCN/EDSR), so it costs about ``scale**3`` times less than a network run on the up-sampled grid:

    y = trilinear(x, scale) + shuffle(head(blocks(stem(x))))

* ``stem``: 3x3x3 convolution, ``width`` channels;
* ``blocks``: ``n_blocks`` residual blocks (conv, ReLU, conv; scaled by ``residual_scale``);
* ``head``: 3x3x3 convolution to ``scale**3`` channels, re-arranged by :func:`pixel_shuffle_3d`
  into a ``scale``-times finer grid.

The trilinear term (``align_corners=False``) fixes the geometry: output voxel ``i`` sits at input
coordinate ``(i + 0.5) / scale - 0.5``, which is what :func:`bids_app.core.superres.upsampled_affine`
writes into the NIfTI header. The network only learns the detail trilinear interpolation misses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet

log = logging.getLogger(__name__)


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, C*s^3, D, H, W)`` -> ``(N, C, D*s, H*s, W*s)``; channel ``(a*s + b)*s + c`` fills offset (a, b, c)."""
    n, c, d, h, w = x.shape
    s = int(scale)
    if c % s**3:
        raise ValueError(f"{c} channels cannot be shuffled by a factor {s} (need a multiple of {s**3})")
    out = c // s**3
    x = x.reshape(n, out, s, s, s, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, out, d * s, h * s, w * s)


class _ResBlock(nn.Module):
    def __init__(self, width: int, scale: float):
        super().__init__()
        self.conv1 = nn.Conv3d(width, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.conv2(F.relu(self.conv1(x), inplace=True))


class SuperResolution3D(SegmentationNet):
    """Residual sub-pixel super-resolution network; ``forward`` maps (N, C, D, H, W) to (N, C, sD, sH, sW).

    Args:
        in_channels: image channels (1: T1w).
        scale: integer up-sampling factor (2: 1 mm -> 0.5 mm).
        width: feature channels of the residual blocks.
        n_blocks: residual blocks (two convolutions each).
        residual_scale: factor on each block's residual (EDSR's trick for stable training).
    """

    def __init__(self, in_channels: int = 1, scale: int = 2, width: int = 24, n_blocks: int = 4,
                 residual_scale: float = 0.2):
        super().__init__(in_channels=in_channels, scale=scale, width=width, n_blocks=n_blocks,
                         residual_scale=residual_scale)
        if min(in_channels, scale, width) < 1 or n_blocks < 0:
            raise ValueError("in_channels, scale and width must be positive and n_blocks >= 0")
        self.scale = int(scale)
        self.stem = nn.Conv3d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(_ResBlock(width, residual_scale) for _ in range(n_blocks)))
        self.head = nn.Conv3d(width, in_channels * self.scale**3, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as plain trilinear interpolation
        nn.init.zeros_(self.head.bias)
        log.debug("SuperResolution3D(%s): %d parameters", self.config, self.n_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        base = F.interpolate(x, scale_factor=self.scale, mode="trilinear", align_corners=False)
        feats = F.relu(self.stem(x), inplace=True)
        feats = feats + self.blocks(feats)
        return base + pixel_shuffle_3d(self.head(feats), self.scale)
