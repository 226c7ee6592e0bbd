"""Mount configuration from either command-line form, with fuse-overlayfs's -o conventions."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from unionfs.errors import ConfigError
from unionfs.fs.idmap import MAX_ID, IdMap, MappedRange, overflow_id, parse_ranges


# Options the kernel or libfuse understands: passed on to the FUSE mount.
FUSE_FLAGS = frozenset({
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "diratime", "nodiratime", "allow_other", "default_permissions",
})
FUSE_VALUED = frozenset({"fsname", "subtype", "max_read", "blksize", "context", "fscontext",
                         "defcontext", "rootcontext"})
FUSE_NUMBERS = frozenset({"max_read", "blksize"})
# Flags fuse-overlayfs takes and drops (allow_root: the union always allows every user; the rest
# are libfuse 2 tuning that libfuse 3 decides itself). Accepted and dropped here too.
ACCEPTED_FLAGS = frozenset({"allow_root", "splice_read", "splice_write", "splice_move", "kernel_cache",
                            "max_write"})
OPPOSITE_FLAGS = {a: b for x, y in (("rw", "ro"), ("dev", "nodev"), ("suid", "nosuid"),
                                    ("exec", "noexec"), ("atime", "noatime"))
                  for a, b in ((x, y), (y, x))}
# Options only mount(8) and fstab use; mount.fuse3 may hand them on. Accepted and dropped.
MOUNT_ONLY_FLAGS = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                              "group", "nofail", "_netdev"})
MOUNT_ONLY_PREFIXES = ("x-", "comment=")


# Entries and attributes may be cached this long (seconds): layers do not change behind the
# union's back (kernel overlayfs assumes the same). fuse-overlayfs's timeout= changes it.
DEFAULT_TIMEOUT = 1e6


@dataclass
class MountConfig:
    lowers: list[str]  # top first
    mountpoint: str
    upper: str | None = None
    workdir: str | None = None
    source: str = "pyunionfs"
    fuse_flags: set[str] = field(default_factory=set)
    fuse_values: dict[str, str] = field(default_factory=dict)
    redirect_dirs: bool = True  # -o redirect_dir=off: EXDEV on renaming merged directories
    # -o fsync=0 or volatile (as fuse-overlayfs): copies are not synced, fsync(2) is a no-op
    sync: bool = True
    debug: bool = False  # -o debug, as -d
    # fuse-overlayfs's owner shifting and squashing (unionfs/idmap.py)
    uid_ranges: tuple[MappedRange, ...] = ()
    gid_ranges: tuple[MappedRange, ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None
    squash_to_root: bool = False
    static_nlink: bool = False  # every directory has st_nlink 1
    acl: bool = True  # -o noacl: the kernel ignores POSIX ACLs
    xattrs: bool = True  # -o noxattrs=1: no extended attributes through the mount
    xattr_permissions: int = 0  # owners and modes kept in an override_stat xattr (1 or 2)
    timeout: float = DEFAULT_TIMEOUT
    user_xattr: bool = False  # -o userxattr: overlay metadata in user.overlay.*, as the kernel's
    passthrough: bool = True  # -o passthrough=off: the daemon serves every read and write

    @property
    def read_only(self) -> bool:
        return self.upper is None or "ro" in self.fuse_flags

    def add_flag(self, flag: str) -> None:
        """Add a FUSE flag; the later of two opposite flags (ro after rw, ...) wins."""
        self.fuse_flags.discard(OPPOSITE_FLAGS.get(flag, ""))
        self.fuse_flags.add(flag)

    def id_maps(self) -> tuple[IdMap, IdMap]:
        """The uid and gid mappings; squash_to_uid/gid take precedence over squash_to_root."""
        root = 0 if self.squash_to_root else None
        uid_squash = self.squash_uid if self.squash_uid is not None else root
        gid_squash = self.squash_gid if self.squash_gid is not None else root
        return (IdMap(self.uid_ranges, uid_squash, overflow_id("uid")),
                IdMap(self.gid_ranges, gid_squash, overflow_id("gid")))

    def fuse_options(self) -> set[str]:
        """The option set handed to pyfuse3.init()."""
        # Like fuse-overlayfs: the kernel checks permissions; as root also allow_other, so every
        # uid can use the union, and suid, so setuid programs in a container root work. A plain
        # user mounts through the setuid fusermount3, which refuses allow_other (unless
        # /etc/fuse.conf allows it) and makes the mount nosuid anyway.
        opts = {"default_permissions"}
        if os.geteuid() == 0:
            opts.add("allow_other")
            if OPPOSITE_FLAGS["suid"] not in self.fuse_flags:
                opts.add("suid")
        opts |= self.fuse_flags
        values = {"fsname": self.source, "subtype": "pyunionfs"} | self.fuse_values
        opts |= {f"{key}={value}" for key, value in values.items()}
        if self.read_only:
            opts.discard("rw")
            opts.add("ro")
        return opts


def split_escaped(text: str, sep: str) -> list[str]:
    """Split TEXT at SEP, where a backslash escapes the next character (so "\\:" is a colon)."""
    parts, current, chars = [], [], iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    return "".join(split_escaped(text, "\0"))


def split_keep_escapes(text: str, sep: str) -> list[str]:
    """Split TEXT at unescaped SEP, keeping backslashes for a later split_escaped()."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _number(key: str, value: str, choices: int | None = None, below: int | None = None) -> int:
    """VALUE as a number: in 0..CHOICES-1 when CHOICES is given, else 0..BELOW-1 (a C int)."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < (choices or below or 1 << 31):
        if choices:
            expected = f"one of {', '.join(map(str, range(choices)))}"
        else:
            expected = f"a number below {below}" if below else "a number"
        raise ConfigError(f"{key}= takes {expected}: {key}={value}")
    return number


def _on_off(key: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise ConfigError(f"{key}= takes on or off: {key}={value}")
    return value == "on"


def _id_ranges(key: str, value: str) -> tuple[MappedRange, ...]:
    try:
        return parse_ranges(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"timeout= takes seconds (a number): timeout={value}")
    return seconds


def _plugins(value: str) -> None:
    if value:
        raise ConfigError(f"plugins= names fuse-overlayfs plugins, which pyunionfs cannot load: {value}")


# fuse-overlayfs's own options with a value (fuse-overlayfs 1.10, main.c ovl_opts): what each sets.
VALUED_OPTIONS = {
    "fsync": lambda c, v: setattr(c, "sync", bool(_number("fsync", v, choices=2))),
    "redirect_dir": lambda c, v: setattr(c, "redirect_dirs", _on_off("redirect_dir", v)),
    "passthrough": lambda c, v: setattr(c, "passthrough", _on_off("passthrough", v)),
    "uidmapping": lambda c, v: setattr(c, "uid_ranges", _id_ranges("uidmapping", v)),
    "gidmapping": lambda c, v: setattr(c, "gid_ranges", _id_ranges("gidmapping", v)),
    "squash_to_uid": lambda c, v: setattr(c, "squash_uid", _number("squash_to_uid", v, below=MAX_ID)),
    "squash_to_gid": lambda c, v: setattr(c, "squash_gid", _number("squash_to_gid", v, below=MAX_ID)),
    "xattr_permissions": lambda c, v: setattr(c, "xattr_permissions", _number("xattr_permissions", v, choices=3)),
    "noxattrs": lambda c, v: setattr(c, "xattrs", not _number("noxattrs", v)),
    "timeout": lambda c, v: setattr(c, "timeout", _timeout(v)),
    # Tuning knobs of fuse-overlayfs's own design, with no counterpart here (see the README):
    # the value is checked as fuse-overlayfs reads it, then not used.
    "threaded": lambda c, v: _number("threaded", v),
    "fast_ino": lambda c, v: _number("fast_ino", v),
    "writeback": lambda c, v: _number("writeback", v),
    "plugins": lambda c, v: _plugins(v),
}
FLAG_OPTIONS = {
    "volatile": lambda c: setattr(c, "sync", False),  # kernel overlayfs's name for no syncing
    "squash_to_root": lambda c: setattr(c, "squash_to_root", True),
    "static_nlink": lambda c: setattr(c, "static_nlink", True),
    "noacl": lambda c: setattr(c, "acl", False),
    "userxattr": lambda c: setattr(c, "user_xattr", True),
    "debug": lambda c: setattr(c, "debug", True),
}


def apply_option_string(config: MountConfig, text: str) -> None:
    """Apply one -o argument: comma-separated, with lowerdir/upperdir/workdir as for overlay. Empty
    elements are skipped (containers/storage writes "workdir=W,,volatile")."""
    for opt in split_keep_escapes(text, ","):
        if not opt:
            continue
        key, has_value, value = opt.partition("=")
        if key == "lowerdir" and has_value:
            config.lowers = [d for d in split_escaped(value, ":") if d]
            if not config.lowers:
                raise ConfigError("lowerdir= names no directory")
        elif key in ("upperdir", "workdir") and has_value:
            setattr(config, "upper" if key == "upperdir" else "workdir", unescape(value))
        elif has_value and key in VALUED_OPTIONS:
            VALUED_OPTIONS[key](config, value)
        elif not has_value and key in FLAG_OPTIONS:
            FLAG_OPTIONS[key](config)
        elif not has_value and key in FUSE_FLAGS:
            config.add_flag(key)
        elif has_value and key in FUSE_VALUED:
            if key in FUSE_NUMBERS:
                _number(key, value)
            config.fuse_values[key] = value
        elif opt in MOUNT_ONLY_FLAGS or opt in ACCEPTED_FLAGS or opt.startswith(MOUNT_ONLY_PREFIXES):
            continue
        else:
            raise ConfigError(f"unknown mount option: {opt}")
