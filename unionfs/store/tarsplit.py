"""A layer's tar, kept as its bytes less the file contents (the unpacked layer has those), so
that `save` gives back the very archive a layer was loaded or committed from: the same bytes,
the same diff_id, the same image ID. containers/storage keeps its layers so too (tar-split).

The record stream (zstd-compressed) alternates the archive's own bytes (headers, padding, the
end blocks) with references to a regular file of the layer: its path and how many bytes of it."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from typing import BinaryIO, Iterator

import zstandard

from unionfs.errors import ConfigError
from unionfs.fs import syscalls

RAW, FILE = b"R", b"F"
CHUNK = 1 << 20
_LENGTH = struct.Struct("<Q")


class Recorder:
    """Fed every byte of a layer archive as it is read, and each member before its data is: the
    bytes of a member whose content the layer keeps at its path are left out."""

    def __init__(self, out: BinaryIO):
        self._writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        self._pending: list[tuple[int, bytes]] = []  # (offset, bytes) not yet known to be data or not
        self._data: tuple[int, int] | None = None  # the range [start, end) of the member being read

    def feed(self, offset: int, data: bytes) -> None:
        self._pending.append((offset, data))
        self._classify()

    def member(self, member: tarfile.TarInfo, path: str) -> None:
        """MEMBER's data is about to be read; its content will be the file at PATH in the layer."""
        if member.size and member.isreg() and member.sparse is None:
            self._flush_before(member.offset_data)
            self._record(FILE, _LENGTH.pack(member.size) + os.fsencode(path))
            self._data = (member.offset_data, member.offset_data + member.size)
            self._classify()

    def finish(self) -> None:
        self._flush_before(None)
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()

    def _classify(self) -> None:
        """Drop what the current member's data range covers; keep what lies before it."""
        if self._data is None:
            return
        start, end = self._data
        self._flush_before(start)
        kept = []
        for offset, data in self._pending:
            if offset + len(data) <= end:
                continue  # content: the layer has it
            cut = max(0, end - offset)
            kept.append((offset + cut, data[cut:]))
        self._pending = kept

    def _flush_before(self, limit: int | None) -> None:
        """Record the pending archive bytes before offset LIMIT (all of them for None)."""
        kept = []
        for offset, data in self._pending:
            if limit is not None and offset + len(data) > limit:
                cut = max(0, limit - offset)
                if cut:
                    self._record(RAW, data[:cut])
                kept.append((offset + cut, data[cut:]))
            else:
                self._record(RAW, data)
        self._pending = kept

    def _record(self, kind: bytes, payload: bytes) -> None:
        self._writer.write(kind + _LENGTH.pack(len(payload)) + payload)


def _records(split_path: str) -> Iterator[tuple[bytes, bytes]]:
    with open(split_path, "rb") as split:
        reader = zstandard.ZstdDecompressor().stream_reader(split, read_across_frames=True)
        while header := reader.read(1 + _LENGTH.size):
            yield header[:1], reader.read(_LENGTH.unpack(header[1:])[0])


def _file_reference(payload: bytes) -> tuple[int, bytes]:
    return _LENGTH.unpack(payload[:_LENGTH.size])[0], payload[_LENGTH.size:]


class Archive(io.RawIOBase):
    """A layer's archive, read back from its tar-split (SPLIT_PATH) and its tree (LAYER_FD): the
    bytes it was stored from, checked against DIFF_ID as they are read (an error at the end if
    they are not those)."""

    def __init__(self, split_path: str, layer_fd: int, diff_id: str):
        super().__init__()
        self.size = sum(_file_reference(payload)[0] if kind == FILE else len(payload)
                        for kind, payload in _records(split_path))
        self._chunks = self._generate(split_path, layer_fd, diff_id)
        self._left = b""

    def _generate(self, split_path: str, layer_fd: int, diff_id: str) -> Iterator[bytes]:
        digest = hashlib.sha256()
        for kind, payload in _records(split_path):
            if kind == RAW:
                digest.update(payload)
                yield payload
                continue
            size, path = _file_reference(payload)
            with open(syscalls.open_beneath(layer_fd, path, os.O_RDONLY), "rb") as content:
                while size:
                    chunk = content.read(min(size, CHUNK))
                    if not chunk:
                        raise ConfigError(f"the layer {diff_id} has lost content: {os.fsdecode(path)} is short")
                    digest.update(chunk)
                    yield chunk
                    size -= len(chunk)
        if "sha256:" + digest.hexdigest() != diff_id:
            raise ConfigError(f"the layer {diff_id} cannot be written as it was stored "
                              f"(its archive would be sha256:{digest.hexdigest()})")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        count = min(len(buffer), len(self._left))
        buffer[:count] = self._left[:count]
        self._left = self._left[count:]
        return count
