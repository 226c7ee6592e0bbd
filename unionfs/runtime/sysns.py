"""Namespace, mount and process-control system calls for the launcher, through cffi."""
from __future__ import annotations

import os
import select
import signal

from unionfs.errors import EXIT_LAUNCHER_ERROR
from unionfs.runtime._sys import ffi, lib

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = ffi.errno
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return rc


def unshare(flags: int) -> None:
    _check(lib.unshare(flags), "unshare")


def _c_string(text: str | None):
    return ffi.NULL if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(lib.mount(_c_string(source), _c_string(target), _c_string(fstype), flags, _c_string(data)),
           f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(lib.umount2(os.fsencode(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(lib.ufs_pivot_root(os.fsencode(new_root), os.fsencode(put_old)), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(lib.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int = 0) -> None:
    _check(lib.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def open_in_root(root_fd: int, path: str, flags: int, resolve: int = 0) -> int:
    """openat2(2) of PATH with ROOT_FD as its root (RESOLVE_IN_ROOT): absolute symlinks and ".."
    stay inside it, as they would for a process chrooted there; magic links are not followed."""
    code = lib.ufs_openat2(root_fd, os.fsencode(path), flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | resolve)
    if code < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err), path)
    return code


def make_read_only(fd: int) -> None:
    """The mount FD is the root of, and every mount below it, read-only (mount_setattr(2))."""
    _check(lib.ufs_mount_setattr(fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, MOUNT_ATTR_RDONLY), "mount_setattr")


def load_seccomp_filter(program: bytes) -> None:
    """PROGRAM (classic BPF, as libseccomp exports it) as this process's seccomp filter: for
    good, across exec, for every child. No_new_privs must be set."""
    _check(lib.ufs_load_seccomp_filter(program, len(program)), "seccomp filter")


def setns(fd: int, nstype: int) -> None:
    _check(lib.setns(fd, nstype), "setns")


def fork_dying_with_parent() -> int:
    """fork(); the child gets SIGKILL when this process dies, also when that happens before the
    child could ask for it: a pipe whose write end only this process holds tells."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive_r], [], [], 0)[0]:  # end of file: the parent is gone already
            os._exit(EXIT_LAUNCHER_ERROR)
        os.close(alive_r)
        return 0
    os.close(alive_r)  # alive_w stays open as long as this process lives
    return pid
