"""Mounting pyunionfs and kernel overlayfs in tests, always unmounted and reaped afterwards."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Sequence

from bench.runner import command_lines
from unionfs.fs.checks import mount_points

PYUNIONFS = str(Path(sys.executable).with_name("pyunionfs"))


def is_mounted(path: Path | str) -> bool:
    return os.path.realpath(path) in mount_points()


def wait_for_mount(mountpoint: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise AssertionError(f"pyunionfs exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise AssertionError("pyunionfs did not mount in time")
        time.sleep(0.02)


def force_unmount(mountpoint: Path | str) -> None:
    """Unmount whatever is at MOUNTPOINT, lazily if a normal unmount does not work."""
    for command in (["fusermount3", "-u", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(command, capture_output=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mount_args(lowers: Sequence[Path], upper: Path | None = None, workdir: Path | None = None) -> list[str]:
    args = [f"--lower={lower}" for lower in lowers]
    if upper:
        args += [f"--upper={upper}", f"--workdir={workdir}"]
    return args


@contextlib.contextmanager
def pyunionfs(lowers: Sequence[Path], mountpoint: Path, *extra: str, upper: Path | None = None,
              workdir: Path | None = None, stderr: IO | None = None,
              prefix: Sequence[str] = ()) -> Iterator[subprocess.Popen]:
    """pyunionfs in the foreground (-f), so the test owns the daemon's PID; run by PREFIX, if given."""
    command = [*prefix, PYUNIONFS, "mount", *mount_args(lowers, upper, workdir), str(mountpoint), "-f", *extra]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL)
    try:
        wait_for_mount(mountpoint, proc)
        yield proc
    finally:
        force_unmount(mountpoint)
        stop(proc)


def overlay_options(lowers: Sequence[Path], upper: Path | None = None, workdir: Path | None = None,
                    extra: str = "") -> str:
    """An overlay -o string, as containers/storage writes it."""
    opts = "lowerdir=" + ":".join(str(lower) for lower in lowers)
    if upper:
        opts += f",upperdir={upper},workdir={workdir}"
    return opts + (f",{extra}" if extra else "")


@contextlib.contextmanager
def helper_mount(program: str, mountpoint: Path, options: str) -> Iterator[None]:
    """PROGRAM (pyunionfs or fuse-overlayfs) mounted as a mount program, daemonized, with -o
    OPTIONS; unmounted afterwards, and its daemon waited for."""
    subprocess.run([program, "-o", options, str(mountpoint)], check=True, capture_output=True)
    try:
        yield
    finally:
        force_unmount(mountpoint)
        deadline = time.monotonic() + 10
        while daemons_for(mountpoint, program) and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def kernel_overlay(lowers: Sequence[Path], mountpoint: Path, options: str = "", upper: Path | None = None,
                   workdir: Path | None = None) -> Iterator[None]:
    opts = "lowerdir=" + ":".join(str(lower) for lower in lowers)
    if upper:
        opts += f",upperdir={upper},workdir={workdir}"
    if options:
        opts += f",{options}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mountpoint)], check=True)
    try:
        yield
    finally:
        force_unmount(mountpoint)


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


def daemons_for(mountpoint: Path, program: str = "pyunionfs") -> list[int]:
    """PIDs of PROGRAM's processes whose command line names MOUNTPOINT."""
    needle, name = os.fsencode(str(mountpoint)), os.fsencode(os.path.basename(program))
    return [pid for pid, argv in command_lines().items()
            if any(name in arg for arg in argv[:2]) and needle in argv]


def daemon_status(daemon: subprocess.Popen, stderr: Path, key: str) -> int:
    """The number KEY the daemon states on SIGUSR1 ("pyunionfs: nodes=N passthrough=N ..."),
    read from STDERR, its log."""
    seen = stderr.read_text().count(f"{key}=")
    daemon.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while stderr.read_text().count(f"{key}=") == seen:
        assert time.monotonic() < deadline, "the daemon did not answer SIGUSR1"
        time.sleep(0.02)
    return int(stderr.read_text().rsplit(f"{key}=", 1)[1].split()[0])
