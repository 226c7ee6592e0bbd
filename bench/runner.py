"""Measuring: interleaved rounds, a fresh mount and an empty upper per measurement, and the FUSE
daemon's CPU time and peak RSS next to the wall-clock time."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from bench import dataset, podman
from bench.dataset import Dataset
from bench.systems import BWRAP_TRUE, BenchError, System, fill
from bench.workloads import Context, Workload
from unionfs.forkserver import client as fork_client
from unionfs.forkserver import server as fork_server
from unionfs.fs.checks import mount_points

MOUNT_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Measurement:
    round: int
    workload: str
    system: str
    seconds: float | None  # None when the workload failed on this system
    daemon_cpu: float | None = None  # user+system seconds of the FUSE daemon during the run
    daemon_peak_rss_kib: int | None = None
    daemon_peak_fds: int | None = None  # the most files it had open, sampled every 10 ms
    # Its proportional set size once the workload is done: a daemon forked by pyunionfs's fork
    # server shares the server's pages, which its RSS counts in full.
    daemon_pss_kib: int | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def schedule(systems: list[str], rounds: int) -> list[list[str]]:
    """The order of the systems in each round, rotated (A B C, B C A, C A B, ...) so that none
    always runs first or right after the same neighbour's cache footprint."""
    return [systems[r % len(systems):] + systems[:r % len(systems)] for r in range(rounds)]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def command_lines() -> dict[int, list[bytes]]:
    """The arguments of every process but this one (processes may end while it looks). A process
    title, as a fork server's FUSE server has (unionfs/forkserver), is one string: its words."""
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    line = f.read().rstrip(b"\0")
            except OSError:
                continue
            lines[int(entry)] = line.split(b"\0") if b"\0" in line else line.split(b" ")
    return lines


def find_daemon(mountpoint: Path) -> int | None:
    """The process serving MOUNTPOINT: the one with it as an argument (kernel mounts have none)."""
    wanted = os.fsencode(mountpoint)
    found = [pid for pid, argv in command_lines().items() if wanted in argv]
    return max(found) if found else None  # a daemon that re-executed itself has the newest pid


def daemon_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _proc_kib(pid: int, name: str, key: str) -> int:
    """The "KEY: N kB" line of /proc/PID/NAME, in KiB (0 when it has none)."""
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def daemon_peak_rss_kib(pid: int) -> int:
    return _proc_kib(pid, "status", "VmHWM")


def daemon_pss_kib(pid: int) -> int:
    return _proc_kib(pid, "smaps_rollup", "Pss")


def new_podman(system: System) -> podman.Podman:
    """An empty podman storage of its own, with SYSTEM's storage arguments."""
    if not system.podman:
        raise BenchError(f"{system.name} has no podman storage arguments (podman = ... in a systems file)")
    # Not below the scratch directory: podman refuses a runroot path longer than 50 characters.
    return podman.Podman(Path(tempfile.mkdtemp(prefix="pm.")), fill(system.podman))


class Mounts:
    """Fresh upper, work and mount directories under SCRATCH, and what mounts on them; for the
    podman-run workload, a podman storage per system with the busybox image in it, made at its
    first use and kept until close()."""

    def __init__(self, scratch: Path, dataset: Dataset):
        self.scratch = scratch
        self.dataset = dataset
        self._stores: dict[str, podman.Podman] = {}
        self._engines: dict[str, list[str]] = {}
        # pyunionfs's fork servers (started by the first mount, as on a user's machine) run this
        # checkout's code and end with the run: a directory of the run's own.
        self.fork_servers = scratch / "fork-servers"
        self.fork_servers.mkdir(mode=0o1777)
        self.fork_servers.chmod(0o1777)
        os.environ[fork_client.DIRECTORY] = str(self.fork_servers)

    def podman_store(self, system: System) -> podman.Podman:
        if system.name not in self._stores:
            store = new_podman(system)
            self._stores[system.name] = store
            store("import", str(podman.image_tarball(self.dataset.image, store.base / "image.tar")),
                  "localhost/busybox")
        return self._stores[system.name]

    def engine_store(self, system: System) -> list[str]:
        """SYSTEM's own engine command on a store of its own with the busybox image, made at its
        first use and kept until close()."""
        if system.name not in self._engines:
            store = Path(tempfile.mkdtemp(prefix="engine.", dir=self.scratch)) / "store"
            engine = fill(system.engine, store=store)
            image_tar = podman.image_tarball(self.dataset.image, store.parent / "image.tar")
            subprocess.run([*engine, "import", str(image_tar), "localhost/busybox"], check=True, capture_output=True)
            self._engines[system.name] = engine
        return self._engines[system.name]

    def wait_for_fork_servers(self) -> None:
        """Until every fork server a mount started (in the background) listens: a first use."""
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while any(not (server / fork_client.SOCKET).exists() for server in self.fork_servers.iterdir()):
            if time.monotonic() > deadline:
                raise BenchError("a fork server did not start")
            time.sleep(0.02)

    def __enter__(self) -> "Mounts":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        self._engines.clear()  # their stores are below SCRATCH, removed with it
        # A mount whose unmount an interrupt cut short (Ctrl-C while fusermount3 ran): SCRATCH is
        # removed next, which must not reach into a union.
        for point in mount_points():
            if Path(point).is_relative_to(self.scratch):
                subprocess.run(["umount", "-l", point], capture_output=True)
        fork_server.stop_all(str(self.fork_servers))
        os.environ.pop(fork_client.DIRECTORY, None)

    def fresh_dirs(self, system: System) -> dict[str, Path]:
        base = self.scratch / system.name
        shutil.rmtree(base, ignore_errors=True)
        dirs = {name: base / name for name in ("upper", "work", "mnt")}
        for path in dirs.values():
            path.mkdir(parents=True)
        return dirs

    def mount(self, system: System, dirs: dict[str, Path], lowers: list[Path]) -> None:
        argv = fill(system.mount, lowers=lowers, **dirs)
        result = subprocess.run(argv, capture_output=True, text=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while result.returncode == 0 and str(dirs["mnt"]) not in mount_points():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if result.returncode != 0 or str(dirs["mnt"]) not in mount_points():
            raise BenchError(f"{system.name} did not mount: {result.stderr.strip() or result.returncode}")

    def unmount(self, system: System, mnt: Path) -> None:
        if str(mnt) in mount_points():
            if subprocess.run(fill(system.umount, mnt=mnt), capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        deadline = time.monotonic() + 10
        while find_daemon(mnt) and time.monotonic() < deadline:  # let the daemon exit
            time.sleep(0.01)

    @contextlib.contextmanager
    def mounted(self, system: System, lowers: list[Path]) -> Iterator[Path]:
        dirs = self.fresh_dirs(system)
        try:  # a mount interrupted on its way up may still come up
            self.mount(system, dirs, lowers)
            yield dirs["mnt"]
        finally:
            self.unmount(system, dirs["mnt"])
            shutil.rmtree(dirs["mnt"].parent, ignore_errors=True)


def measure(system: System, workload: Workload, round_: int, mounts: Mounts) -> Measurement:
    result = Measurement(round_, workload.name, system.name, None)
    try:
        if workload.timed_by_runner:
            result.seconds = STARTERS[workload.starter](system, mounts)
        elif system.is_union:
            with mounts.mounted(system, workload.lowers(mounts.dataset)) as mnt:
                _timed(workload, Context(mnt, mounts.dataset), result, find_daemon(mnt))
        else:
            ctx = Context(workload.native(mounts.dataset), mounts.dataset)
            try:
                _timed(workload, ctx, result, None)
            finally:
                if workload.undo:
                    workload.undo(ctx)
    except (OSError, subprocess.SubprocessError, BenchError, RuntimeError) as exc:
        result.seconds, result.error = None, " ".join(str(exc).split())
    return result


def get_ready(workload: Workload, ctx: Context) -> None:
    """What comes before the clock starts: preparation, a warm-up run, and cold or clean caches."""
    if workload.prepare:
        workload.prepare(ctx)
    if workload.warm_up:
        workload.run(ctx)
    if workload.cold:
        drop_caches()
    else:
        os.sync()  # what earlier measurements left dirty is not written out on this one's clock


def run_timed(workload: Workload, ctx: Context, daemon: int | None) -> tuple[float, float | None]:
    """Run WORKLOAD once on the clock: its seconds, and the CPU seconds of DAEMON (if given)."""
    cpu_before = daemon_cpu(daemon) if daemon else 0.0
    start = time.perf_counter()
    workload.run(ctx)
    seconds = time.perf_counter() - start
    return seconds, daemon_cpu(daemon) - cpu_before if daemon else None


class FdSampler:
    """The most fds process PID has open while the block runs, counted every 10 ms."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))
            if self._done.wait(0.01):
                return

    def __enter__(self) -> "FdSampler":
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.pid:
            self._done.set()
            self._thread.join()


def _timed(workload: Workload, ctx: Context, result: Measurement, daemon: int | None) -> None:
    get_ready(workload, ctx)
    with FdSampler(daemon) as fds:
        result.seconds, cpu = run_timed(workload, ctx, daemon)
    if daemon:
        result.daemon_cpu = cpu
        result.daemon_peak_rss_kib = daemon_peak_rss_kib(daemon)
        result.daemon_peak_fds = fds.peak
        result.daemon_pss_kib = daemon_pss_kib(daemon)


def _mount_starts(system: System, mounts: Mounts) -> float:
    """The median time a mount of the busybox image with an empty upper takes, from the command
    to a live mount (a mount program returns once its mount is live); after one untimed mount,
    which also starts pyunionfs's fork server, as a first use on a machine would. Native: a bind
    mount."""
    image = mounts.dataset.image
    times = []
    for run in range(mounts.dataset.scale.startup_runs + 1):
        dirs = mounts.fresh_dirs(system)
        start = time.perf_counter()
        if system.is_union:
            mounts.mount(system, dirs, [image])
        else:
            subprocess.run(["mount", "--bind", str(image), str(dirs["mnt"])], check=True)
        if run:
            times.append(time.perf_counter() - start)
        if system.is_union:
            mounts.unmount(system, dirs["mnt"])
        else:
            subprocess.run(["umount", str(dirs["mnt"])], check=True)
        shutil.rmtree(dirs["mnt"].parent, ignore_errors=True)
        if not run:
            mounts.wait_for_fork_servers()
    return statistics.median(times)


def _container_starts(system: System, mounts: Mounts) -> float:
    """The median time to start `true` in a container on the busybox image, mount and unmount
    included: SYSTEM's own `run` command, else a mount, bwrap, and an unmount."""
    image = mounts.dataset.image
    times = []
    for _ in range(mounts.dataset.scale.startup_runs):
        dirs = mounts.fresh_dirs(system)
        start = time.perf_counter()
        if system.run:
            subprocess.run(fill(system.run, image=image, **dirs), check=True, capture_output=True)
        elif system.is_union:
            mounts.mount(system, dirs, [image])
            try:
                subprocess.run(fill(BWRAP_TRUE, mnt=dirs["mnt"]), check=True, capture_output=True)
            finally:
                mounts.unmount(system, dirs["mnt"])
        else:
            subprocess.run(fill(BWRAP_TRUE, mnt=image), check=True, capture_output=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(dirs["mnt"].parent, ignore_errors=True)
    return statistics.median(times)


def _podman_runs(system: System, mounts: Mounts) -> float:
    """The median time of `podman run --rm` of `true` on the busybox image, with SYSTEM as
    podman's storage (its mount program, say): the mount, runc and the unmount."""
    store = mounts.podman_store(system)
    return _median_seconds(mounts.dataset.scale.startup_runs, lambda: store(
        "run", "--rm", "--pull=never", "--network=none", "localhost/busybox", "/bin/true"))


def _engine_runs(system: System, mounts: Mounts) -> float:
    """The median time of `run --rm` of `true` on the busybox image by SYSTEM's own container
    engine (its store made once, like podman's); for a system without one, podman's."""
    if not system.engine:
        return _podman_runs(system, mounts)
    engine = mounts.engine_store(system)
    return _median_seconds(mounts.dataset.scale.startup_runs, lambda: subprocess.run(
        [*engine, "run", "--rm", "--net", "none", "localhost/busybox", "/bin/true"], check=True, capture_output=True))


def _image_loads(system: System, mounts: Mounts) -> float:
    """The time to load the saved image into an empty store: SYSTEM's own engine, else podman
    load with SYSTEM as its storage; native: tar -x of the image's layers, one directory each."""
    archive = dataset.saved_image(mounts.dataset)
    scratch = Path(tempfile.mkdtemp(prefix="load.", dir=mounts.scratch))
    os.sync()  # what the last measurement wrote is not written out on this one's clock
    try:
        if system.engine:
            engine = fill(system.engine, store=scratch / "store")
            return _seconds(lambda: subprocess.run([*engine, "load", "-i", str(archive)], check=True,
                                                   capture_output=True))
        if system.is_union:
            store = new_podman(system)
            try:
                return _seconds(lambda: store("load", "-i", str(archive)))
            finally:
                store.close()
        layers = _layer_files(archive, scratch)
        os.sync()
        return _seconds(lambda: _untar_each(layers, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _untar_each(layers: list[Path], scratch: Path) -> None:
    for i, layer in enumerate(layers):
        (scratch / f"layer{i}").mkdir()
        subprocess.run(["tar", "--xattrs", "-xf", str(layer), "-C", str(scratch / f"layer{i}")], check=True)


def _seconds(action: Callable[[], object]) -> float:
    """The wall-clock time ACTION takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _median_seconds(runs: int, action: Callable[[], object]) -> float:
    return statistics.median(_seconds(action) for _ in range(runs))


def _layer_files(archive: Path, scratch: Path) -> list[Path]:
    """The layer tars of a docker-archive, copied out of it (untimed)."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        layers = []
        for i, name in enumerate(manifest[0]["Layers"]):
            path = scratch / f"layer{i}.tar"
            with tar.extractfile(name) as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            layers.append(path)
    return layers


STARTERS = {"mount": _mount_starts, "bwrap": _container_starts, "podman": _podman_runs, "engine": _engine_runs, "load": _image_loads}


def run_all(systems: list[System], workloads: list[Workload], rounds: int, mounts: Mounts,
            record: Callable[[Measurement, int, int], None]) -> list[Measurement]:
    """Every workload on every system, ROUNDS times; RECORD sees each measurement as it is made
    (with how many are done and how many there are)."""
    by_name = {system.name: system for system in systems}
    order = schedule(list(by_name), rounds)
    total, done, measurements = rounds * len(workloads) * len(systems), 0, []
    for round_, names in enumerate(order):
        for workload in workloads:
            for name in names:
                measurement = measure(by_name[name], workload, round_, mounts)
                measurements.append(measurement)
                done += 1
                record(measurement, done, total)
    return measurements
