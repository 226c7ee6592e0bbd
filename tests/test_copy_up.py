"""Copy-up: what the copy keeps, what open files and mappings see, and crashes in the middle."""
from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mounts import force_unmount, pyunionfs, stop
from trees import checksum


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("lower", "upper", "work")}
    for path in paths.values():
        path.mkdir()
    return paths


def mounted(layout: dict[str, Path], mnt: Path, **kwargs):
    return pyunionfs([layout["lower"]], mnt, upper=layout["upper"], workdir=layout["work"], **kwargs)


def test_xattr_answers_follow_changes(layout, mnt):
    """A file without xattrs is answered ENODATA by the shim once Python has seen it has none;
    setting and removing one through the mount must show at once."""
    (layout["lower"] / "plain").write_text("x")
    with mounted(layout, mnt):
        target = mnt / "plain"
        for _ in range(2):  # the second answer comes from the shim
            with pytest.raises(OSError) as absent:
                os.getxattr(target, "user.tag")
            assert absent.value.errno == errno.ENODATA
        os.setxattr(target, "user.tag", b"set")
        assert os.getxattr(target, "user.tag") == b"set"
        os.removexattr(target, "user.tag")
        for _ in range(2):
            with pytest.raises(OSError) as gone:
                os.getxattr(target, "user.tag")
            assert gone.value.errno == errno.ENODATA
        os.setxattr(target, "user.again", b"2")
        assert os.getxattr(target, "user.again") == b"2"


def test_xattr_names_follow_chown_and_chmod(layout, mnt):
    """A chown drops a file's capability (the upper filesystem removes security.capability), a
    chmod keeps it: the names listed through the mount are those of the upper copy each time."""
    tool = layout["lower"] / "tool"
    tool.write_text("#!/bin/sh\n")
    # struct vfs_cap_data, revision 2, effective, CAP_NET_RAW permitted
    capability = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
    os.setxattr(tool, "security.capability", capability)
    with mounted(layout, mnt):
        target = mnt / "tool"
        os.chmod(target, 0o750)
        assert os.getxattr(target, "security.capability") == capability
        os.chown(target, 1, 1)
        upper_names = os.listxattr(layout["upper"] / "tool")
        assert "security.capability" not in upper_names, "ext4 keeps capabilities over a chown now?"
        assert "security.capability" not in os.listxattr(target)
        os.chmod(target, 0o700)
        assert sorted(os.listxattr(target)) == sorted(name for name in upper_names if "overlay" not in name)


def test_copy_keeps_metadata_xattrs_and_holes(layout, mnt):
    lower = layout["lower"]
    (lower / "dir").mkdir()
    target = lower / "dir" / "file"
    with open(target, "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    os.chown(target, 1000, 1001)
    os.chmod(target, 0o4750)
    os.setxattr(target, "user.note", b"kept")
    os.setxattr(target, "security.capability",
                bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000"))  # cap_net_raw
    os.utime(target, ns=(1_000_000_000_123, 2_000_000_000_456))
    os.chmod(lower / "dir", 0o711)
    before = os.stat(target)
    with mounted(layout, mnt):
        os.setxattr(mnt / "dir" / "file", "user.new", b"1")  # a metadata change copies up
        st = os.stat(mnt / "dir" / "file")
        assert st.st_ino == before.st_ino
    copy = layout["upper"] / "dir" / "file"
    after = os.stat(copy)
    assert (after.st_uid, after.st_gid, after.st_mode) == (1000, 1001, before.st_mode)
    assert after.st_mtime_ns == before.st_mtime_ns
    assert os.getxattr(copy, "user.note") == b"kept"
    assert os.getxattr(copy, "security.capability") == os.getxattr(target, "security.capability")
    assert after.st_blocks * 512 < 1 << 20, "the hole was filled in"
    assert copy.read_bytes() == target.read_bytes()
    assert os.stat(layout["upper"] / "dir").st_mode & 0o777 == 0o711


def test_st_ino_survives_copy_up_and_cache_drops(layout, mnt):
    (layout["lower"] / "d").mkdir()
    (layout["lower"] / "d" / "f").write_text("lower")
    with mounted(layout, mnt):
        inos = {name: os.stat(mnt / name).st_ino for name in ("d", "d/f")}
        cwd_holder = subprocess.Popen(["sleep", "30"], cwd=mnt / "d")
        try:
            with open(mnt / "d" / "f", "a") as f:
                f.write(" and upper")
            (mnt / "d" / "new").touch()
            subprocess.run(["sh", "-c", "sync; echo 2 > /proc/sys/vm/drop_caches"], check=True)
            assert {name: os.stat(mnt / name).st_ino for name in inos} == inos
            # A process whose cwd was the directory before its copy-up still has it.
            assert os.stat(f"/proc/{cwd_holder.pid}/cwd").st_ino == inos["d"]
            assert sorted(os.listdir(f"/proc/{cwd_holder.pid}/cwd")) == ["f", "new"]
        finally:
            cwd_holder.kill()
            cwd_holder.wait()


def test_open_reader_and_shared_mapping_see_new_data(layout, mnt):
    (layout["lower"] / "f").write_bytes(b"A" * 8192)
    with mounted(layout, mnt):
        reader = open(mnt / "f", "rb")
        mapping_fd = os.open(mnt / "f", os.O_RDONLY)
        mapping = mmap.mmap(mapping_fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            assert reader.read(4) == b"AAAA"
            with open(mnt / "f", "r+b") as writer:
                writer.seek(4096)
                writer.write(b"B" * 4096)
            assert reader.read() == b"A" * 4092 + b"B" * 4096
            assert mapping[4096:4100] == b"BBBB"
        finally:
            mapping.close()
            os.close(mapping_fd)
            reader.close()
    assert (layout["lower"] / "f").read_bytes() == b"A" * 8192


def test_names_that_can_be_made(layout, mnt):
    (layout["lower"] / "d").mkdir()
    with mounted(layout, mnt):
        long_name = "x" * 255
        (mnt / "d" / long_name).write_text("255 bytes")
        assert os.listdir(mnt / "d") == [long_name]
        with pytest.raises(OSError) as exc:
            os.mknod(mnt / "d" / "wh", 0o600 | 0o020000, os.makedev(0, 0))
        assert exc.value.errno == errno.EPERM  # as in the kernel
        # ".wh." names are whiteout markers in every layer (the upper too, as fuse-overlayfs
        # reads it), so, as in fuse-overlayfs, they cannot be made; the kernel would allow them.
        for make in (lambda p: p.write_text("x"), lambda p: p.mkdir(), lambda p: p.symlink_to("x"),
                     lambda p: os.rename(mnt / "d" / long_name, p)):
            with pytest.raises(OSError) as exc:
                make(mnt / "d" / ".wh.looks-like-a-whiteout")
            assert exc.value.errno == errno.EINVAL
    assert sorted(os.listdir(layout["upper"] / "d")) == [long_name]


def test_names_made_behind_the_kernels_back_are_not_made_over(layout, mnt):
    """A name the kernel holds as absent (a cached negative lookup) that appeared in a directory
    of the upper layer alone: making it through the union fails with EEXIST and leaves it as it
    is, whichever way it is made."""
    with pyunionfs([layout["lower"]], mnt, "-o", "timeout=60", upper=layout["upper"], workdir=layout["work"]):
        (mnt / "new").mkdir()
        names = ["file", "excl", "dir", "link", "fifo"]
        for name in names:
            assert not (mnt / "new" / name).exists()  # cached as absent for 60 s
            (layout["upper"] / "new" / name).write_text(f"made behind the kernel's back: {name}")
        makers = {"file": lambda p: os.open(p, os.O_WRONLY | os.O_CREAT, 0o644),
                  "excl": lambda p: os.open(p, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644),
                  "dir": lambda p: os.mkdir(p), "link": lambda p: os.symlink("target", p),
                  "fifo": lambda p: os.mkfifo(p)}
        for name, make in makers.items():
            with pytest.raises(FileExistsError):
                make(mnt / "new" / name)
    for name in names:
        assert (layout["upper"] / "new" / name).read_text() == f"made behind the kernel's back: {name}"


def test_concurrent_writers_and_a_copy_up_racing_readers(layout, mnt):
    data = os.urandom(8 << 20)
    (layout["lower"] / "shared").write_bytes(data)
    errors: list[BaseException] = []

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
        return threading.Thread(target=run)

    with mounted(layout, mnt):
        def writer(name: str):
            def work():
                with open(mnt / name, "wb") as f:
                    for _ in range(64):
                        f.write(name.encode() * 4096)
            return work

        def reader():
            for _ in range(20):
                content = (mnt / "shared").read_bytes()
                assert content in (data, data + b"appended"), "a reader saw a partial copy"

        def appender():
            with open(mnt / "shared", "ab") as f:
                f.write(b"appended")

        threads = [guarded(writer("one")), guarded(writer("two")), guarded(reader), guarded(reader),
                   guarded(appender)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert (mnt / "one").read_bytes() == b"one" * 4096 * 64
        assert (mnt / "two").read_bytes() == b"two" * 4096 * 64
        assert (mnt / "shared").read_bytes() == data + b"appended"
    assert (layout["lower"] / "shared").read_bytes() == data


def _copy_in_progress(work: Path) -> bool:
    return any((work / "work").iterdir()) if (work / "work").exists() else False


def test_copy_up_does_not_stall_other_requests(layout, mnt):
    (layout["lower"] / "big").write_bytes(os.urandom(1 << 20) * 512)  # 512 MiB
    (layout["lower"] / "small").write_text("small")
    with mounted(layout, mnt):
        appender = subprocess.Popen(["sh", "-c", f'echo more >> "{mnt}/big"'])
        try:
            while not _copy_in_progress(layout["work"]) and appender.poll() is None:
                time.sleep(0.001)
            # While the copy is being built, other requests are answered.
            assert (mnt / "small").read_text() == "small"
            assert "big" in os.listdir(mnt)
            still_copying = _copy_in_progress(layout["work"])
        finally:
            assert appender.wait(120) == 0
    assert still_copying, "the copy-up finished before the other requests were answered"


@pytest.mark.parametrize("attempt", range(20))
def test_kill_during_copy_up_loses_nothing(layout, mnt, attempt):
    original = os.urandom(1 << 20) * 128  # 128 MiB
    (layout["lower"] / "big").write_bytes(original)
    lowers_before = checksum(layout["lower"])
    with mounted(layout, mnt) as daemon:
        appender = subprocess.Popen(["sh", "-c", f'echo more >> "{mnt}/big"'], stderr=subprocess.DEVNULL)
        while not _copy_in_progress(layout["work"]):
            assert appender.poll() is None, "the copy-up finished before the kill"
            time.sleep(0.0005)
        daemon.send_signal(signal.SIGKILL)
        stop(daemon)
        appender.wait(30)
        force_unmount(mnt)
        assert not (layout["upper"] / "big").exists(), "a partial copy reached the upper layer"
    with mounted(layout, mnt):
        assert not _copy_in_progress(layout["work"]), "the workdir was not cleaned at mount"
        assert (mnt / "big").read_bytes() == original
    assert checksum(layout["lower"]) == lowers_before


def test_st_ino_after_remount_matches_kernel(layout, mnt, tmp_path):
    """The copy records its origin in the kernel's format: after a remount, and under kernel
    overlayfs, the copied-up file and directory still have their lower inode numbers."""
    from mounts import kernel_overlay

    (layout["lower"] / "d").mkdir()
    (layout["lower"] / "d" / "f").write_text("lower")
    lower_inos = {name: os.stat(layout["lower"] / name).st_ino for name in ("d", "d/f")}
    with mounted(layout, mnt):
        with open(mnt / "d" / "f", "a") as f:
            f.write("+")
    with mounted(layout, mnt):
        assert {name: os.stat(mnt / name).st_ino for name in lower_inos} == lower_inos
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    with kernel_overlay([layout["lower"]], kernel_mnt, "", layout["upper"], layout["work"]):
        assert {name: os.stat(kernel_mnt / name).st_ino for name in lower_inos} == lower_inos
        assert (kernel_mnt / "d" / "f").read_text() == "lower+"


@pytest.mark.parametrize("first", ["a", "b"])
def test_lower_hard_links_follow_a_copy_up(layout, mnt, tmp_path, first):
    """After one name of a lower hard-link pair is written, the other shows the new data, also
    after a remount, whichever name is looked up first (fuse-overlayfs serves stale data there),
    and kernel overlayfs with index=on agrees."""
    from mounts import kernel_overlay

    (layout["lower"] / "a").write_text("old")
    os.link(layout["lower"] / "a", layout["lower"] / "b")
    with mounted(layout, mnt):
        with open(mnt / "a", "a") as f:
            f.write("+new")
        assert (mnt / "b").read_text() == "old+new"
    other = "b" if first == "a" else "a"
    with mounted(layout, mnt):
        assert (mnt / first).read_text() == "old+new"
        assert (mnt / other).read_text() == "old+new"
        assert os.stat(mnt / "a").st_ino == os.stat(mnt / "b").st_ino
        with open(mnt / "b", "a") as f:
            f.write("+b")
    with mounted(layout, mnt):
        assert (mnt / "a").read_text() == (mnt / "b").read_text() == "old+new+b"
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    with kernel_overlay([layout["lower"]], kernel_mnt, "index=on,redirect_dir=on", layout["upper"],
                        layout["work"]):
        assert (kernel_mnt / "a").read_text() == (kernel_mnt / "b").read_text() == "old+new+b"
    assert (layout["lower"] / "a").read_text() == "old"


def test_fallocate(layout, mnt):
    """fallocate(2) through the shim: pyfuse3 alone has no handler for it."""
    (layout["lower"] / "f").write_bytes(b"x" * 8192)
    with mounted(layout, mnt):
        assert subprocess.run(["fallocate", "-l", "1M", str(mnt / "f")]).returncode == 0
        assert os.stat(mnt / "f").st_size == 1 << 20
        assert subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4096", str(mnt / "f")]).returncode == 0
        data = (mnt / "f").read_bytes()
        assert data[:4096] == bytes(4096) and data[4096:8192] == b"x" * 4096
    assert (layout["lower"] / "f").read_bytes() == b"x" * 8192
    assert os.stat(layout["upper"] / "f").st_size == 1 << 20


def test_writes_near_path_max(layout, mnt):
    """Copy-up of a chain of 255-byte directories down to about 3,800 bytes, and changes there."""
    budget = 4095 - len(os.fsencode(str(mnt))) - 300
    parts = [("p%d" % i).ljust(255, "w") for i in range(budget // 256)]
    layout["lower"].joinpath(*parts).mkdir(parents=True)
    layout["lower"].joinpath(*parts, "f").write_text("lower")
    deep = mnt.joinpath(*parts)
    assert len(os.fsencode(str(deep / ("n" * 255)))) > 3800
    with mounted(layout, mnt):
        with open(deep / "f", "a") as f:
            f.write("+upper")
        (deep / ("n" * 255)).write_text("new")
        os.rename(deep / "f", deep / "g")
        assert sorted(os.listdir(deep)) == ["g", "n" * 255]
        assert (deep / "g").read_text() == "lower+upper"
    upper = layout["upper"].joinpath(*parts)
    assert os.stat(upper / "f").st_rdev == 0 and (upper / "g").read_text() == "lower+upper"
