"""DeepMRSeg (Doshi et al.): a U-Net built from ResNet and ResInc blocks, here in 3D.

Layout (``f = base_filters``, ``F_i = f * 2**i``, ``d = depth``)::

    input (m channels)
      -> projection: 1x1x1 conv m -> f, BN, ReLU                        (paper 3.2)
      -> pre-encoding: ``n_pre_blocks`` ResNet blocks at f             (paper 3.3)      = skip 0
      -> for i = 1..d: transition down (1x1x1 conv, stride 2, F_{i-1} -> 2 F_{i-1}, BN, ReLU)
                       ResInc(F_i), dropout                            (paper 3.4, 3.5) = skip i
      -> for i = d-1..0: transition up (1x1x1 transposed conv, stride 2, -> F_i, BN, ReLU)
                         concatenate with skip i -> 2 F_i channels
                         ResInc(2 F_i), dropout                        (paper 3.6)
      -> 1x1x1 conv 2f -> n_classes (logits)

Skip connections are **concatenated**.  The paper's text says the up-sampling "allows the
addition of the skip connection" but also that "along with upsampling, the number of output
feature maps are reduced to one-fourth".  A reduction by four is only consistent with
concatenation: a decoder level carries ``2 F_{i+1} = 4 F_i`` channels (up-sampled + skip), the
transposed convolution maps them to ``F_i``, and concatenation with the ``F_i``-channel skip
gives ``2 F_i`` again.  With addition the up-sampling would have to halve, not quarter, the
features.  (From the bottleneck, which has no concatenated skip, the reduction is by two.)

Deviations from the paper, all deliberate:

* 3D throughout (the paper's network is 2D on slices); 3x3 -> 3x3x3, 1x1 -> 1x1x1.
* Dropout (``nn.Dropout``, element-wise, default 0.1) after every ResInc block of the encoder
  and decoder, for MC-dropout; the paper does not use dropout.
* The paper does not say whether the transition-up convolution is followed by BN+ReLU; it is
  here, like the projection and the transition down, which the paper does specify.
* Batch norm everywhere, as in the paper (so the predictor should run in ``eval()`` mode;
  MC-dropout switches only the dropout modules to train mode).

Note on the 1x1x1 stride-2 transitions (faithful to the paper): the transition down keeps one
voxel in eight, and the transposed 1x1x1 stride-2 convolution writes to the even positions only
(odd positions get just the BN shift); the skip concatenation and the 3x3x3 convolutions of the
following ResInc block fill in.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .base import SegmentationNet

logger = logging.getLogger(__name__)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Sequential:
    """``kernel``-cubed convolution (same padding, no bias: BN follows), BN, ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
    )


class ResNetBlock(nn.Module):
    """The classic ResNet block (paper fig. 2A): conv-BN-ReLU-conv-BN, identity added, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels, 3)
        self.conv2 = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm3d(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class ResIncBlock(nn.Module):
    """ResInc block (paper fig. 2B), a 3D Inception-ResNet-A variant.

    Four parallel branches, each a 1x1x1 convolution ``channels -> channels/4`` followed by 0, 1,
    2 and 3 stacked 3x3x3 convolutions (all conv-BN-ReLU); the branches are concatenated back to
    ``channels`` features, weighted by a 1x1x1 convolution (+BN), added to the input, then ReLU.
    """

    n_branches = 4

    def __init__(self, channels: int):
        super().__init__()
        if channels % self.n_branches:
            raise ValueError(f"ResInc needs a multiple of 4 channels, got {channels}")
        width = channels // self.n_branches
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn_relu(channels, width, 1), *[conv_bn_relu(width, width, 3) for _ in range(n)])
            for n in range(self.n_branches)
        )
        self.merge = nn.Sequential(
            nn.Conv3d(width * self.n_branches, channels, 1, bias=False), nn.BatchNorm3d(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.act(x + self.merge(branches))


def transition_down(in_ch: int, out_ch: int) -> nn.Sequential:
    """1x1x1 convolution with stride 2 (paper 3.5), BN, ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 1, stride=2, bias=False), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)
    )


def transition_up(in_ch: int, out_ch: int) -> nn.Sequential:
    """Transposed 1x1x1 convolution with stride 2 (paper 3.6), exactly doubling each size, BN, ReLU."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_ch, out_ch, 1, stride=2, output_padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
    )


class DeepMRSeg(SegmentationNet):
    """3D DeepMRSeg.  Spatial sizes must be multiples of ``2**depth`` (``size_divisor``).

    Args:
        in_channels: input modalities (``m`` in the paper).
        n_classes: output classes (logits channels).
        base_filters: ``f``, the width after projection; even (the level-0 decoder ResInc has
            ``2f`` channels, split in four branches).
        depth: number of transition-down steps (resolution levels below the input one).
        dropout: rate of the ``nn.Dropout`` after each ResInc block (0 disables it).
        n_pre_blocks: ResNet blocks in the pre-encoding stage.
    """

    kind = "dense"

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        base_filters: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
        n_pre_blocks: int = 1,
    ):
        super().__init__(
            in_channels=in_channels,
            n_classes=n_classes,
            base_filters=base_filters,
            depth=depth,
            dropout=dropout,
            n_pre_blocks=n_pre_blocks,
        )
        if base_filters < 2 or base_filters % 2:
            raise ValueError(f"base_filters must be an even number >= 2, got {base_filters}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.size_divisor = 2**depth
        widths = [base_filters * 2**i for i in range(depth + 1)]

        self.projection = conv_bn_relu(in_channels, base_filters, 1)
        self.pre_encoding = nn.Sequential(*[ResNetBlock(base_filters) for _ in range(n_pre_blocks)])

        self.down = nn.ModuleList(transition_down(widths[i], widths[i + 1]) for i in range(depth))
        self.encoder = nn.ModuleList(ResIncBlock(widths[i + 1]) for i in range(depth))
        self.encoder_dropout = nn.ModuleList(nn.Dropout(dropout) for _ in range(depth))

        # decoder level i (i = depth-1 .. 0), stored in that order
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.decoder_dropout = nn.ModuleList()
        incoming = widths[depth]
        for i in reversed(range(depth)):
            self.up.append(transition_up(incoming, widths[i]))
            self.decoder.append(ResIncBlock(2 * widths[i]))
            self.decoder_dropout.append(nn.Dropout(dropout))
            incoming = 2 * widths[i]
        self.head = nn.Conv3d(2 * base_filters, n_classes, 1)

    # -- the network is written as prefix + suffix so split_for_mc is exact by construction --

    def _prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the first dropout: projection, pre-encoding, first down + ResInc."""
        x0 = self.pre_encoding(self.projection(x))
        h1 = self.encoder[0](self.down[0](x0))
        return x0, h1

    def _suffix(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x0, h1 = features
        skips = [x0]
        h = self.encoder_dropout[0](h1)
        for i in range(1, len(self.encoder)):
            skips.append(h)
            h = self.encoder_dropout[i](self.encoder[i](self.down[i](h)))
        for up, block, drop in zip(self.up, self.decoder, self.decoder_dropout):
            h = drop(block(torch.cat([up(h), skips.pop()], dim=1)))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        divisor = self.size_divisor
        if any(s % divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {divisor}")
        return self._suffix(self._prefix(x))

    def split_for_mc(self) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """prefix: projection, pre-encoding ResNet block(s), first transition down and ResInc
        block (all before the first dropout), returning ``(skip0, level1_features)``;
        suffix: the rest, starting with the first dropout."""

        def prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            divisor = self.size_divisor
            if any(s % divisor for s in x.shape[2:]):
                raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {divisor}")
            return self._prefix(x)

        return prefix, self._suffix
