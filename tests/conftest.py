from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from unionfs.forkserver import client as fork_client
from unionfs.forkserver import server as fork_server

from launchers import ROOTLESS_USER, Launcher, build_image, unprivileged_launcher
from mounts import daemons_for, force_unmount, is_mounted


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the tests mount FUSE and overlay filesystems: run them as root")


@pytest.fixture(scope="session", autouse=True)
def fork_servers() -> Path:
    """The fork servers the tests' mounts start (for root, the rootless user, and podman's user
    namespaces) live in a directory of the session's own, and are stopped at its end."""
    base = Path(tempfile.mkdtemp(prefix="pyunionfs-fork."))
    base.chmod(0o1777)  # each user makes its own 0700 directory in it
    os.environ[fork_client.DIRECTORY] = str(base)
    yield base
    del os.environ[fork_client.DIRECTORY]
    fork_server.stop_all(str(base))
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mnt(tmp_path: Path):
    """A mountpoint that is checked to be unmounted, with no daemon left, after the test."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    leftover = is_mounted(path)
    force_unmount(path)
    daemons = daemons_for(path)
    deadline = time.monotonic() + 5
    while daemons and time.monotonic() < deadline:  # an unmounted daemon may still be exiting
        time.sleep(0.05)
        daemons = daemons_for(path)
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"{path} was left mounted"
    assert not daemons, f"pyunionfs processes left running: {daemons}"


@pytest.fixture
def shared_tmp() -> Path:
    """A temporary directory other users can reach (pytest's own base directory is 0700), for
    tests that act as another user."""
    path = Path(tempfile.mkdtemp(prefix="pyunionfs-test."))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=["root", "rootless"])
def launcher(request, tmp_path_factory) -> Launcher:
    """`pyunionfs run` on a busybox image, as root and (the rootless tier) as the unprivileged user."""
    if request.param == "root":
        scratch = tmp_path_factory.mktemp("run")
        yield Launcher(build_image(scratch / "image"), scratch)
        return
    user = os.environ.get(ROOTLESS_USER)
    if not user:
        pytest.skip(f"the rootless tier needs an unprivileged user with subuid ranges in ${ROOTLESS_USER} "
                    "(scripts/test.sh creates one)")
    # Under /tmp, not pytest's 0700 base directory, which the user could not enter.
    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-rootless-test."))
    yield unprivileged_launcher(user, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
