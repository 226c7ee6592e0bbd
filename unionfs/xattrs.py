"""Which extended attributes the union shows: overlay metadata stays private, as in kernel overlayfs."""
from __future__ import annotations

# trusted.* is the kernel's namespace for a privileged mount, user.* for an unprivileged one
# (userxattr); layers can carry either, and neither is the user's data.
PRIVATE_PREFIXES = (b"trusted.overlay.", b"user.overlay.")


def is_private(name: bytes) -> bool:
    return name.startswith(PRIVATE_PREFIXES)


def visible(names: list[bytes]) -> list[bytes]:
    return [name for name in names if not name.startswith(PRIVATE_PREFIXES)]
