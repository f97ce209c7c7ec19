"""ArborSeg: a BIDS App that segments the brain and the cerebellar lobules from anatomical MRI."""

from ._version import __version__

__all__ = ["__version__"]
