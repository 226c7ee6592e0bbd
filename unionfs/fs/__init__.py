"""The union filesystem: layers merged under a copy-on-write upper, in kernel overlayfs's format,
served over FUSE (pyfuse3 on trio, with a C core and a shim)."""
