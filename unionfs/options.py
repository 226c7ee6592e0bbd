"""Mount configuration from either command-line form, with fuse-overlayfs's -o conventions."""
from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""


# Options the kernel or libfuse understands: passed on to the FUSE mount.
FUSE_FLAGS = frozenset({
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "diratime", "nodiratime", "allow_other", "default_permissions",
})
FUSE_VALUED = frozenset({"fsname", "subtype", "max_read", "blksize", "context", "fscontext",
                         "defcontext", "rootcontext"})
OPPOSITE_FLAGS = {a: b for x, y in (("rw", "ro"), ("dev", "nodev"), ("suid", "nosuid"),
                                    ("exec", "noexec"), ("atime", "noatime"))
                  for a, b in ((x, y), (y, x))}
# Options only mount(8) and fstab use; mount.fuse3 may hand them on. Accepted and dropped.
MOUNT_ONLY_FLAGS = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                              "group", "nofail", "_netdev"})
MOUNT_ONLY_PREFIXES = ("x-", "comment=")


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
    sync: bool = True  # -o fsync=0 (as fuse-overlayfs): copies are not synced, fsync(2) is a no-op

    @property
    def read_only(self) -> bool:
        return self.upper is None or "ro" in self.fuse_flags

    def add_flag(self, flag: str) -> None:
        """Add a FUSE flag; the later of two opposite flags (ro after rw, ...) wins."""
        self.fuse_flags.discard(OPPOSITE_FLAGS.get(flag, ""))
        self.fuse_flags.add(flag)

    def fuse_options(self) -> set[str]:
        """The option set handed to pyfuse3.init()."""
        # Like fuse-overlayfs as root: allow_other so every uid can use the union, suid so
        # setuid programs in a container root work; the kernel checks permissions.
        opts = {"default_permissions", "allow_other"}
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


def apply_option_string(config: MountConfig, text: str) -> None:
    """Apply one -o argument: comma-separated, with lowerdir/upperdir/workdir as for overlay."""
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
        elif key == "redirect_dir" and value in ("on", "off"):
            config.redirect_dirs = value == "on"
        elif key == "fsync" and value in ("0", "1"):
            config.sync = value == "1"
        elif not has_value and key in FUSE_FLAGS:
            config.add_flag(key)
        elif has_value and key in FUSE_VALUED:
            config.fuse_values[key] = value
        elif opt in MOUNT_ONLY_FLAGS or opt.startswith(MOUNT_ONLY_PREFIXES):
            continue
        else:
            raise ConfigError(f"unknown mount option: {opt}")
