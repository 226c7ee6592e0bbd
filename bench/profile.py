"""`python -m bench.profile WORKLOAD`: where a FUSE daemon spends one workload, sampled with
py-spy (a Python daemon's frames; --native adds C frames). The workload runs as the bench runs it
(a fresh mount and upper, the same warm-up and cache state), once, untimed by the bench."""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import dataset, runner, systems, workloads
from bench.cli import DEFAULT_DATA, chosen_workloads, run_command
from bench.systems import BenchError

SPY_START = 1.0  # seconds py-spy takes to attach before the workload starts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("workload", help="one workload (see python -m bench --list)")
    parser.add_argument("--system", default="pyunionfs", help="a FUSE system (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the small dataset")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the dataset is kept")
    parser.add_argument("--rate", type=int, default=250, help="samples per second (default %(default)s)")
    parser.add_argument("--native", action="store_true", help="C frames too (slower sampling)")
    parser.add_argument("--top", type=int, default=15, help="frames listed (default %(default)s)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this file")
    return parser.parse_args(argv)


def summarize(raw: Path, top: int) -> str:
    """The frames holding most samples, on their own (self) and with what they call (total)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue  # the rest of a frame name with a line break in it
        frames, n = stack.split(";"), int(count)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return "no samples (the daemon was idle)"
    lines = [f"{samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        lines += [f"{title}:"] + [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> str:
    if os.geteuid() != 0:
        raise BenchError("run as root: it mounts filesystems and drops the page cache")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(spy, os.X_OK):
        raise BenchError("py-spy is not installed (pip install py-spy)")
    (workload,) = chosen_workloads(args.workload)
    (system,) = systems.load([args.system], None)
    if not system.is_union or workload.timed_by_runner:
        raise BenchError("profile one mounted FUSE system on a filesystem workload")
    data = dataset.prepare(args.data, dataset.QUICK if args.quick else dataset.FULL,
                           log=lambda text: print(text, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="pyunionfs-profile.", dir=args.data) as scratch:
        raw = args.raw or Path(scratch) / "stacks.txt"
        with runner.Mounts(Path(scratch), data) as mounts, mounts.mounted(system, workload.lowers(data)) as mnt:
            daemon = runner.find_daemon(mnt)
            if daemon is None:
                raise BenchError(f"no daemon found for {mnt}")
            ctx = workloads.Context(mnt, data)
            runner.get_ready(workload, ctx)
            # py-spy reads native stacks only from a stopped process: --native cannot be --nonblocking.
            command = [spy, "record", "--pid", str(daemon), "--rate", str(args.rate), "--format", "raw",
                       "--output", str(raw)] + (["--native"] if args.native else ["--nonblocking"])
            sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(SPY_START)
                seconds, cpu = runner.run_timed(workload, ctx, daemon)
            finally:
                sampler.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
                _, errors = sampler.communicate()
        if not raw.exists():
            last = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"py-spy recorded nothing: {last[0]}")
        head = f"{workload.name} on {system.name}: {seconds:.2f} s, daemon CPU {cpu:.2f} s"
        return head + "\n" + summarize(raw, args.top)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def show() -> int:
        print(profile(args))
        return 0

    return run_command("bench.profile", show)


if __name__ == "__main__":
    sys.exit(main())
