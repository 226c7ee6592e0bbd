"""Checks of the user's directories before anything is mounted or written."""
from __future__ import annotations

import errno
import os
import re
import stat

from unionfs.fs.core import MAX_LAYERS
from unionfs.errors import ConfigError
from unionfs.fs.options import MountConfig

FUSE_DEVICE = "/dev/fuse"
MAX_LOWERS = 500  # kernel overlayfs's OVL_MAX_STACK, and its message
assert MAX_LOWERS < MAX_LAYERS  # the C core's layer masks hold them and the upper
FUSE_DEVICE_NUMBER = os.makedev(10, 229)
# mountinfo writes spaces and other specials in paths as octal escapes (\040). Decoded by hand:
# the unicode_escape codec would be imported by every forked server, a millisecond or two.
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _inside(path: str, top: str) -> bool:
    """Is PATH equal to TOP or below it? Both are real paths."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _existing_dir(role: str, path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{role} does not exist: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(f"{role} is a stale FUSE mount: {path} (unmount it: fusermount3 -u {path})") from None
        raise ConfigError(f"{role} cannot be used: {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{role} is not a directory: {path}")
    return os.path.realpath(path)


def mount_points() -> set[str]:
    """Every mount point in this mount namespace."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            field = _OCTAL_ESCAPE.sub(lambda escape: bytes([int(escape[1], 8)]), line.split(b" ")[4])
            points.add(os.fsdecode(field))  # field 5
    return points


def check_fuse_device(path: str = FUSE_DEVICE) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot use {path}: {exc.strerror}"
                          " (load the fuse module, or make the device accessible)") from None
    st = os.fstat(fd)
    os.close(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE_NUMBER:
        raise ConfigError(f"cannot use {path}: it is not the FUSE device (char 10:229)")


def validate(config: MountConfig) -> None:
    """Raise ConfigError, with a one-line reason, unless CONFIG can be mounted."""
    if not config.lowers:
        raise ConfigError("no lower directory given (--lower DIR or -o lowerdir=DIR)")
    if len(config.lowers) > MAX_LOWERS:
        raise ConfigError(f"too many lower directories, limit is {MAX_LOWERS}")
    if bool(config.upper) != bool(config.workdir):
        raise ConfigError("an upper directory needs a workdir, and a workdir needs an upper directory")
    lowers = [_existing_dir("lower directory", path) for path in config.lowers]
    upper = config.upper and _existing_dir("upper directory", config.upper)
    workdir = config.workdir and _existing_dir("workdir", config.workdir)
    mountpoint = _existing_dir("mountpoint", config.mountpoint)

    if upper and workdir:
        if os.stat(upper).st_dev != os.stat(workdir).st_dev:
            raise ConfigError(f"upper directory and workdir are on different filesystems: {upper}, {workdir}")
        if _inside(workdir, upper) or _inside(upper, workdir):
            raise ConfigError(f"upper directory and workdir overlap: {upper}, {workdir}")
        for lower in lowers:
            for name, path in (("upper directory", upper), ("workdir", workdir)):
                if _inside(path, lower) or _inside(lower, path):
                    raise ConfigError(f"{name} and lower directory overlap: {path}, {lower}")

    # The daemon reaches layers through fds opened before the mount. A mountpoint strictly inside a
    # layer would route the daemon's own lookups back into the union and hang it; a mountpoint on a
    # lower itself is fine (the union then covers that lower, as an overlay over it would).
    for role, path in [("upper directory", upper), ("workdir", workdir)]:
        if path and _inside(mountpoint, path):
            raise ConfigError(f"mountpoint is inside the {role}: {mountpoint}")
    for lower in lowers:
        if mountpoint != lower and _inside(mountpoint, lower):
            raise ConfigError(f"mountpoint is inside a lower directory: {mountpoint} (in {lower})")
    if mountpoint in mount_points():
        raise ConfigError(f"mountpoint is already mounted: {mountpoint} (unmount it first)")
    check_fuse_device()
