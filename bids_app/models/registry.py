"""Names of the architectures and where they live (imported lazily: no torch at import time)."""

from __future__ import annotations

import importlib
from typing import Any

#: architecture name -> "module:Class"
ARCHITECTURES: dict[str, str] = {
    "cerebrum": "bids_app.models.cerebrum:Cerebrum",
    "unet": "bids_app.models.unet:UNet3D",
    "dpn": "bids_app.models.dpn:DPN",
    "deepmrseg": "bids_app.models.deepmrseg:DeepMRSeg",
    "segnet": "bids_app.models.segnet:SegNet",
    "srresnet": "bids_app.models.superres:SuperResolution3D",
}


def architecture_class(name: str):
    """The ``nn.Module`` class registered as ``name`` (ValueError for unknown names)."""
    try:
        target = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, **kwargs: Any):
    """Instantiate architecture ``name`` with constructor ``kwargs``."""
    return architecture_class(name)(**kwargs)
