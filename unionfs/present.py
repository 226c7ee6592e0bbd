"""What the commands print, as podman prints it: tables in aligned columns, sizes and ages in
words, progress bars on a terminal (all through rich); and how their processes show in ps."""
from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, Iterable, Sequence


def set_title(name: str, title: str) -> None:
    """Show this process as NAME (its comm, what pgrep and podman's process checks see) with
    the command line TITLE (whose arguments need not be UTF-8)."""
    import setproctitle

    setproctitle.setproctitle(os.fsencode(title).decode(errors="replace"))
    with open("/proc/self/comm", "w") as comm:
        comm.write(name)


def human_size(size: int) -> str:
    """Bytes as podman shows them: decimal units, three significant digits ("4.87 MB")."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.3g} {unit}"
        value /= 1000
    return f"{size} B"


def human_ago(timestamp: str, now: datetime.datetime | None = None) -> str:
    """An RFC 3339 time as "5 seconds ago", "3 minutes ago", "2 hours ago", "4 days ago"."""
    return f"{human_duration(timestamp, now)} ago"


def human_duration(timestamp: str, now: datetime.datetime | None = None) -> str:
    """The time since TIMESTAMP in words, as podman's STATUS column gives it ("5 seconds")."""
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.datetime.now(datetime.timezone.utc)) - then).total_seconds())
    for unit, length in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = seconds // length
            return f"{count} {unit}{'s' if count > 1 else ''}"
    return "Less than a second" if seconds < 1 else f"{seconds} second{'s' if seconds > 1 else ''}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns aligned with spaces, headers first, as podman's tables."""
    from rich.console import Console
    from rich.table import Table

    grid = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 3, 0, 0), header_style="",
                 show_header=True)
    for header in headers:
        grid.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*row)
    Console(file=sys.stdout, width=10_000, highlight=False, soft_wrap=True).print(grid)


class Progress:
    """Progress bars on standard error when it is a terminal (none otherwise): one per task, with
    its bytes done, the total and the rate."""

    def __init__(self, verb: str = "Copying blob"):
        self.verb = verb
        self._bars = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress as Bars, TextColumn, TransferSpeedColumn

            self._bars = Bars(TextColumn(f"{self.verb} {{task.description}}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), console=Console(file=sys.stderr))
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A new bar; the function to call with the bytes done since the last call."""
        if self._bars is None:
            return lambda done: None
        task_id = self._bars.add_task(description, total=total)
        return lambda done: self._bars.advance(task_id, done)
