"""The store's metadata, in SQLite (WAL, one transaction per change): layers with reference
counts, images and their names, containers and their state. Two commands at once see each
other's changes whole or not at all."""
from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    diff_id TEXT PRIMARY KEY,      -- sha256:HEX of the uncompressed layer tar
    size INTEGER NOT NULL,         -- bytes of its uncompressed tar
    refs INTEGER NOT NULL          -- images whose stacks hold it
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,           -- HEX of the sha256 of its config, as podman's image ID
    config BLOB NOT NULL,          -- the OCI image config, its bytes as given (its sha256 is the ID)
    layers TEXT NOT NULL,          -- JSON list of diff_ids, bottom first
    created TEXT NOT NULL,         -- when it was made, RFC 3339
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,         -- REPOSITORY:TAG
    image TEXT NOT NULL REFERENCES images(id)
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,           -- 64 hex
    name TEXT UNIQUE NOT NULL,
    image TEXT NOT NULL REFERENCES images(id),
    config TEXT NOT NULL,          -- what `create` was given (JSON)
    state TEXT NOT NULL,           -- created, running, exited
    pid INTEGER,                   -- the launcher's, while running
    pid_start INTEGER,             -- its start time (clock ticks after boot): a reused pid is not it
    exit_code INTEGER,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT
);
"""


SETUP_WAIT = 60.0  # seconds


class Database:
    def __init__(self, path: str):
        # A command runs at most a few transactions; waiting for another one is the right thing.
        self.connection = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.connection.row_factory = sqlite3.Row
        # Two commands making a new store at once: SQLite answers the switch to WAL "database is
        # locked" at once rather than waiting (its busy timeout does not cover it), so wait here.
        deadline = time.monotonic() + SETUP_WAIT
        while True:
            try:
                self.connection.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.connection.executescript(SCHEMA)

    @contextlib.contextmanager
    def change(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken for writing at once (so two changes never interleave)."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def rows(self, query: str, *args: object) -> list[sqlite3.Row]:
        return self.connection.execute(query, args).fetchall()

    def row(self, query: str, *args: object) -> sqlite3.Row | None:
        return self.connection.execute(query, args).fetchone()

    def close(self) -> None:
        self.connection.close()
