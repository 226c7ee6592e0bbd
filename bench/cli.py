"""`python -m bench`: measure, then print the tables and write the raw results and the plot."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

from bench import ab, dataset, report, runner, stats, systems, workloads
from bench.systems import BenchError

BASELINES = ["fuse-overlayfs", "native"]
DEFAULT_DATA = Path("/var/tmp/pyunionfs-bench")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--systems", default=",".join(systems.DEFAULT),
                        help=f"comma-separated (default %(default)s; also: {', '.join(set(systems.BUILTIN) - set(systems.DEFAULT))})")
    parser.add_argument("--systems-file", help="a TOML file with more systems (see bench/systems.py)")
    parser.add_argument("--workloads", default="all", help="comma-separated names, or all (see --list)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small dataset and one round: a smoke run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the dataset is built and kept")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    parser.add_argument("--ab", metavar="A,B", help="two commits of pyunionfs, measured alternately as systems "
                        "pyunionfs@A and pyunionfs@B (in place of pyunionfs), B's ratios to A in a table")
    parser.add_argument("--list", action="store_true", help="list the workloads and systems, and exit")
    return parser.parse_args(argv)


def chosen_workloads(spec: str) -> list[workloads.Workload]:
    if spec == "all":
        return [workload for workload in workloads.WORKLOADS if workloads.available(workload)]
    names = [name for name in spec.split(",") if name]
    unknown = [name for name in names if name not in workloads.BY_NAME]
    if unknown:
        raise BenchError(f"unknown workload {unknown[0]!r} (see python -m bench --list)")
    return [workloads.BY_NAME[name] for name in names]


class Progress:
    """Each measurement as it is made: a bar (rich) on a terminal, a line otherwise (logs)."""

    def __enter__(self) -> Progress:
        self.bar = self.task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                           console=Console(stderr=True))
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, measurement: runner.Measurement, done: int, total: int) -> None:
        _check_interrupt()  # between measurements, what a lost KeyboardInterrupt did not stop
        result = f"{measurement.seconds:.3f} s" if measurement.seconds is not None else "FAILED"
        text = f"round {measurement.round + 1} {measurement.workload:<16} {measurement.system:<15} {result}"
        if self.bar is None:
            print(f"[{done}/{total}] {text}", file=sys.stderr, flush=True)
            return
        if self.task is None:
            self.task = self.bar.add_task(text, total=total)
        self.bar.update(self.task, completed=done, description=text)


def run_command(prog: str, action: Callable[[], int]) -> int:
    """ACTION as a command named PROG: bad input is one line and exit 2; Ctrl-C and kill both
    stop it through the `finally`s that unmount, with exit 130 (a background job starts with
    SIGINT ignored, so it is set here too)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return action()
    except BenchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (everything it mounted is unmounted)", file=sys.stderr)
        return 130


_interrupted = False


def _interrupt(signum: int, frame: object) -> None:
    """KeyboardInterrupt, remembered: raised inside a finalizer (a `__del__` that runs just then),
    Python only prints it and goes on, so each measurement's end checks again (_check_interrupt)."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_command("bench", lambda: run(args, "python -m bench " + " ".join(argv)))


def run(args: argparse.Namespace, command: str) -> int:
    if args.list:
        for workload in workloads.WORKLOADS:
            print(f"{workload.name:<16} {workload.description}")
        print("systems:", ", ".join(systems.BUILTIN))
        return 0
    if os.geteuid() != 0:
        raise BenchError("run as root: it mounts filesystems and drops the page cache")
    chosen = systems.load([name for name in args.systems.split(",") if name], args.systems_file)
    todo = chosen_workloads(args.workloads)
    rounds = args.rounds or (1 if args.quick else 5)
    scale = dataset.QUICK if args.quick else dataset.FULL
    data = dataset.prepare(args.data, scale, log=lambda text: print(text, file=sys.stderr))
    started = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or RESULTS / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    baselines = BASELINES
    with tempfile.TemporaryDirectory(prefix="pyunionfs-bench.", dir=args.data) as scratch:
        try:
            if args.ab:
                pair = ab.systems(args.ab.split(","), Path(scratch))
                chosen = [system for system in chosen if system.name != "pyunionfs"] + pair
                baselines = [pair[0].name, *BASELINES]
            with runner.Mounts(Path(scratch), data) as mounts, Progress() as progress:
                measurements = runner.run_all(chosen, todo, rounds, mounts, progress)
        finally:
            ab.remove(Path(scratch))
    names = [system.name for system in chosen]
    summaries = stats.summarize(measurements, baselines)
    header = (f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, kernel "
              f"{platform.release()}; {rounds} round(s), {scale.name} dataset ({data.entries()} entries); "
              f"`{command.strip()}`\n")
    table = header + "\n" + report.markdown(summaries, names, baselines)
    print(table)
    (out / "table.md").write_text(table)
    report.write_json_lines(measurements, out / "results.jsonl")
    baseline = next((b for b in baselines if b in names), None)
    if baseline:
        report.plot(summaries, names, baseline, out / "ratios.png", f"Ratio to {baseline} ({started:%Y-%m-%d})")
    print(f"bench: results in {out}", file=sys.stderr)
    return 1 if any(m.error for m in measurements) else 0
