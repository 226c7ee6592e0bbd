"""podman kept away from the host's storage: its own root, runroot, tmpdir and containers.conf
in a scratch directory (its runroot path may have 50 characters at most), with the storage driver
asked for (overlay with a mount program, say), as root or as an unprivileged user (rootless
podman, in its own user namespace). Everything it made is removed afterwards, mounts and
processes included. Used by the podman test tier and the podman-run workload."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tarfile
from pathlib import Path

from unionfs.forkserver import client as fork_client
from unionfs.fs.checks import mount_points

# podman 4.3 on these hosts: crun refuses the hybrid cgroups, there is no CAP_SYS_RESOURCE for
# podman's default rlimits, and no journald (see shared/reference/podman-and-containers-storage.md).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""
FUSE_DEVICE_NUMBER = os.makedev(10, 229)


class PodmanError(RuntimeError):
    """A podman command failed; the message ends with what it said."""


def available() -> bool:
    return all(shutil.which(tool) for tool in ("podman", "runc"))


def mount_program_storage(program: str) -> list[str]:
    """podman's storage arguments for the overlay driver with PROGRAM as its mount program."""
    return ["--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}"]


def image_tarball(root: Path, tarball: Path) -> Path:
    """ROOT packed for `podman import` (a registry is not reachable)."""
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    return tarball


def with_absolute_paths(storage: list[str]) -> list[str]:
    """STORAGE with its mount program found on PATH: containers/storage wants an absolute path."""
    key = "overlay.mount_program="
    return [key + (shutil.which(arg[len(key):]) or arg[len(key):]) if arg.startswith(key) else arg
            for arg in storage]


class Podman:
    """`podman` on the storage in BASE with the STORAGE arguments, run as USER when one is given:
    then in a private mount namespace where /dev/fuse is usable by that user (these hosts have no
    udev, so it is mode 0600; rootless podman mounts with the FUSE device in its user namespace)."""

    def __init__(self, base: Path, storage: list[str], user: str | None = None):
        self.base = base
        self.storage = with_absolute_paths(storage)
        self.user = user
        for name in ("root", "runroot", "tmp", "home", "run"):
            (base / name).mkdir(parents=True, exist_ok=True)
        (base / "containers.conf").write_text(CONTAINERS_CONF)
        if user:
            fuse = base / "fuse-device"
            os.mknod(fuse, 0o666 | stat.S_IFCHR, FUSE_DEVICE_NUMBER)
            os.chmod(fuse, 0o666)
            (base / "run").chmod(0o700)
            subprocess.run(["chown", "-R", f"{user}:", str(base)], check=True)

    def command(self, *args: str) -> list[str]:
        podman = ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "runroot"),
                  "--tmpdir", str(self.base / "tmp"), *self.storage, *args]
        if not self.user:
            return podman
        inner = 'mount --bind "$0" /dev/fuse && exec setpriv --reuid="$1" --regid="$1" --init-groups "${@:2}"'
        return ["unshare", "--mount", "--propagation", "private", "bash", "-c", inner,
                str(self.base / "fuse-device"), self.user, *podman]

    def environment(self) -> dict[str, str]:
        # The fork servers' directory, where the caller chose one (the tests, the bench), so that
        # the servers podman's mounts start are the caller's to stop.
        chosen = {name: os.environ[name] for name in (fork_client.DIRECTORY,) if name in os.environ}
        return {"PATH": os.environ["PATH"], "HOME": str(self.base / "home"), **chosen,
                "XDG_RUNTIME_DIR": str(self.base / "run"), "CONTAINERS_CONF": str(self.base / "containers.conf")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), env=self.environment(), capture_output=True,
                                timeout=timeout, cwd=self.base)
        if check and result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} exited with {result.returncode}: "
                              f"{result.stderr.decode(errors='replace')[-2000:]}")
        return result

    def text(self, *args: str) -> str:
        return self(*args).stdout.decode()

    def close(self) -> None:
        """Remove every container and image, stop the rootless pause process, unmount what is
        left below BASE and remove BASE."""
        self("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        self("rmi", "--all", "--force", check=False, timeout=120)
        for pause in self.base.rglob("pause.pid"):  # in the tmpdir: rootless podman's namespace keeper
            try:
                os.kill(int(pause.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        base = str(self.base)
        for point in sorted(mount_points(), reverse=True):  # containers/storage's own bind mount
            if point.startswith(base + "/"):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
