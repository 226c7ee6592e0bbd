"""The data every system is measured on: two lower layers of a generated source-like tree (with
a 1 GiB file and a git checkout), the same tree merged into one plain directory for `native`, a
tarball of small files to unpack, a busybox image for container start-up, and (made when a
workload first wants them) a podman-saved image archive and a layer with one huge directory.

Generated from a fixed seed, so every run and every machine gets the same tree; it is built once
per scale and kept (a marker file says it is complete)."""
from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import podman
from bench.systems import BenchError

VERSION = 2  # bump when the generated content changes
SEED = 20261128
BIG_FILE = "big/blob"
GIT_REPO = "repo"


@dataclass(frozen=True)
class Scale:
    name: str
    dirs: int  # directories of the generated tree in the lower layers
    files_per_dir: int
    big_file: int  # bytes of the file read sequentially and copied up
    repo_files: int  # files of the git checkout
    untar_files: int
    chmod_files: int
    random_reads: int
    startup_runs: int  # container starts per measurement (their median is the measurement)
    huge_dir_entries: int  # empty files in the one directory of the huge-dir layer
    round_trips: int  # utime() calls of setattr-loop


FULL = Scale("full", dirs=4_600, files_per_dir=10, big_file=1 << 30, repo_files=3_000,
             untar_files=25_000, chmod_files=1_000, random_reads=5_000, startup_runs=20,
             huge_dir_entries=300_000, round_trips=20_000)
QUICK = Scale("quick", dirs=60, files_per_dir=10, big_file=16 << 20, repo_files=100,
              untar_files=300, chmod_files=50, random_reads=200, startup_runs=3, huge_dir_entries=3_000,
              round_trips=500)


@dataclass(frozen=True)
class Dataset:
    root: Path
    scale: Scale

    @property
    def lowers(self) -> list[Path]:
        """Top layer first, as in lowerdir=."""
        return [self.root / "lower-top", self.root / "lower-base"]

    @property
    def native(self) -> Path:
        return self.root / "native"

    @property
    def tarball(self) -> Path:
        return self.root / "small-files.tar"

    @property
    def image(self) -> Path:
        return self.root / "image"

    def entries(self) -> int:
        """Entries of the merged tree (what a find lists)."""
        return sum(len(dirs) + len(files) for _, dirs, files in os.walk(self.native))


class Content:
    """File contents from one random buffer, sliced at random places: fast, and not all alike."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.buffer = rng.randbytes(1 << 20)

    def data(self, size: int) -> bytes:
        start = self.rng.randrange(len(self.buffer) - min(size, len(self.buffer)) + 1)
        chunk = self.buffer[start:start + size]
        return (chunk * (size // len(chunk) + 1))[:size] if chunk else b""

    def python(self, index: int, size: int) -> bytes:
        """Valid Python source of about SIZE bytes."""
        lines, total = [], 0
        while total < size:
            line = f"def function_{index}_{len(lines)}(x):\n    return x * {len(lines)} + {index}\n\n"
            lines.append(line)
            total += len(line)
        return "".join(lines).encode()


def _file_size(rng: random.Random) -> int:
    return min(int(rng.lognormvariate(7.5, 1.2)), 256 << 10)  # median about 1.8 KiB


def _file_data(content: Content, kind: str, index: int, size: int) -> bytes:
    return content.python(index, size) if kind == "py" else content.data(size)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _generate_tree(base: Path, top: Path, scale: Scale, content: Content) -> None:
    """tree/dNNN/eNN/fNN.{py,txt,dat}: every file in the base layer; the top layer overrides
    one directory in ten in part and adds files, so the union has merged directories."""
    rng = content.rng
    for d in range(scale.dirs):
        directory = Path("tree") / f"d{d // 100:03d}" / f"e{d % 100:02d}"
        overridden = d % 10 == 3
        for f in range(scale.files_per_dir):
            kind = ("py", "txt", "dat")[f % 3]
            name = directory / f"f{f:02d}.{kind}"
            size = _file_size(rng)
            _write(base / name, _file_data(content, kind, d * 100 + f, size))
            if overridden and f % 2 == 0:
                _write(top / name, _file_data(content, kind, d * 100 + f + 50, size // 2))
        if overridden:
            _write(top / directory / "added.txt", content.data(_file_size(rng)))


def _generate_big_file(base: Path, scale: Scale, content: Content) -> None:
    path = base / BIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = content.data(1 << 20)
    with open(path, "wb") as f:
        for offset in range(0, scale.big_file, len(chunk)):
            f.write(chunk[: min(len(chunk), scale.big_file - offset)])


def _generate_repo(base: Path, scale: Scale, content: Content) -> None:
    repo = base / GIT_REPO
    for i in range(scale.repo_files):
        _write(repo / f"src{i % 30:02d}" / f"module{i}.py", content.python(i, _file_size(content.rng)))
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tree"]):
        subprocess.run(["git", "-C", str(repo), *command], env=env, check=True, capture_output=True)


def _generate_tarball(path: Path, scale: Scale, content: Content) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(scale.untar_files):
            info = tarfile.TarInfo(f"untar/p{i // 500:03d}/file{i:05d}.txt")
            data = content.data(_file_size(content.rng) // 4)
            info.size, info.mode, info.mtime = len(data), 0o644, 1767225600
            tar.addfile(info, io.BytesIO(data))


def _generate_image(image: Path) -> None:
    """A busybox root for `true` in a container."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (image / "bin").mkdir(parents=True)
    for name in ("etc", "proc", "dev", "sys", "tmp"):
        (image / name).mkdir()
    shutil.copy(busybox, image / "bin" / "busybox")
    for applet in ("sh", "true"):
        (image / "bin" / applet).symlink_to("busybox")


def _merge(lowers: list[Path], target: Path) -> None:
    """The union of LOWERS (which have no whiteouts) as one plain directory."""
    for lower in reversed(lowers):
        subprocess.run(["cp", "-a", f"{lower}/.", str(target)], check=True)


def prepare(data_dir: Path, scale: Scale, log=print) -> Dataset:
    """The dataset for SCALE under DATA_DIR, generated unless a complete one is there."""
    dataset = Dataset(data_dir / f"dataset-{scale.name}-v{VERSION}", scale)
    marker = dataset.root / ".complete"
    if marker.exists():
        return dataset
    if dataset.root.exists():
        shutil.rmtree(dataset.root)
    log(f"bench: generating the {scale.name} dataset in {dataset.root} (once)")
    top, base = dataset.lowers
    for path in (top, base, dataset.native):
        path.mkdir(parents=True)
    content = Content(random.Random(SEED))
    _generate_tree(base, top, scale, content)
    _generate_big_file(base, scale, content)
    _generate_repo(base, scale, content)
    _generate_tarball(dataset.tarball, scale, content)
    _generate_image(dataset.image)
    _merge(dataset.lowers, dataset.native)
    marker.touch()
    return dataset


HUGE_DIR = "huge"


def huge_dir_layer(dataset: Dataset, log=print) -> Path:
    """A layer holding one directory, huge/, of the scale's number of empty files (made once)."""
    layer = dataset.root / "lower-huge"
    marker = layer / ".complete"
    if marker.exists():
        return layer
    log(f"bench: {dataset.scale.huge_dir_entries} files in one directory for the huge-dir workload (once)")
    shutil.rmtree(layer, ignore_errors=True)
    directory = layer / HUGE_DIR
    directory.mkdir(parents=True)
    for i in range(dataset.scale.huge_dir_entries):
        os.close(os.open(directory / f"entry-{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()
    return layer


def saved_image(dataset: Dataset, log=print) -> Path:
    """A podman-saved image archive (docker-archive) for the image-load workload, made once: a
    debootstrap minbase Debian at full scale (through the Debian mirror), the busybox image at
    quick scale."""
    archive = dataset.root / "saved-image.tar"
    if archive.exists():
        return archive
    scratch = Path(tempfile.mkdtemp(prefix="pm."))  # podman wants a runroot of 50 characters at most
    try:
        rootfs = dataset.image
        if dataset.scale.name != QUICK.name:
            rootfs = scratch / "minbase"
            log("bench: debootstrap --variant=minbase bookworm for the image-load workload (once)")
            if not shutil.which("debootstrap"):
                raise BenchError("the image-load workload needs debootstrap (apt-get install debootstrap)")
            result = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise BenchError(f"debootstrap failed: {result.stderr.strip().splitlines()[-1:]}")
        store = podman.Podman(scratch / "podman", podman.mount_program_storage("fuse-overlayfs"))
        try:
            store("import", str(podman.image_tarball(rootfs, scratch / "rootfs.tar")), "localhost/bench-image")
            store("save", "-o", str(scratch / "saved.tar"), "localhost/bench-image")
        finally:
            store.close()
        shutil.move(scratch / "saved.tar", archive)
        return archive
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
