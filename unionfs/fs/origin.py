"""The kernel's overlay.origin xattr: which lower object an upper object was copied from, as a
file handle (struct ovl_fb in fs/overlayfs/overlayfs.h). pyunionfs writes it on every copy-up and
reads it, from its own uppers and the kernel's, so that a copy keeps the lower st_ino for good."""
from __future__ import annotations

import struct

from unionfs.fs import core

ORIGIN = b"overlay.origin"
FB_VERSION, FB_MAGIC = 0, 0xFB
HEADER = struct.Struct("<BBBBB16s")  # version, magic, length, flags, handle type, fs uuid
# The kernel writes an all-zero uuid unless told to record one (mount option uuid=on).
NULL_UUID = bytes(16)


def encode(dir_fd: int, name: bytes) -> bytes:
    """The origin value for NAME in DIR_FD."""
    kind, handle = core.name_to_handle(dir_fd, name)
    return HEADER.pack(FB_VERSION, FB_MAGIC, HEADER.size + len(handle), 0, kind, NULL_UUID) + handle


def decode(value: bytes) -> tuple[int, bytes] | None:
    """(handle type, handle) from an origin value; None for a value this code does not read."""
    if len(value) < HEADER.size:
        return None
    version, magic, length, _flags, kind, _uuid = HEADER.unpack_from(value)
    if version != FB_VERSION or magic != FB_MAGIC or length != len(value):
        return None
    return kind, value[HEADER.size:]
