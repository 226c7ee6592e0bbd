"""pyunionfs: a union filesystem with kernel overlayfs semantics, served over FUSE."""

__version__ = "0.1.0"
