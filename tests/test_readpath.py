"""The mounted read path: whiteout forms the kernel does not read, xattrs, inode numbers, FORGET."""
from __future__ import annotations

import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounts import daemon_status, pyunionfs, tmpfs
from trees import make_opaque, snapshot


def layer_dirs(tmp_path: Path, count: int) -> list[Path]:
    layers = [tmp_path / f"layer{i}" for i in range(count)]
    for layer in layers:
        layer.mkdir()
    return layers


def test_oci_and_user_namespace_forms(tmp_path, mnt):
    """Forms kernel overlayfs (as root) does not read, against the tree they describe."""
    top, middle, bottom = layer_dirs(tmp_path, 3)
    for name in ("kept", "oci-deleted", "wh-and-name", "xwh-deleted"):
        (bottom / name).write_text(f"bottom {name}\n")
    for d in ("oci-opaque", "user-opaque", "merged"):
        (bottom / d).mkdir()
        (bottom / d / "from-bottom").touch()
    (middle / ".wh.oci-deleted").touch()
    (middle / "wh-and-name").write_text("middle replaces bottom\n")
    (middle / ".wh.wh-and-name").touch()
    (middle / "oci-opaque").mkdir()
    (middle / "oci-opaque" / ".wh..wh..opq").touch()
    (middle / "oci-opaque" / "from-middle").touch()
    (middle / ".wh..wh..plnk").mkdir()  # AUFS hard-link store: never shown
    (middle / "user-opaque").mkdir()
    make_opaque(middle / "user-opaque", namespace="user")
    (top / "merged").mkdir()
    (top / "merged" / "from-top").touch()
    os.setxattr(top, "trusted.overlay.opaque", b"x")
    (top / "xwh-deleted").touch()
    os.setxattr(top / "xwh-deleted", "trusted.overlay.whiteout", b"")
    (top / "empty-file").touch()
    os.setxattr(top / "empty-file", "user.overlay.origin", b"private")
    os.setxattr(top / "empty-file", "user.visible", b"shown")

    with pyunionfs([top, middle, bottom], mnt):
        tree = snapshot(mnt)
        assert sorted(tree) == sorted([
            "kept", "wh-and-name", "empty-file", "oci-opaque", "oci-opaque/from-middle",
            "user-opaque", "merged", "merged/from-top", "merged/from-bottom"])
        assert (mnt / "wh-and-name").read_text() == "middle replaces bottom\n"
        assert not (mnt / ".wh.oci-deleted").exists()
        assert not (mnt / "oci-deleted").exists()
        assert os.listxattr(mnt / "empty-file") == ["user.visible"]
        with pytest.raises(OSError):
            os.getxattr(mnt / "empty-file", "user.overlay.origin")
        assert os.listxattr(mnt) == []  # trusted.overlay.opaque on the root is private too


def test_xattrs_of_listed_and_looked_up_entries(tmp_path, mnt):
    """The C core lists each found object's xattr names as it resolves it, so that the shim
    answers GETXATTR for those with none (ls -l asks for every entry's ACL): entries with xattrs
    still show them, private overlay ones stay hidden, and names added through the mount show."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "d").mkdir()
    for name in ("plain", "labelled", "private"):
        (lower / "d" / name).write_text(name)
    os.setxattr(lower / "d" / "labelled", "user.label", b"lower")
    os.setxattr(lower / "d" / "private", "trusted.overlay.origin", b"x")
    (upper / "d").mkdir()
    (upper / "d" / "made").write_text("upper")
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        for look in (lambda d: sorted(os.listdir(d)), lambda d: None):  # listed, then looked up cold
            d = mnt / "d"
            look(d)
            assert os.getxattr(d / "labelled", "user.label") == b"lower"
            assert os.listxattr(d / "labelled") == ["user.label"]
            for name in ("plain", "private", "made"):
                assert os.listxattr(d / name) == []
                with pytest.raises(OSError) as exc:
                    os.getxattr(d / name, "user.label")
                assert exc.value.errno == errno.ENODATA
            os.setxattr(d / "plain", "user.label", b"new")
            assert os.getxattr(d / "plain", "user.label") == b"new"
            os.removexattr(d / "plain", "user.label")
            subprocess.run(["sh", "-c", "sync; echo 2 > /proc/sys/vm/drop_caches"], check=True)


# Runs the command in its arguments under a seccomp filter that refuses getxattrat and listxattrat
# (x86_64 numbers 464 and 465) with the errno in PYUNIONFS_TEST_ERRNO: as a kernel before 6.13
# (ENOSYS) or a container's seccomp profile older than those calls (EPERM) does.
REFUSE_XATTRAT = """
import ctypes, os, struct, sys
def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)
LD, JEQ, RET = 0x20, 0x15, 0x06
program = b"".join([op(LD, 4), op(JEQ, 0xC000003E, 0, 3), op(LD, 0), op(JEQ, 464, 2, 0), op(JEQ, 465, 1, 0),
                    op(RET, 0x7FFF0000), op(RET, 0x00050000 | int(os.environ["PYUNIONFS_TEST_ERRNO"]))])
buffer = ctypes.create_string_buffer(program)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(program) // 8, ctypes.addressof(buffer))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter names x86_64's syscall numbers")
@pytest.mark.parametrize("refused_with", ["ENOSYS", "EPERM"])
def test_overlay_xattrs_are_read_where_getxattrat_is_refused(tmp_path, mnt, monkeypatch, refused_with):
    """The C core reads xattrs of a name in a layer with getxattrat/listxattrat, and by a
    /proc/self/fd path where the kernel lacks them or a seccomp filter refuses them: an opaque
    directory and an xwhiteout still hide what is below them."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "d").mkdir()
    (lower / "d" / "below").write_text("hidden\n")
    (lower / "gone").write_text("hidden\n")
    (upper / "d").mkdir()
    (upper / "d" / "own").write_text("shown\n")
    make_opaque(upper / "d")
    middle = tmp_path / "middle"
    middle.mkdir()
    os.setxattr(middle, "trusted.overlay.opaque", b"x")
    (middle / "gone").touch()
    os.setxattr(middle / "gone", "trusted.overlay.whiteout", b"")
    monkeypatch.setenv("PYUNIONFS_TEST_ERRNO", str(getattr(errno, refused_with)))
    with pyunionfs([middle, lower], mnt, upper=upper, workdir=work, prefix=[sys.executable, "-c", REFUSE_XATTRAT]):
        assert os.listdir(mnt / "d") == ["own"]
        assert sorted(os.listdir(mnt)) == ["d"]


def test_read_only_without_upper(tmp_path, mnt):
    (layer,) = layer_dirs(tmp_path, 1)
    (layer / "f").write_text("data")
    with pyunionfs([layer], mnt):
        for action in (lambda: (mnt / "f").write_text("x"), lambda: (mnt / "new").touch(),
                       lambda: (mnt / "f").unlink(), lambda: os.mkdir(mnt / "d"),
                       lambda: os.chmod(mnt / "f", 0o600)):
            with pytest.raises(OSError) as exc:
                action()
            assert exc.value.errno == 30  # EROFS
        assert (layer / "f").read_text() == "data"


def test_inode_numbers_stable_unique_and_in_readdir(tmp_path, mnt):
    with tmpfs(tmp_path / "fs1") as fs1, tmpfs(tmp_path / "fs2") as fs2:
        (fs1 / "one").write_text("1")
        (fs2 / "two").write_text("2")
        (fs1 / "dir").mkdir()
        (fs2 / "dir").mkdir()
        (fs2 / "dir" / "deep").touch()
        assert os.stat(fs1 / "one").st_ino == os.stat(fs2 / "two").st_ino  # the collision to avoid

        def numbers() -> dict[str, tuple[int, int]]:
            seen = {}
            for directory, _, names in os.walk(mnt):
                with os.scandir(directory) as entries:
                    for entry in entries:
                        st = entry.stat(follow_symlinks=False)
                        assert entry.inode() == st.st_ino  # d_ino == st_ino
                        seen[os.path.relpath(entry.path, mnt)] = (st.st_ino, st.st_dev)
            return seen

        with pyunionfs([fs1, fs2], mnt):
            first = numbers()
            again = numbers()
            root_dev = os.stat(mnt).st_dev
        with pyunionfs([fs1, fs2], mnt):
            remounted = numbers()
    assert first == again == remounted
    inos = [ino for ino, _ in first.values()]
    assert len(set(inos)) == len(inos)
    assert {dev for _, dev in first.values()} == {root_dev}


def test_hard_links_share_an_inode(tmp_path, mnt):
    top, bottom = layer_dirs(tmp_path, 2)
    (bottom / "a").write_text("linked")
    os.link(bottom / "a", bottom / "b")
    with pyunionfs([top, bottom], mnt):
        a, b = os.stat(mnt / "a"), os.stat(mnt / "b")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        assert (mnt / "b").read_text() == "linked"


def test_forget_keeps_the_inode_table_bounded(tmp_path, mnt):
    (layer,) = layer_dirs(tmp_path, 1)
    for d in range(40):
        (layer / f"d{d}").mkdir()
        for f in range(100):
            (layer / f"d{d}" / f"f{f}").touch()
    log = tmp_path / "daemon.log"

    with open(log, "w") as stderr, pyunionfs([layer], mnt, stderr=stderr) as proc:
        subprocess.run(["find", str(mnt)], check=True, stdout=subprocess.DEVNULL)
        walked = daemon_status(proc, log, "nodes")
        subprocess.run(["sh", "-c", "sync; echo 2 > /proc/sys/vm/drop_caches"], check=True)
        dropped = daemon_status(proc, log, "nodes")
    assert walked >= 4000
    assert dropped < 100, f"{dropped} nodes still held after the kernel dropped its inodes"


@pytest.mark.parametrize("shim", ["shim", "no shim"])
def test_listings_end_where_they_end(tmp_path, mnt, shim):
    """The kernel's closing read after a listing replied to the end is answered by the shim
    (csrc/fuse_shim.c), without Python; a new pass, whose listing goes further, still gets all
    of it. Without the shim, Python answers it."""
    top, bottom = layer_dirs(tmp_path, 2)
    for d in range(20):
        for layer, names in ((bottom, range(30)), (top, range(25, 40))):
            (layer / f"d{d}").mkdir(exist_ok=True)
            for f in names:
                (layer / f"d{d}" / f"f{f}").touch()
    (bottom / "big").mkdir()
    for f in range(3000):  # several replies' worth
        (bottom / "big" / f"entry-with-a-long-name-{f:04d}").touch()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    log = tmp_path / "daemon.log"
    prefix = ["env", "PYUNIONFS_NO_SHIM=1"] if shim == "no shim" else []
    with open(log, "w") as stderr, pyunionfs([top, bottom], mnt, upper=upper, workdir=work, stderr=stderr,
                                             prefix=prefix) as proc:
        def names(d: Path) -> list[str]:
            return sorted(os.listdir(d))

        for d in range(20):
            assert names(mnt / f"d{d}") == sorted(f"f{f}" for f in range(40))
        assert len(names(mnt / "big")) == 3000
        (mnt / "d3" / "new").touch()  # the kernel drops its listing; the next pass is a new one
        for f in range(3000, 3100):
            (mnt / "big" / f"entry-with-a-long-name-{f:04d}").touch()
        assert names(mnt / "d3") == sorted([f"f{f}" for f in range(40)] + ["new"])
        assert len(names(mnt / "big")) == 3100
        closing_reads = daemon_status(proc, log, "closing_reads")
    if prefix:
        assert closing_reads == 0
    else:  # the 23 passes above end in one each (23 here): those of the 20 directories at least
        assert closing_reads >= 20


def test_listings_read_ahead_show_what_changed_since(tmp_path, mnt):
    """A walk's listings of lower directories come from the read-ahead thread (csrc/readahead.c)
    where there is a second CPU; a directory read ahead and changed through the mount before it is
    listed shows its change (names added, removed and renamed, in it and in a directory it holds)."""
    top, bottom = layer_dirs(tmp_path, 2)
    expected: dict[str, set[str]] = {}
    for d in range(8):
        for s in range(6):
            sub = f"d{d}/s{s}"
            (bottom / sub / "deeper").mkdir(parents=True)
            (top / sub).mkdir(parents=True, exist_ok=True)
            for f in range(10):
                (bottom / sub / f"f{f}").touch()
            (top / sub / "t").touch()
            expected[sub] = {"deeper", "t"} | {f"f{f}" for f in range(10)}
            expected[sub + "/deeper"] = set()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    log = tmp_path / "daemon.log"

    def listed(d: Path) -> set[str]:
        return set(os.listdir(d))

    with open(log, "w") as stderr, pyunionfs([top, bottom], mnt, upper=upper, workdir=work, stderr=stderr) as proc:
        for sub, names in expected.items():
            if sub.startswith("d0/"):  # d1 to d7 are walked below, after the changes
                assert listed(mnt / sub) == names
        walked = daemon_status(proc, log, "read_ahead")
        for d in range(1, 8):
            assert listed(mnt / f"d{d}") == {f"s{s}" for s in range(6)}  # its directories are read ahead
        time.sleep(0.5)  # read ahead, all of them, by now
        for d in range(1, 8):
            (mnt / f"d{d}/s1/new").touch()
            (mnt / f"d{d}/s2/f0").unlink()
            (mnt / f"d{d}/s3/f1").rename(mnt / f"d{d}/s3/g1")
            (mnt / f"d{d}/s4/deeper/made").mkdir()
            expected[f"d{d}/s1"].add("new")
            expected[f"d{d}/s2"].discard("f0")
            expected[f"d{d}/s3"] = expected[f"d{d}/s3"] - {"f1"} | {"g1"}
            expected[f"d{d}/s4/deeper"].add("made")
        for sub, names in expected.items():
            assert listed(mnt / sub) == names, sub
    if len(os.sched_getaffinity(0)) > 1:
        assert walked > 0, "no listing came from the read-ahead"


@pytest.mark.parametrize("union", ["writable", "read-only", "read-only, passthrough=off"])
def test_lower_files_read_are_opened_by_the_shim(tmp_path, mnt, union):
    """A lower file looked up and then opened for reading is opened by the shim, in C
    (csrc/fuse_shim.c), and closed there; a read-only union's files are left to passthrough when
    the kernel grants it. Each reads its own layer's data, and nothing stays open."""
    top, bottom = layer_dirs(tmp_path, 2)
    for f in range(50):
        (bottom / f"f{f}").write_text(f"bottom {f}\n")
    (top / "f7").write_text("top\n")
    writable = union == "writable"
    extra = ("-o", "passthrough=off") if union.endswith("off") else ()
    if writable:
        (tmp_path / "upper").mkdir()
        (tmp_path / "work").mkdir()
    log = tmp_path / "daemon.log"
    with open(log, "w") as stderr, pyunionfs([top, bottom], mnt, *extra, stderr=stderr,
                                             upper=tmp_path / "upper" if writable else None,
                                             workdir=tmp_path / "work" if writable else None) as proc:
        with open(mnt / "f0") as held_open:  # does the kernel serve this union's files (passthrough)?
            granted = daemon_status(proc, log, "passthrough") > 0
            assert held_open.read() == "bottom 0\n"
        for f in range(1, 50):
            assert (mnt / f"f{f}").read_text() == ("top\n" if f == 7 else f"bottom {f}\n")
        opened = daemon_status(proc, log, "shim_opens")
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/fd")) > 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # RELEASE is asynchronous
        held = len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert opened == (0 if granted else 50)
    assert held <= 40, f"{held} fds held after every file was closed"


def test_paths_near_path_max(tmp_path, mnt):
    (layer,) = layer_dirs(tmp_path, 1)
    budget = 4095 - len(os.fsencode(str(mnt))) - 260
    parts, used = [], 0
    while used + 256 < budget:
        parts.append(("p%d" % len(parts)).ljust(255, "z"))
        used += 256
    layer.joinpath(*parts).mkdir(parents=True)
    layer.joinpath(*parts, "f" * 255).write_text("deep")
    target = mnt.joinpath(*parts, "f" * 255)
    assert len(os.fsencode(str(target))) > 3800
    with pyunionfs([layer], mnt):
        assert target.read_text() == "deep"
        assert os.listdir(target.parent) == ["f" * 255]


def test_node_ids_are_kept_apart_from_st_ino(tmp_path, mnt):
    from unionfs.fs.inodes import SEPARATE_NODE_IDS

    assert SEPARATE_NODE_IDS, "pyfuse3's EntryAttributes layout changed: node id and st_ino are one"
    (layer,) = layer_dirs(tmp_path, 1)
    (layer / "f").write_text("x")
    log = tmp_path / "debug.log"
    with open(log, "w") as stderr, pyunionfs([layer], mnt, "-d", stderr=stderr):
        assert os.stat(mnt / "f").st_ino == os.stat(layer / "f").st_ino  # the layer's own number
        assert (mnt / "f").read_text() == "x"
    # The kernel opened the file by its FUSE node id: the first one after the root's.
    assert "opcode: OPEN (14), nodeid: 2," in log.read_text()


def test_cached_listings_see_changes_made_through_the_mount(tmp_path, mnt):
    """The shim lets the kernel keep directory listings; changes through the mount drop them."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "d").mkdir()
    (lower / "d" / "a").touch()
    log = tmp_path / "debug.log"
    with open(log, "w") as stderr, pyunionfs([lower], mnt, "-d", upper=upper, workdir=work, stderr=stderr):
        assert os.listdir(mnt / "d") == ["a"]
        reads = log.read_text().count("opcode: READDIR")
        assert os.listdir(mnt / "d") == ["a"]
        assert log.read_text().count("opcode: READDIR") == reads, "the listing was not cached"
        (mnt / "d" / "b").touch()
        os.rename(mnt / "d" / "a", mnt / "d" / "c")
        assert sorted(os.listdir(mnt / "d")) == ["b", "c"]
        os.unlink(mnt / "d" / "b")
        assert os.listdir(mnt / "d") == ["c"]


def test_directory_attributes_read_by_the_shim_follow_changes(tmp_path, mnt):
    """After each change in a directory the kernel asks for its attributes again; for a directory
    of the upper layer alone the shim answers from the upper directory once Python has answered
    once. Every answer must be the directory as it is now, with the union's inode number."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        d = mnt / "d"
        d.mkdir()
        (d / "first").touch()
        shown_ino = os.stat(d).st_ino  # answered by Python, which hands the directory over
        changes = [lambda: (d / "f").touch(), lambda: (d / "sub").mkdir(), lambda: os.chmod(d, 0o700),
                   lambda: os.unlink(d / "f"), lambda: os.rmdir(d / "sub"), lambda: os.chown(d, 1234, 5678),
                   lambda: os.utime(d, ns=(10**18, 2 * 10**18)), lambda: (d / "g").touch(),
                   lambda: os.utime(d, ns=(-10**18 - 123, -10**18 - 456))]  # 1938: before the epoch
        for change in changes:
            change()
            (d / "probe").touch()  # a change in D: its attributes are asked for again
            seen, stored = os.stat(d), os.stat(upper / "d")
            assert seen.st_ino == shown_ino
            assert (seen.st_mode, seen.st_nlink, seen.st_uid, seen.st_gid, seen.st_atime_ns, seen.st_mtime_ns,
                    seen.st_size) == (stored.st_mode, stored.st_nlink, stored.st_uid, stored.st_gid,
                                      stored.st_atime_ns, stored.st_mtime_ns, stored.st_size)
            os.unlink(d / "probe")
        assert os.stat(d).st_nlink == 2 and os.stat(d).st_mode & 0o7777 == 0o700


def test_directory_attributes_read_by_the_shim_follow_renames_and_removal(tmp_path, mnt):
    """A directory the shim reads by its path is renamed, or removed while a process keeps it open
    and another directory takes its name (and, on ext4, its inode number): each node must still
    show its own directory."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        for name in ("a", "gone"):
            (mnt / name).mkdir()
            (mnt / name / "f").touch()
        ino = {name: os.stat(mnt / name).st_ino for name in ("a", "gone")}  # handed to the shim
        os.rename(mnt / "a", mnt / "b")
        (mnt / "a").mkdir(mode=0o711)
        (mnt / "b" / "g").touch()
        assert os.stat(mnt / "b").st_ino == ino["a"]
        assert os.stat(mnt / "a").st_mode & 0o777 == 0o711 and os.stat(mnt / "a").st_ino != ino["a"]
        assert os.stat(mnt / "b").st_mode & 0o777 == 0o755

        gone = mnt / "gone"
        os.chmod(gone, 0o700)
        (gone / "g").touch()
        assert os.stat(gone).st_mode & 0o777 == 0o700
        stored_ino = os.stat(upper / "gone").st_ino
        fd = os.open(gone, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.unlink(gone / "f")
            os.unlink(gone / "g")
            os.rmdir(gone)
            gone.mkdir(mode=0o755)
            (gone / "h").touch()
            assert os.stat(gone).st_mode & 0o777 == 0o755
            kept = os.fstat(fd)
            assert kept.st_mode & 0o777 == 0o700, (stored_ino, os.stat(upper / "gone").st_ino)
        finally:
            os.close(fd)


def _shown(st: os.stat_result) -> tuple:
    return st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, st.st_size


def test_file_attributes_changed_by_the_shim_follow_changes(tmp_path, mnt):
    """The shim changes the mode, owner and times of upper files Python handed over (one made
    through the mount, one copied up, which keeps its lower inode number), and reads them for
    GETATTR: every answer must be the upper file as it is now, with the union's inode number.
    A chown of a file with a file capability must drop it (the kernel removes it first, through
    REMOVEXATTR; the shim leaves the chown of a file with xattrs to Python all the same)."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "copied").write_text("lower\n")
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        (mnt / "made").write_text("made\n")
        os.chmod(mnt / "copied", 0o640)  # copies it up (Python), which hands it over
        shown_ino = {name: os.stat(mnt / name).st_ino for name in ("made", "copied")}
        assert shown_ino["copied"] == os.stat(lower / "copied").st_ino
        changes = [lambda p: os.chmod(p, 0o4751), lambda p: os.chown(p, 1234, 5678), lambda p: os.chown(p, -1, 42),
                   lambda p: os.utime(p, ns=(10**18, 2 * 10**18)), lambda p: os.utime(p),
                   lambda p: os.utime(p, ns=(-10**18 - 123, -10**18 - 456)), lambda p: os.chmod(p, 0o600)]
        for name in ("made", "copied"):
            for change in changes:
                change(mnt / name)
                seen, stored = os.stat(mnt / name), os.stat(upper / name)
                assert seen.st_ino == shown_ino[name]
                assert _shown(seen) == _shown(stored)
        capability = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2: cap_net_bind_service
        os.setxattr(mnt / "made", "security.capability", capability)
        assert "security.capability" in os.listxattr(mnt / "made")  # Python holds its xattr names
        os.chown(mnt / "made", 4321, 4321)
        assert "security.capability" not in os.listxattr(upper / "made")
        assert "security.capability" not in os.listxattr(mnt / "made")


def test_a_listing_after_the_shim_changed_a_file_shows_the_change(tmp_path, mnt):
    """A listing pass goes on from its snapshot, whose entries carry attributes; the kernel takes
    them for the files it has cached. A file whose mode the shim changed in between must not be
    shown with its old mode (Python learns of the change from the shim's queue)."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        d = mnt / "d"
        d.mkdir()
        names = [f"file-with-a-long-name-{i:04d}" for i in range(400)]
        for name in names:
            (d / name).touch()  # made through the mount: handed to the shim
        with os.scandir(d) as entries:
            next(entries)  # the first chunk of the pass: the snapshot is taken
            for name in names:
                os.chmod(d / name, 0o600)  # answered by the shim
            rest = list(entries)  # the pass goes on from the snapshot
        assert len(rest) == len(names) - 1
        assert {oct(os.stat(d / name).st_mode & 0o777) for name in names} == {"0o600"}


def test_a_removed_file_is_not_confused_with_its_successor(tmp_path, mnt):
    """A file the shim knows by its path is removed while a process keeps an O_PATH fd of it (so
    the daemon holds nothing open), and a new file takes its name and, on ext4, often its inode
    number: a change through the old fd must not reach the new file."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        path = mnt / "f"
        for _ in range(50):
            path.write_text("old\n")
            os.chmod(path, 0o644)  # handed to the shim
            fd = os.open(path, os.O_PATH)
            try:
                os.unlink(path)
                path.write_text("new\n")
                try:
                    os.chmod(f"/proc/self/fd/{fd}", 0o700)
                except FileNotFoundError:
                    pass  # the object is gone from the layers: nothing to change
                assert os.stat(path).st_mode & 0o777 == 0o644
                assert os.stat(upper / "f").st_mode & 0o777 == 0o644
            finally:
                os.close(fd)
            os.unlink(path)


def test_files_the_shim_unlinks_are_forgotten(tmp_path, mnt):
    """The shim unlinks files of upper directories itself (rm -rf) and Python forgets them before
    its next request: a new file that takes a removed one's inode number (ext4 reuses them at
    once) while the kernel still holds the old one (an O_PATH fd here) is an object of its own,
    reachable by its own name. Hard links and names with a lower copy are left to Python, which
    keeps the other link's count right and leaves a whiteout."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "merged").mkdir()
    (lower / "merged" / "below").write_text("lower\n")
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        d = mnt / "d"
        d.mkdir()
        for round_ in range(20):
            (d / "old").write_text("old\n")
            os.listdir(d)  # listed, as rm -rf lists before it unlinks: handed to the shim
            stored_ino = os.stat(upper / "d" / "old").st_ino
            held = os.open(d / "old", os.O_PATH)
            try:
                os.unlink(d / "old")
                new = d / f"new{round_}"
                new.write_text("new content\n")
                assert new.read_text() == "new content\n"
                os.chmod(new, 0o600)
                assert os.stat(new).st_mode & 0o777 == 0o600 == os.stat(upper / "d" / new.name).st_mode & 0o777
                assert not (d / "old").exists() and not (upper / "d" / "old").exists()
            finally:
                os.close(held)
            if os.stat(upper / "d" / new.name).st_ino == stored_ino:
                break
        (d / "one").write_text("linked\n")
        os.link(d / "one", d / "two")
        os.unlink(d / "one")
        assert os.stat(d / "two").st_nlink == 1 and (d / "two").read_text() == "linked\n"
        (mnt / "merged" / "below").read_text()
        (mnt / "merged" / "new").touch()
        for name in ("below", "new"):
            os.unlink(mnt / "merged" / name)
        assert os.listdir(mnt / "merged") == []
        assert os.listdir(upper / "merged") == ["below"]  # the whiteout


def test_absent_names_answered_by_the_shim_keep_the_entry_timeout(tmp_path, mnt):
    """The shim answers the lookup of a name absent from an upper directory Python handed over
    with a negative entry, as Python does, cached only for the entry timeout: with timeout=0 a
    name put into the upper layer behind the mount's back shows at once. Names that are there
    (a whiteout too) and ".wh." names still go to Python."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    with pyunionfs([lower], mnt, "-o", "timeout=0", upper=upper, workdir=work):
        d = mnt / "d"
        d.mkdir()
        os.listdir(d)
        for name in ("later", ".wh.later", "whited"):
            assert not (d / name).exists()
        (upper / "d" / "later").write_text("behind\n")
        os.mknod(upper / "d" / "whited", stat.S_IFCHR | 0o600, 0)  # a whiteout: nothing shows
        assert (d / "later").read_text() == "behind\n"
        assert not (d / "whited").exists() and not (d / ".wh.later").exists()
        assert sorted(os.listdir(d)) == ["later"]


def test_a_pass_left_unfinished_is_restarted_from_its_snapshot(tmp_path, mnt):
    """rm reads one chunk of each directory, then opens it again and reads it all: the second
    pass is answered from the first one's snapshot, unless a name in the directory changed
    through the mount since. (A name put into the upper layer behind the mount's back shows
    which: the layers were read again only when it appears.)"""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (upper / "d").mkdir()
    (upper / "d" / "a").touch()

    def read_one_chunk() -> None:
        with os.scandir(mnt / "d") as entries:
            next(entries)

    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        read_one_chunk()
        (upper / "d" / "behind").touch()
        assert os.listdir(mnt / "d") == ["a"], "the directory was listed again"
        read_one_chunk()
        (mnt / "d" / "b").touch()
        assert sorted(os.listdir(mnt / "d")) == ["a", "b", "behind"]
        read_one_chunk()
        os.unlink(mnt / "d" / "b")
        assert sorted(os.listdir(mnt / "d")) == ["a", "behind"]
        read_one_chunk()
        os.rename(mnt / "d" / "a", mnt / "d" / "c")
        assert sorted(os.listdir(mnt / "d")) == ["behind", "c"]


# Two processes send requests without pause: reads of an open file, which the shim answers in C
# and waits there for the next one, or setattrs, which Python answers and whose request loop
# waits for the next one in the shim (unionfs/fs/shim.py) rather than in trio.
STREAMS = {
    # O_DIRECT: every read reaches the daemon, none is served from the page cache.
    "reads answered in C": ("import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n"
                            "while True:\n    os.pread(fd, 4096, 0)\n"),
    "setattrs answered in Python": "import os, sys\nwhile True:\n    os.utime(sys.argv[1])\n",
}


@pytest.mark.parametrize("stream", STREAMS)
def test_a_stream_of_requests_leaves_trio_its_turn(tmp_path, mnt, stream):
    """While requests follow each other closely they are waited for outside trio; other requests
    (a lookup, a create), a copy-up finished in a worker thread, and a stop signal must still get
    through."""
    lower, upper, work = layer_dirs(tmp_path, 3)
    (lower / "data").write_bytes(os.urandom(1 << 20))
    (lower / "big").write_bytes(b"b" * (4 << 20))  # over the inline limit: copied in a thread
    with pyunionfs([lower], mnt, upper=upper, workdir=work) as daemon:
        clients = [subprocess.Popen([sys.executable, "-c", STREAMS[stream], str(mnt / "data")],
                                    stderr=subprocess.DEVNULL) for _ in range(4)]
        try:
            time.sleep(0.5)
            assert all(client.poll() is None for client in clients)
            (mnt / "new").write_text("x")
            # In a process of its own: if the copy's end never reached trio it would wait forever.
            appended = subprocess.run(["sh", "-c", f'printf ! >> "{mnt}/big"'], timeout=30)
            assert appended.returncode == 0
            assert sorted(os.listdir(mnt)) == ["big", "data", "new"]
            assert (upper / "big").stat().st_size == (4 << 20) + 1
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=20) == 0
        finally:
            for client in clients:
                client.kill()
                client.wait()
