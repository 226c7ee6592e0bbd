"""`pyunionfs run` as the tests start it: on a tiny busybox image, as root or as an unprivileged
user with subordinate ids (the rootless tier)."""
from __future__ import annotations

import functools
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.forkserver import client as fork_client

from mounts import PYUNIONFS

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
ROOTLESS_USER = "PYUNIONFS_ROOTLESS_USER"  # an unprivileged user with /etc/subuid ranges


def build_image(root: Path) -> Path:
    """A tiny image: busybox and its applets, /etc/passwd, and a file that is not executable."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "data").write_text("from the image\n")
    (root / "box").mkdir()
    (root / "box" / "item").write_text("in the image\n")
    (root / "not-executable").write_text("#!/bin/sh\necho never\n")
    return root


@dataclass
class Launcher:
    """Runs `pyunionfs run` on an image, as root or as an unprivileged user (the rootless tier)."""
    image: Path
    scratch: Path  # where this launcher's user may create directories
    prefix: list[str] = field(default_factory=list)  # drops to the user
    owner: tuple[int, int] | None = None

    def command(self, *args: str) -> list[str]:
        # The launcher's scratch directory goes below ours: one it cannot remove (killed) is
        # removed with ours.
        return [*self.prefix, "env", f"TMPDIR={self.tmp}", PYUNIONFS, "run", "--lower", str(self.image), *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)

    def run_sh(self, script: str, *options: str) -> subprocess.CompletedProcess:
        return self.run(*options, "--", "sh", "-c", script)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), **kwargs)

    @functools.cached_property
    def tmp(self) -> Path:
        return self.directory("tmp")

    def directory(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.scratch))
        if self.owner:
            os.chown(path, *self.owner)
        return path


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


def unprivileged_prefix(user: str, scratch: Path) -> tuple[list[str], tuple[int, int]]:
    """What runs a command as USER (with subordinate ids), in a clean environment with SCRATCH as
    home, and a usable FUSE node of its own in SCRATCH, since this machine's /dev/fuse is 0600
    root; and USER's uid and gid."""
    account = pwd.getpwnam(user)
    uid, gid = account.pw_uid, account.pw_gid
    scratch.chmod(0o755)
    fuse = scratch / "fuse"
    os.mknod(fuse, 0o600 | stat.S_IFCHR, os.makedev(10, 229))
    os.chown(fuse, uid, gid)
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
              "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={scratch}",
              f"PYUNIONFS_FUSE_DEVICE={fuse}",
              *[f"{name}={os.environ[name]}" for name in (fork_client.DIRECTORY,) if name in os.environ]]
    return prefix, (uid, gid)


def unprivileged_launcher(user: str, scratch: Path) -> Launcher:
    """The rootless tier: a user-owned image, run by USER (see unprivileged_prefix)."""
    prefix, owner = unprivileged_prefix(user, scratch)
    image = build_image(scratch / "image")
    chown_tree(image, *owner)
    return Launcher(image, scratch, prefix, owner)
