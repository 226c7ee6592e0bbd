"""pyunionfs's benchmark: pyunionfs next to native, kernel overlayfs and fuse-overlayfs."""
