"""CEREBRUM: fully volumetric 3-level convolutional encoder-decoder (Bontempi et al. 2020).

Layout (``F = base_filters``; every 3x3x3 convolution is "same"-padded and followed by ReLU; no
batch normalisation, the paper trains with batch size 1)::

    level 1 (1/1)   enc1: conv3 C_in->F                            dec1: conv3 F->F -> conv1 F->n_classes
                      |  strided conv 4x4x4/4, F->2F (+ReLU)           ^  (sum)
                      v  (the 1:64 volume reduction)                   |  transposed conv 4x4x4/4, 2F->F
    level 2 (1/4)   enc2: conv3 2F->2F, conv3 2F->2F               dec2: conv3 2F->2F [drop], conv3 2F->2F [drop]
                      |  strided conv 2x2x2/2, 2F->4F (+ReLU)          ^  (sum)
                      v                                                |  transposed conv 2x2x2/2, 4F->2F
    level 3 (1/8)   bottleneck: conv3 4F->4F [drop], conv3 4F->4F [drop], conv3 4F->4F [drop]

The six convolutional blocks of the paper are "arranged in increasing number on three layers":
one at level 1, two at level 2, three at level 3 of the encoder; the decoder mirrors levels 2 and
1. Skip connections are element-wise sums (not concatenations). The paper states the model has
"~5M" parameters but its text gives no per-layer filter counts; ``base_filters=48`` (the
default, also :meth:`Cerebrum.paper`) is the width at which this layout has ~5 M parameters:
4,931,432 for one input channel and 8 classes (7 structures + background).

Dropout (``nn.Dropout``, or ``nn.Dropout3d`` with ``spatial_dropout=True``) sits only in the
bottleneck and the level-2 decoder (the paper uses none for inference; it is added here for MC
sampling). The whole encoder up to and including the first bottleneck convolution is therefore
deterministic and forms the MC prefix; the suffix (the rest of the bottleneck and the decoder,
dominated by the full-resolution ``dec1`` convolution) is what is re-run per MC sample.

Spatial sizes must be multiples of ``size_divisor = 8`` (4 x 2); other sizes raise ``ValueError``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .base import SegmentationNet

log = logging.getLogger(__name__)

#: width at which the CEREBRUM layout has the ~5 M parameters quoted in the paper
PAPER_BASE_FILTERS = 48


def _conv_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    padding = kernel // 2 if stride == 1 else 0
    return nn.Sequential(nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding), nn.ReLU(inplace=True))


def _dropout(p: float, spatial: bool) -> nn.Module:
    # never in-place: MC sampling feeds the same prefix output to the suffix many times
    return nn.Dropout3d(p) if spatial else nn.Dropout(p)


class Cerebrum(SegmentationNet):
    """CEREBRUM encoder-decoder (3 levels, strided-conv down-sampling 4 then 2, additive skips).

    Args:
        in_channels: input image channels.
        n_classes: output classes (logits); the paper's 7 structures + background = 8.
        base_filters: filters at level 1 (2x at level 2, 4x at level 3); paper width 48.
        dropout: dropout rate of the bottleneck and level-2 decoder dropout layers.
        spatial_dropout: drop whole channels (``nn.Dropout3d``) instead of single activations.
    """

    size_divisor = 8

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 8,
        base_filters: int = PAPER_BASE_FILTERS,
        dropout: float = 0.1,
        spatial_dropout: bool = False,
    ):
        super().__init__(
            in_channels=in_channels,
            n_classes=n_classes,
            base_filters=base_filters,
            dropout=dropout,
            spatial_dropout=spatial_dropout,
        )
        if min(in_channels, n_classes, base_filters) < 1:
            raise ValueError("in_channels, n_classes and base_filters must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        f1, f2, f3 = base_filters, 2 * base_filters, 4 * base_filters
        self.in_channels = in_channels

        # deterministic prefix
        self.enc1 = _conv_relu(in_channels, f1)
        self.down1 = _conv_relu(f1, f2, kernel=4, stride=4)
        self.enc2 = nn.Sequential(_conv_relu(f2, f2), _conv_relu(f2, f2))
        self.down2 = _conv_relu(f2, f3, kernel=2, stride=2)
        self.bottleneck_in = _conv_relu(f3, f3)
        # stochastic suffix
        self.bottleneck = nn.Sequential(
            _dropout(dropout, spatial_dropout),
            _conv_relu(f3, f3),
            _dropout(dropout, spatial_dropout),
            _conv_relu(f3, f3),
            _dropout(dropout, spatial_dropout),
        )
        self.up2 = nn.ConvTranspose3d(f3, f2, kernel_size=2, stride=2)
        self.dec2 = nn.Sequential(
            _conv_relu(f2, f2),
            _dropout(dropout, spatial_dropout),
            _conv_relu(f2, f2),
            _dropout(dropout, spatial_dropout),
        )
        self.up1 = nn.ConvTranspose3d(f2, f1, kernel_size=4, stride=4)
        self.dec1 = _conv_relu(f1, f1)
        self.head = nn.Conv3d(f1, n_classes, kernel_size=1)
        log.debug("Cerebrum(%s): %d parameters", self.config, self.n_parameters())

    @classmethod
    def paper(cls, in_channels: int = 1, n_classes: int = 8, **kwargs: Any) -> "Cerebrum":
        """The paper configuration: ``base_filters=48`` (4,931,432 parameters for 1 -> 8 channels)."""
        return cls(in_channels=in_channels, n_classes=n_classes, base_filters=PAPER_BASE_FILTERS, **kwargs)

    def _prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_input(x)
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.down1(skip1))
        deep = self.bottleneck_in(self.down2(skip2))
        return skip1, skip2, deep

    def _suffix(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        skip1, skip2, deep = state
        h = self.bottleneck(deep)
        h = self.dec2(skip2 + self.up2(h))  # out-of-place: the prefix output is reused
        h = self.dec1(skip1 + self.up1(h))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._suffix(self._prefix(x))

    def split_for_mc(self) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """Prefix: the encoder up to the first bottleneck convolution -> ``(skip1, skip2, deep)``."""
        return self._prefix, self._suffix
