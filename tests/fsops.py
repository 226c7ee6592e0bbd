"""Random filesystem operations, applied identically to two mounts, with comparable outcomes."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import random
import stat
from pathlib import Path
from typing import Callable

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _stat_summary(path: str) -> tuple:
    st = os.lstat(path)
    nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, nlink


# Every open is non-blocking: an open of a fifo must not wait for a peer.
NONBLOCK = os.O_NONBLOCK


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | NONBLOCK)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return hashlib.sha256(b"".join(chunks)).hexdigest()[:16]
    finally:
        os.close(fd)


def _write_at(path: str, offset: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | NONBLOCK, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _append(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | NONBLOCK)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _fallocate(path: str, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY | NONBLOCK)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _create_excl(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NONBLOCK, 0o640))


def _truncate_open(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC | NONBLOCK))


def _rmtree(path: str) -> list[str]:
    """rm -rf, bottom up; the outcome is what it removed, in order."""
    removed = []
    if os.path.isdir(path) and not os.path.islink(path):
        for name in sorted(os.listdir(path)):
            removed += _rmtree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)
    removed.append(os.path.basename(path))
    return removed


def _listxattr(path: str) -> list[str]:
    return sorted(os.listxattr(path, follow_symlinks=False))


def _getxattr(path: str, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


class OpGenerator:
    """A seeded stream of operations over a fixed pool of relative paths."""

    def __init__(self, seed: int, paths: list[str]):
        self.rng = random.Random(seed)
        self.paths = paths

    def _path(self) -> str:
        return self.rng.choice(self.paths)

    def next(self) -> tuple[str, Callable[[Path], object]]:
        rng = self.rng
        p, q = self._path(), self._path()
        data = rng.randbytes(rng.choice([1, 100, 5000]))
        offset = rng.choice([0, 0, 10, 4096, 70000])
        mode = rng.choice([0o600, 0o644, 0o755, 0o4755, 0o000])
        owner = rng.choice([0, 1000, 65534])
        ns = rng.randint(0, 2**40) * 1000
        xname = rng.choice(["user.a", "user.b", "trusted.overlay.fake", "trusted.t"])
        falloc_mode = rng.choice([0, 1, 3])  # allocate, keep size, punch a hole
        ops: list[tuple[int, str, Callable[[Path], object]]] = [
            (8, f"write {p} @{offset}", lambda m: _write_at(str(m / p), offset, data)),
            (4, f"append {p}", lambda m: _append(str(m / p), data)),
            (8, f"read {p}", lambda m: _read(str(m / p))),
            (6, f"stat {p}", lambda m: _stat_summary(str(m / p))),
            (4, f"listdir {p}", lambda m: sorted(os.listdir(m / p))),
            (3, f"truncate {p}", lambda m: os.truncate(m / p, offset)),
            (2, f"fallocate {p} mode {falloc_mode}", lambda m: _fallocate(str(m / p), falloc_mode, offset, 8192)),
            (2, f"open-trunc {p}", lambda m: _truncate_open(str(m / p))),
            (3, f"create-excl {p}", lambda m: _create_excl(str(m / p))),
            (5, f"unlink {p}", lambda m: os.unlink(m / p)),
            (4, f"mkdir {p}", lambda m: os.mkdir(m / p, mode | 0o700)),
            (3, f"rmdir {p}", lambda m: os.rmdir(m / p)),
            (2, f"rmtree {p}", lambda m: _rmtree(str(m / p))),
            (5, f"rename {p} {q}", lambda m: os.rename(m / p, m / q)),
            (2, f"rename-noreplace {p} {q}", lambda m: renameat2(str(m / p), str(m / q), RENAME_NOREPLACE)),
            (2, f"rename-exchange {p} {q}", lambda m: renameat2(str(m / p), str(m / q), RENAME_EXCHANGE)),
            (3, f"link {p} {q}", lambda m: os.link(m / p, m / q, follow_symlinks=False)),
            (2, f"symlink {p}", lambda m: os.symlink(q, m / p)),
            (2, f"readlink {p}", lambda m: os.readlink(m / p)),
            (3, f"chmod {p} {mode:o}", lambda m: os.chmod(m / p, mode, follow_symlinks=True)),
            (3, f"chown {p} {owner}", lambda m: os.chown(m / p, owner, owner, follow_symlinks=False)),
            (2, f"utime {p}", lambda m: os.utime(m / p, ns=(ns, ns), follow_symlinks=False)),
            (2, f"setxattr {p} {xname}", lambda m: os.setxattr(m / p, xname, data[:50], follow_symlinks=False)),
            (1, f"removexattr {p} {xname}", lambda m: os.removexattr(m / p, xname, follow_symlinks=False)),
            (2, f"listxattr {p}", lambda m: _listxattr(str(m / p))),
            (2, f"getxattr {p} {xname}", lambda m: _getxattr(str(m / p), xname)),
            (1, f"mkfifo {p}", lambda m: os.mkfifo(m / p, 0o644)),
        ]
        weights = [w for w, _, _ in ops]
        _, label, action = rng.choices(ops, weights=weights)[0]
        return label, action


def outcome(action: Callable[[Path], object], mount: Path) -> tuple:
    try:
        return ("ok", action(mount))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno, exc.errno))
