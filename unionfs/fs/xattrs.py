"""Which extended attributes the union shows, and how user xattrs in the overlay namespaces are
stored: as kernel overlayfs does, a user's `trusted.overlay.X` is stored escaped as
`trusted.overlay.overlay.X`, and the layers' own overlay metadata stays private."""
from __future__ import annotations

import errno
import stat

from unionfs.fs import syscalls

# trusted.* is the kernel's namespace for a privileged mount, user.* for an unprivileged one
# (userxattr); layers can carry either, and neither is the user's data.
OVERLAY_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
ESCAPED_PREFIXES = tuple(prefix + b"overlay." for prefix in OVERLAY_PREFIXES)


def is_private(stored: bytes) -> bool:
    """Is STORED (a name as it is in a layer) overlay metadata rather than user data?"""
    return stored.startswith(OVERLAY_PREFIXES) and not stored.startswith(ESCAPED_PREFIXES)


def to_stored(name: bytes) -> bytes:
    """The name under which the user's xattr NAME is kept in a layer."""
    for prefix in OVERLAY_PREFIXES:
        if name.startswith(prefix):
            return prefix + b"overlay." + name[len(prefix):]
    return name


def to_shown(stored: bytes) -> bytes:
    """The name the user sees for a non-private STORED name."""
    for prefix in ESCAPED_PREFIXES:
        if stored.startswith(prefix):
            return stored[: len(prefix) - len(b"overlay.")] + stored[len(prefix):]
    return stored


def visible(stored_names: list[bytes], hidden: frozenset[bytes] = frozenset()) -> list[bytes]:
    """The names a user sees of STORED_NAMES: not overlay metadata, nor the mount's HIDDEN ones."""
    return [to_shown(name) for name in stored_names if not is_private(name) and name not in hidden]


# fuse-overlayfs's override_stat xattrs (its xattr_permissions option): an object's owner and mode
# as "UID:GID:OCTAL-MODE", for layers where the real ones cannot be set. The C core reads them
# (UFS_LAYER_OVERRIDE_*); their names, in the order fuse-overlayfs looks for them on a layer root.
OVERRIDE_PRIVILEGED = b"security.fuseoverlayfs.override_stat"  # xattr_permissions=1
OVERRIDE_CONTAINERS = b"user.containers.override_stat"  # xattr_permissions=2 (containers/storage's)
OVERRIDE_USER = b"user.fuseoverlayfs.override_stat"  # what fuse-overlayfs 1.10 wrote for =2
OVERRIDE_NAMES = (OVERRIDE_PRIVILEGED, OVERRIDE_CONTAINERS, OVERRIDE_USER)
OVERRIDE_BY_OPTION = {1: OVERRIDE_PRIVILEGED, 2: OVERRIDE_CONTAINERS}


def override_value(uid: int, gid: int, mode: int) -> bytes:
    return b"%d:%d:%o" % (uid, gid, mode & 0o7777)


def parse_override(value: bytes) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) of an override_stat value; None when it is not one."""
    fields = value.split(b":")
    try:
        return int(fields[0]), int(fields[1]), int(fields[2], 8) & 0o7777
    except (IndexError, ValueError):
        return None


def set_override(dir_fd: int, name: bytes, xattr: bytes, uid: int = -1, gid: int = -1,
                 mode: int | None = None) -> None:
    """Record a new owner (-1: unchanged) or mode (None: unchanged) of object (DIR_FD, NAME) in
    its override_stat XATTR, starting from the recorded one, else from the object's own. A
    symlink cannot carry user.* xattrs: as fuse-overlayfs, it is left as it is."""
    recorded = syscalls.getxattr_or_none(dir_fd, name, xattr)
    current = parse_override(recorded) if recorded is not None else None
    if current is None:
        st = syscalls.lstat(dir_fd, name)
        current = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    value = override_value(current[0] if uid == -1 else uid, current[1] if gid == -1 else gid,
                           current[2] if mode is None else mode)
    try:
        syscalls.setxattr(dir_fd, name, xattr, value)
    except OSError as exc:
        if exc.errno != errno.EPERM or not xattr.startswith(b"user."):
            raise
