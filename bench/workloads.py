"""What is timed. Each workload runs against ROOT, the union's mountpoint (or, for native, the
plain directory holding the same tree). Union systems get a fresh mount and an empty upper for
every measurement; on native, `undo` puts the directory back after a workload that writes."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import podman
from bench.dataset import BIG_FILE, GIT_REPO, HUGE_DIR, Dataset, huge_dir_layer

CHUNK = 1 << 20


@dataclass(frozen=True)
class Context:
    root: Path
    dataset: Dataset


Step = Callable[[Context], None]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    run: Step | None  # None for what the runner times itself (see starter)
    cold: bool = False  # caches dropped before the timed run
    warm_up: bool = False  # one untimed run first
    prepare: Step | None = None  # untimed, after the mount
    undo: Step | None = None  # native only
    # Timed by the runner, per system: "mount" (the mount alone), "bwrap" (mount, bwrap, umount), "podman" (podman run on
    # the system's storage), "engine" (the system's own run, else podman's), "load" (image load).
    starter: str | None = None
    huge_dir: bool = False  # on the huge-dir layer (dataset.huge_dir_layer) instead of the tree

    def lowers(self, dataset: Dataset) -> list[Path]:
        return [huge_dir_layer(dataset)] if self.huge_dir else dataset.lowers

    def native(self, dataset: Dataset) -> Path:
        return huge_dir_layer(dataset) if self.huge_dir else dataset.native

    @property
    def timed_by_runner(self) -> bool:
        return self.starter is not None


def _quiet(*argv: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(arg) for arg in argv], stdout=subprocess.DEVNULL, check=True, cwd=cwd)


def _piped_to_null(command: str) -> None:
    """COMMAND's output read to the end (GNU tar skips reading files when it writes to /dev/null)."""
    subprocess.run(["sh", "-c", f"{command} | cat >/dev/null"], check=True)


def _find(ctx: Context) -> None:
    _quiet("find", ctx.root)


def _find_ls(ctx: Context) -> None:
    _quiet("find", ctx.root, "-ls")


def _ls_lr(ctx: Context) -> None:
    _quiet("ls", "-lR", ctx.root)


def _stat_huge_dir(ctx: Context) -> None:
    """List the huge directory and stat each entry (find's -printf %s needs an lstat of each)."""
    _quiet("find", ctx.root / HUGE_DIR, "-printf", "%s\n")


def _tar_tree(ctx: Context) -> None:
    _piped_to_null(f"tar cf - -C {ctx.root} tree")


def _top_dirs(ctx: Context) -> list[str]:
    return sorted(os.listdir(ctx.dataset.native / "tree"))


def _two_readers(ctx: Context) -> None:
    """Two tars at once, each over half the tree."""
    dirs = _top_dirs(ctx)
    halves = [" ".join(f"tree/{d}" for d in dirs[i::2]) for i in (0, 1)]
    readers = [subprocess.Popen(["sh", "-c", f"tar cf - -C {ctx.root} {half} | cat >/dev/null"])
               for half in halves if half]  # the quick tree may have one top directory only
    if any(reader.wait() != 0 for reader in readers):
        raise RuntimeError("a reader failed")


def _read_through(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, CHUNK):
            pass
    finally:
        os.close(fd)


def _seq_read(ctx: Context) -> None:
    _read_through(ctx.root / BIG_FILE)


def _cache_big_file_below(ctx: Context) -> None:
    """Read the big file where the system under test reads it from (the lower layer, or the
    plain directory for native), bypassing any FUSE mount, so only the mount's own path is timed."""
    below = [ctx.root] if ctx.root == ctx.dataset.native else ctx.dataset.lowers
    _read_through(next(layer / BIG_FILE for layer in below if (layer / BIG_FILE).exists()))


def _write_big(ctx: Context, sync: bool) -> None:
    chunk = b"w" * CHUNK
    fd = os.open(ctx.root / "written", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(ctx.dataset.scale.big_file // CHUNK):
            os.write(fd, chunk)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove_written(ctx: Context) -> None:
    os.unlink(ctx.root / "written")


def _random_reads(ctx: Context) -> None:
    rng = random.Random(4096)
    blocks = ctx.dataset.scale.big_file // 4096
    fd = os.open(ctx.root / BIG_FILE, os.O_RDONLY)
    try:
        for _ in range(ctx.dataset.scale.random_reads):
            os.pread(fd, 4096, rng.randrange(blocks) * 4096)
    finally:
        os.close(fd)


def _append_byte(ctx: Context) -> None:
    with open(ctx.root / BIG_FILE, "ab") as f:
        f.write(b"x")


def _truncate_big(ctx: Context) -> None:
    os.truncate(ctx.root / BIG_FILE, ctx.dataset.scale.big_file)


def _lower_files(ctx: Context) -> list[Path]:
    """The first chmod_files files of the tree, in a fixed order."""
    files: list[Path] = []
    for top in _top_dirs(ctx):
        for sub in sorted(os.listdir(ctx.dataset.native / "tree" / top)):
            names = sorted(os.listdir(ctx.dataset.native / "tree" / top / sub))
            files += [Path("tree") / top / sub / name for name in names]
            if len(files) >= ctx.dataset.scale.chmod_files:
                return files[:ctx.dataset.scale.chmod_files]
    return files


def _chmod_to(mode: int) -> Step:
    def chmod(ctx: Context) -> None:
        for path in _lower_files(ctx):
            os.chmod(ctx.root / path, mode)
    return chmod


def _utime_target(ctx: Context) -> Path:
    return ctx.root / _lower_files(ctx)[0]


def _utime_loop(ctx: Context) -> None:
    target = _utime_target(ctx)
    for _ in range(ctx.dataset.scale.round_trips):
        os.utime(target)


def _untar(ctx: Context) -> None:
    _quiet("tar", "xf", ctx.dataset.tarball, "-C", ctx.root)


def _remove_untarred(ctx: Context) -> None:
    shutil.rmtree(ctx.root / "untar")


def _compile_dirs(ctx: Context) -> list[Path]:
    return [ctx.root / "tree" / d for d in _top_dirs(ctx)[:5]]


def _compileall(ctx: Context) -> None:
    _quiet(sys.executable, "-m", "compileall", "-q", *_compile_dirs(ctx))


def _remove_bytecode(ctx: Context) -> None:
    for top in _compile_dirs(ctx):
        for parent, dirs, _ in os.walk(top):
            if "__pycache__" in dirs:
                shutil.rmtree(os.path.join(parent, "__pycache__"))


def _git_status(ctx: Context) -> None:
    _quiet("git", "-c", "safe.directory=*", "status", "--porcelain", cwd=ctx.root / GIT_REPO)


WORKLOADS = [
    Workload("find-cold", "find over the tree, caches dropped", _find, cold=True),
    Workload("find-warm", "find over the tree, second run", _find, warm_up=True),
    Workload("find-ls-cold", "find -ls, caches dropped", _find_ls, cold=True),
    Workload("find-ls-warm", "find -ls, second run", _find_ls, warm_up=True),
    Workload("ls-lR-cold", "ls -lR, caches dropped", _ls_lr, cold=True),
    Workload("ls-lR-warm", "ls -lR, second run", _ls_lr, warm_up=True),
    Workload("tar-read", "tar of every small file, read to the end, caches dropped", _tar_tree, cold=True),
    Workload("seq-read", "sequential read of the big lower file, caches dropped", _seq_read, cold=True),
    Workload("seq-read-cached", "the same read, with the file already cached below the mount (no disk)",
             _seq_read, prepare=_cache_big_file_below),
    Workload("seq-write", "sequential write of a new file as big as the big one", lambda ctx: _write_big(ctx, False),
             undo=_remove_written),
    Workload("seq-write-fsync", "the same, with fsync before close", lambda ctx: _write_big(ctx, True),
             undo=_remove_written),
    Workload("rand-read-4k", "4 KiB reads at random offsets of the big file, caches dropped", _random_reads,
             cold=True),
    Workload("copy-up-append", "append one byte to the big lower file (copies it up)", _append_byte,
             undo=_truncate_big),
    Workload("copy-up-chmod", "chmod of lower files (copies each up)", _chmod_to(0o600), undo=_chmod_to(0o644)),
    Workload("setattr-loop", "utime() of one file 20,000 times (500 at --quick): a round trip to the daemon "
             "each, nothing from disk", _utime_loop, prepare=lambda ctx: os.utime(_utime_target(ctx))),
    Workload("untar", "unpack the small-file tarball", _untar, undo=_remove_untarred),
    Workload("rm-rf", "rm -rf of the unpacked files", lambda ctx: _quiet("rm", "-rf", ctx.root / "untar"),
             prepare=_untar),
    Workload("compileall", "python -m compileall over part of the tree", _compileall, undo=_remove_bytecode),
    Workload("git-status", "git status in a checked-in tree, second run", _git_status, warm_up=True),
    Workload("two-readers", "two tars at once over the two halves of the tree, caches dropped", _two_readers,
             cold=True),
    Workload("huge-dir", "list and stat one directory of 300,000 empty files (3,000 at --quick), caches "
             "dropped: time and the daemon's peak RSS", _stat_huge_dir, cold=True, huge_dir=True),
    Workload("mount-start", "mount the busybox image with an empty upper: the mount command until the "
             "mount is live, unmount untimed (median of several; native: a bind mount)", None, starter="mount"),
    Workload("container-start", "start `true` in a container on a busybox image (median of several)",
             None, starter="bwrap"),
    Workload("podman-run", "podman run --rm of `true` on a busybox image, the system as podman's storage "
             "(median of several; when podman is installed)", None, starter="podman"),
    Workload("run-true", "run --rm of `true` on a busybox image by the system's own engine (pyunionfs run), "
             "else podman with the system as its storage (median of several; when podman is installed)",
             None, starter="engine"),
    Workload("image-load", "load of a podman-saved image (debootstrap minbase; busybox at --quick) into an "
             "empty store: the system's own engine (pyunionfs load), else podman load with the system as its "
             "storage; native: tar -x of the image's layers (when podman is installed)", None, starter="load"),
]
BY_NAME = {workload.name: workload for workload in WORKLOADS}


def available(workload: Workload) -> bool:
    """Can WORKLOAD run on this machine? Those that use podman need it."""
    return workload.starter in (None, "mount", "bwrap") or podman.available()
