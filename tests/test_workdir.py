"""The work directory's new files: named at once, made ahead as unnamed spares where the filesystem
has O_TMPFILE, and nothing left open once it is closed."""
from __future__ import annotations

import os
import stat
import time

import pytest

from unionfs.fs.workdir import SPARE_FILES, WORK_SUBDIR, SpareFiles, WorkDir


def _spares_open(work: str) -> int:
    """How many of this process's fds are unnamed files in WORK (O_TMPFILE links read
    "WORK/#INODE (deleted)")."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(work + "/#") and target.endswith(" (deleted)")
    return count


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def open_workdir(tmp_path) -> WorkDir:
    (tmp_path / "upper").mkdir(exist_ok=True)
    upper_fd = os.open(tmp_path / "upper", os.O_PATH | os.O_DIRECTORY)
    try:
        return WorkDir(str(tmp_path / "work"), upper_fd, str(tmp_path / "upper"))
    finally:
        os.close(upper_fd)  # the lock is on an fd of its own


def test_new_files_are_named_empty_and_private_and_come_from_spares(tmp_path):
    (tmp_path / "work").mkdir()
    workdir = open_workdir(tmp_path)
    work = str(tmp_path / "work" / os.fsdecode(WORK_SUBDIR))
    try:
        assert _spares_open(work) == 0, "spares are made only once files are wanted"
        names = [b"#%d" % i for i in range(2 * SPARE_FILES)]
        for i, name in enumerate(names):
            fd = workdir.new_file(name)
            try:
                os.write(fd, b"data %d" % i)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_nlink == 1
            assert os.stat(os.path.join(work, os.fsdecode(name))).st_ino == st.st_ino
            _wait_for(lambda: _spares_open(work) == SPARE_FILES, "the spares to be made again")
        assert sorted(os.listdir(work)) == sorted(map(os.fsdecode, names)), "spares have no names"
        with pytest.raises(FileExistsError):  # never over an existing name
            workdir.new_file(names[0])
    finally:
        workdir.close()
    assert _spares_open(work) == 0


def test_without_o_tmpfile_there_are_no_spares(tmp_path):
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY)  # procfs cannot make unnamed files
    spares = SpareFiles(proc_fd)
    try:
        for _ in range(20):
            assert spares.take() is None
            time.sleep(0.01)
    finally:
        spares.close()  # joins the thread
        os.close(proc_fd)
