"""Which extended attributes the union shows, and how user xattrs in the overlay namespaces are
stored: as kernel overlayfs does, a user's `trusted.overlay.X` is stored escaped as
`trusted.overlay.overlay.X`, and the layers' own overlay metadata stays private."""
from __future__ import annotations

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


def visible(stored_names: list[bytes]) -> list[bytes]:
    return [to_shown(name) for name in stored_names if not is_private(name)]
