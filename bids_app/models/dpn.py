"""DPN: the coarse-to-fine Deep Pyramidal Network of DeepCERES (Morell-Ortega et al.).

The input is average-pooled into a pyramid (1, 1/2, 1/4, 1/8 for the default ``levels=4``).
Processing starts at the coarsest scale: a resolution block of ``convs_per_level`` (3 in the
paper) units of 3x3x3 convolution -> ReLU -> batch norm (that order, as in the paper) with
``base_filters`` feature maps at every scale (32 in the paper). Its output is up-sampled 2x
(trilinear, no parameters), concatenated with the input at the next finer scale, and refined by
that scale's resolution block, until full resolution; a 1x1x1 convolution gives the logits.
Dropout (rate 0.25) ends every resolution block except the full-resolution one.

Parameters: 309,198 for 1 -> 14 channels at the paper's width, about one fifth of the
DeepCERES-sized U-Net (``UNet3D.deepceres``: F = 16, depth 3, 1,401,486 parameters, ratio
0.22; the paper reports 696,177 vs 3,433,473 for its two-network cascades), but only 1.4 % of
the Zopes U-Net defaults (F = 32, depth 4, 22,578,702 parameters).

For MC sampling the prefix (deterministic) computes the input pyramid and the coarsest block up
to its dropout; the suffix re-runs the finer blocks. Spatial sizes must be multiples of
``size_divisor = 2**(levels - 1)`` (8 by default); other sizes raise ``ValueError``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet

log = logging.getLogger(__name__)


def _resolution_block(c_in: int, width: int, n_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(n_convs):
        layers += [
            nn.Conv3d(c_in if k == 0 else width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm3d(width),
        ]
    return nn.Sequential(*layers)


def _dropout(p: float, spatial: bool) -> nn.Module:
    # never in-place: MC sampling feeds the same prefix output to the suffix many times
    return nn.Dropout3d(p) if spatial else nn.Dropout(p)


class DPN(SegmentationNet):
    """Deep Pyramidal Network (coarse-to-fine, input pyramid concatenated at every scale).

    Args:
        in_channels: input image channels (T1, T2, atlas prior...).
        n_classes: output classes (logits); the DeepCERES lobule network has 14.
        base_filters: feature maps at every scale; paper 32.
        levels: pyramid scales including full resolution; 4 = 1/8, 1/4, 1/2, 1 (paper).
        convs_per_level: conv -> ReLU -> BN units per resolution block; paper 3.
        dropout: rate of the dropout ending every block except the full-resolution one; paper 0.25.
        spatial_dropout: drop whole channels (``nn.Dropout3d``) instead of single activations.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 14,
        base_filters: int = 32,
        levels: int = 4,
        convs_per_level: int = 3,
        dropout: float = 0.25,
        spatial_dropout: bool = False,
    ):
        super().__init__(
            in_channels=in_channels,
            n_classes=n_classes,
            base_filters=base_filters,
            levels=levels,
            convs_per_level=convs_per_level,
            dropout=dropout,
            spatial_dropout=spatial_dropout,
        )
        if min(in_channels, n_classes, base_filters, convs_per_level) < 1 or levels < 2:
            raise ValueError("in_channels, n_classes, base_filters, convs_per_level must be >= 1, levels >= 2")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.levels = levels
        self.size_divisor = 2 ** (levels - 1)

        # blocks[0] works at the coarsest scale, blocks[-1] at full resolution
        self.blocks = nn.ModuleList(
            _resolution_block(in_channels if k == 0 else base_filters + in_channels, base_filters, convs_per_level)
            for k in range(levels)
        )
        self.dropouts = nn.ModuleList(_dropout(dropout, spatial_dropout) for _ in range(levels - 1))
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.head = nn.Conv3d(base_filters, n_classes, kernel_size=1)
        log.debug("DPN(%s): %d parameters", self.config, self.n_parameters())

    def _prefix(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        self.check_input(x)
        pyramid = [x]
        for _ in range(self.levels - 1):
            pyramid.append(F.avg_pool3d(pyramid[-1], kernel_size=2))
        coarse = self.blocks[0](pyramid[-1])
        # finer inputs, coarse to fine: 1/4, 1/2, 1 for levels=4
        return tuple(reversed(pyramid[:-1])), coarse

    def _suffix(self, state: tuple[tuple[torch.Tensor, ...], torch.Tensor]) -> torch.Tensor:
        finer_inputs, h = state
        h = self.dropouts[0](h)
        for k, image in enumerate(finer_inputs, start=1):
            h = self.blocks[k](torch.cat([self.upsample(h), image], dim=1))
            if k < self.levels - 1:
                h = self.dropouts[k](h)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._suffix(self._prefix(x))

    def split_for_mc(self) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """Prefix: the input pyramid and the coarsest block before its dropout."""
        return self._prefix, self._suffix
