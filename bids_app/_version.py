"""The one place ArborSeg's version is defined (CLI, GeneratedBy and packaging read it)."""

__version__ = "0.1.0"
