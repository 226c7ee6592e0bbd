"""Owner ids as stored in the layers and as shown through the mount: fuse-overlayfs's
`uidmapping=`/`gidmapping=` shifting and its `squash_to_*` options.

A mapping entry `STORED:SHOWN:COUNT` shows stored ids STORED..STORED+COUNT-1 as SHOWN.., and
stores an owner given through the mount (a create, a chown) the other way round; an id outside
every entry is the kernel's overflow id, as in a user namespace. Squashing shows one id for every
object and leaves what is stored alone."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OVERFLOW_ID = 65534
MAX_ID = 1 << 32  # ids are 32-bit


def overflow_id(kind: str) -> int:
    """The kernel's overflowuid or overflowgid (KIND "uid" or "gid")."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_OVERFLOW_ID


@dataclass(frozen=True)
class MappedRange:
    stored: int
    shown: int
    count: int


@dataclass(frozen=True)
class IdMap:
    ranges: tuple[MappedRange, ...] = ()
    squash: int | None = None  # every object is shown with this id
    overflow: int = DEFAULT_OVERFLOW_ID

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def shown(self, stored: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return stored
        for r in self.ranges:
            if r.stored <= stored < r.stored + r.count:
                return r.shown + stored - r.stored
        return self.overflow

    def stored(self, shown: int) -> int:
        if not self.ranges:
            return shown
        for r in self.ranges:
            if r.shown <= shown < r.shown + r.count:
                return r.stored + shown - r.shown
        return self.overflow


def parse_ranges(option: str, text: str) -> tuple[MappedRange, ...]:
    """`STORED:SHOWN:COUNT[:STORED:SHOWN:COUNT...]`; empty fields are skipped, as fuse-overlayfs
    does (containers/storage writes a leading colon). ValueError says what is wrong."""
    fields = [field for field in text.split(":") if field]
    if not fields or len(fields) % 3:
        raise ValueError(f"{option}= takes STORED:SHOWN:COUNT triples: {text}")
    try:
        numbers = [int(field) for field in fields]
    except ValueError:
        raise ValueError(f"{option}= takes numbers: {text}") from None
    ranges = tuple(MappedRange(*numbers[i:i + 3]) for i in range(0, len(numbers), 3))
    if any(not 0 <= n < MAX_ID for n in numbers) or any(r.count == 0 for r in ranges):
        raise ValueError(f"{option}= takes ids below 2^32 and non-empty ranges: {text}")
    return ranges
