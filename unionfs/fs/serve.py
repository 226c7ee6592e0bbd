"""Mounting a union and serving it, and unmounting it: what the command line and the container
launcher call. Nothing here imports pyfuse3 until a union is served, and the shim is loaded
before it is (unionfs/fs/shim.py)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Callable

from unionfs.errors import ConfigError
from unionfs.fs import checks
from unionfs.fs.options import MountConfig


def serve(config: MountConfig, foreground: bool = False, debug: bool = False, ready_fd: int = -1,
          forked: bool = False, lifeline_fd: int = -1, answered_fd: int = -1) -> int:
    """Mount CONFIG and serve it (see daemon.serve); DEBUG logs every request, in the foreground."""
    from unionfs.fs import shim

    shim.load()
    from unionfs.fs import daemon

    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s")
    return daemon.serve(config, foreground=foreground or debug, debug=debug, ready_fd=ready_fd, forked=forked,
                        lifeline_fd=lifeline_fd, answered_fd=answered_fd)


def rehearse(config: MountConfig, interrupted: Callable[[], bool]) -> None:
    """Open CONFIG's union and answer requests on it without a mount, until INTERRUPTED() (see
    daemon.rehearse)."""
    from unionfs.fs import shim

    shim.load()
    from unionfs.fs import daemon

    daemon.rehearse(config, interrupted)


def unmount(mountpoint: str) -> None:
    """Unmount a union (the daemon then exits by itself)."""
    path = os.path.abspath(mountpoint)
    if path not in checks.mount_points():
        raise ConfigError(f"not mounted: {path}")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", path] if tool else ["umount", path]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise ConfigError(f"unmounting {path} failed: {detail}")
