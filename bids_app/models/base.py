"""The contract every ArborSeg segmentation network follows.

* Configured entirely by its constructor; the keyword arguments are kept in ``self.config`` so a
  checkpoint manifest can rebuild the network (``type(net)(**net.config)``).
* Dense networks map ``(N, C_in, D, H, W)`` to logits ``(N, n_classes, D, H, W)``; spatial sizes
  must be multiples of ``size_divisor`` (the predictor pads).
* Dropout layers are ``torch.nn.Dropout``/``Dropout3d`` modules, so MC-dropout can switch exactly
  those to train mode.
* ``split_for_mc()`` returns ``(prefix, suffix)`` with ``suffix(prefix(x)) == forward(x)`` and no
  dropout inside ``prefix``: MC sampling runs ``prefix`` once and only ``suffix`` N times.
  ``prefix`` may return any object (tensor, tuple of skip tensors...).

Nothing here imports torch at module import time of ``bids_app.models``; this module is imported
only by the architecture modules, which need torch anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class SegmentationNet(nn.Module):
    """Base class of the dense 3D segmentation networks."""

    #: input spatial sizes must be multiples of this (product of the strides)
    size_divisor: int = 1
    #: "dense" (volume in, volume out) or "patch" (per-voxel network with its own volume inference)
    kind: str = "dense"

    def __init__(self, **config: Any):
        super().__init__()
        self.config: dict[str, Any] = dict(config)

    def split_for_mc(self) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        """Default: nothing is shared between MC samples."""
        return (lambda x: x), self.forward

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse a tensor that is not ``(N, in_channels, D, H, W)`` with sizes divisible by ``size_divisor``."""
        channels = self.config.get("in_channels")
        if x.dim() != 5 or (channels is not None and x.shape[1] != channels):
            raise ValueError(f"expected input (N, {channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.size_divisor}; "
                             f"pad the volume first")

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dropout_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
