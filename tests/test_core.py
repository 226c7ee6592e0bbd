"""The C core on its own: resolution and listings over real layer directories, no mount."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from trees import make_opaque, make_whiteout, make_xwhiteout
from unionfs.fs import core
from unionfs.fs.layers import ROOT_PATH, LayerStack


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / name for name in ("top", "middle", "bottom")]
    for path in paths:
        path.mkdir()
    return paths


def stack_of(layers: list[Path]) -> LayerStack:
    return LayerStack([str(p) for p in layers])


def dir_paths(stack: LayerStack, directory: bytes, mask: int | None):
    mask = stack.all_layers_mask if mask is None else mask
    return stack.c.dir_paths([directory if mask >> i & 1 else None for i in range(stack.c.count)])


def resolve(stack: LayerStack, name: bytes, directory: bytes = ROOT_PATH, mask: int | None = None):
    return stack.c.resolve(dir_paths(stack, directory, mask), name)


def listing(stack: LayerStack, directory: bytes = ROOT_PATH, mask: int | None = None) -> dict:
    return dict(stack.c.list(dir_paths(stack, directory, mask), directory))


def test_first_layer_wins(layers):
    (layers[1] / "a").write_text("middle")
    (layers[2] / "a").write_text("bottom!")
    found = resolve(stack_of(layers), b"a")
    assert found.layer == 1
    assert found.attr.size == len("middle")
    assert found.dir_layers == 0


def test_absent_name(layers):
    assert resolve(stack_of(layers), b"nothing") is None


def test_char_whiteout_hides_lower(layers):
    make_whiteout(layers[0] / "a")
    (layers[1] / "a").write_text("hidden")
    stack = stack_of(layers)
    assert resolve(stack, b"a") is None
    assert b"a" not in listing(stack)


def test_other_char_device_is_not_a_whiteout(layers):
    os.mknod(layers[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    found = resolve(stack_of(layers), b"null")
    assert found.layer == 0 and stat.S_ISCHR(found.attr.mode)


def test_directories_merge_until_opaque(layers):
    for layer in layers:
        (layer / "d").mkdir()
        (layer / "d" / layer.name).touch()
    make_opaque(layers[1] / "d", namespace="user")
    stack = stack_of(layers)
    found = resolve(stack, b"d")
    assert found.layer == 0 and found.dir_layers == 0b011
    assert set(listing(stack, b"d", found.dir_layers)) == {b"top", b"middle"}


def test_non_directory_ends_a_merge(layers):
    (layers[0] / "d").mkdir()
    (layers[1] / "d").write_text("file")
    (layers[2] / "d").mkdir()
    assert resolve(stack_of(layers), b"d").dir_layers == 0b001


def test_file_over_directory(layers):
    (layers[0] / "d").write_text("file")
    (layers[1] / "d").mkdir()
    (layers[1] / "d" / "child").touch()
    found = resolve(stack_of(layers), b"d")
    assert stat.S_ISREG(found.attr.mode) and found.dir_layers == 0


def test_oci_whiteouts(layers):
    (layers[0] / ".wh.a").touch()
    (layers[0] / "b").write_text("top b")
    (layers[0] / ".wh.b").touch()  # a name and its whiteout in one layer: the name stays
    (layers[0] / "d").mkdir()
    (layers[0] / "d" / ".wh..wh..opq").touch()
    for name in ("a", "b"):
        (layers[1] / name).write_text("lower")
    (layers[1] / "d").mkdir()
    (layers[1] / "d" / "hidden").touch()
    stack = stack_of(layers)
    assert resolve(stack, b"a") is None
    assert resolve(stack, b"b").layer == 0
    assert resolve(stack, b".wh.a") is None
    d = resolve(stack, b"d")
    assert d.dir_layers == 0b001
    assert set(listing(stack)) == {b"b", b"d"}
    assert listing(stack, b"d", d.dir_layers) == {}


def test_xwhiteouts(layers):
    for layer in layers[1:]:
        (layer / "d").mkdir()
    make_xwhiteout(layers[1] / "d", "gone")
    (layers[1] / "d" / "empty").touch()
    (layers[2] / "d" / "gone").write_text("hidden by the xwhiteout")
    stack = stack_of(layers)
    d = resolve(stack, b"d")
    assert d.dir_layers == 0b110  # opaque=x does not make a directory opaque
    assert set(listing(stack, b"d", d.dir_layers)) == {b"empty"}
    assert resolve(stack, b"gone", b"d", d.dir_layers) is None


def test_xattr_whiteout_needs_the_parent_mark(layers):
    (layers[0] / "f").touch()
    os.setxattr(layers[0] / "f", "trusted.overlay.whiteout", b"")
    assert resolve(stack_of(layers), b"f").layer == 0


def test_listing_dedupes_in_layer_order(layers):
    for i, layer in enumerate(layers):
        for name in ("common", f"only{i}"):
            (layer / name).write_text(str(i))
    stack = stack_of(layers)
    entries = list(stack.c.list(dir_paths(stack, ROOT_PATH, 0b111), ROOT_PATH))
    names = [name for name, _ in entries]
    assert sorted(names) == sorted([b"common", b"only0", b"only1", b"only2"])
    assert len(names) == len(set(names))
    assert dict(entries)[b"common"].layer == 0
    assert names.index(b"only0") < names.index(b"only1") < names.index(b"only2")


def test_big_directory(layers):
    for i in range(3000):
        (layers[i % 3] / f"n{i % 2000}").touch()
    assert len(listing(stack_of(layers))) == 2000


def test_symlink_is_not_followed(layers, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside the layer")
    (layers[0] / "esc").symlink_to(outside)
    stack = stack_of(layers)
    found = resolve(stack, b"esc")
    assert stat.S_ISLNK(found.attr.mode)
    # "esc" taken as a directory of the union leads nowhere: the symlink is not followed.
    assert resolve(stack, b"secret", b"esc", 0b001) is None
    with pytest.raises(OSError):
        core.open_at(stack.layers[0].root_fd, b"esc/secret", os.O_RDONLY)


def test_paths_longer_than_path_max(layers):
    parts = [("p%d" % i).ljust(250, "y") for i in range(20)]  # about 5,000 bytes
    fd = os.open(layers[2], os.O_PATH)
    for part in parts:  # one level at a time: the whole path is too long for one system call
        os.mkdir(part, dir_fd=fd)
        fd, parent_fd = os.open(part, os.O_PATH, dir_fd=fd), fd
        os.close(parent_fd)
    file_fd = os.open("file", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
    os.write(file_fd, b"deep")
    os.close(file_fd)
    os.close(fd)
    stack = stack_of(layers)
    directory = os.fsencode("/".join(parts))
    assert len(directory) > 4096
    found = resolve(stack, b"file", directory, 0b100)
    assert found.layer == 2 and found.attr.size == 4
    assert set(listing(stack, directory, 0b100)) == {b"file"}
    fd = core.open_at(stack.layers[2].root_fd, directory + b"/file", os.O_RDONLY)
    assert os.read(fd, 10) == b"deep"
    os.close(fd)


def test_name_too_long(layers):
    with pytest.raises(OSError) as exc:
        resolve(stack_of(layers), b"x" * 256)
    assert exc.value.errno == errno.ENAMETOOLONG


def test_equal_inode_numbers_get_different_st_ino(tmp_path):
    from mounts import tmpfs

    with tmpfs(tmp_path / "fs1") as fs1, tmpfs(tmp_path / "fs2") as fs2:
        (fs1 / "a").touch()
        (fs2 / "b").touch()
        assert os.stat(fs1 / "a").st_ino == os.stat(fs2 / "b").st_ino
        stack = LayerStack([str(fs1), str(fs2)])
        a, b = resolve(stack, b"a"), resolve(stack, b"b")
        assert stack.compose_ino(a.attr.dev, a.attr.ino) != stack.compose_ino(b.attr.dev, b.attr.ino)
        stack.close()


@pytest.mark.parametrize("sync", [False, True])
def test_copy_file_keeps_data_holes_owner_mode_and_times(tmp_path, sync):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    chunk = 8 << 20  # the C core's copy chunk: the data spans several of them
    with open(src_dir / "f", "wb") as f:
        f.write(os.urandom(chunk + 12345))
        f.seek(3 * chunk)  # a hole in the middle ...
        f.write(b"tail")
        f.truncate(5 * chunk)  # ... and one at the end
    os.chown(src_dir / "f", 1234, 5678)
    os.chmod(src_dir / "f", 0o4751)
    os.utime(src_dir / "f", ns=(-1_500_000_000, 1_000_000_001))  # before 1970 and after
    st = os.stat(src_dir / "f")
    src_fd = os.open(src_dir, os.O_PATH)
    try:
        for name, with_data in (("full", True), ("empty", False)):
            with open(tmp_path / name, "wb") as copy:
                core.copy_file(src_fd, b"f", copy.fileno(), st, with_data, sync)
    finally:
        os.close(src_fd)
    full = os.stat(tmp_path / "full")
    assert (tmp_path / "full").read_bytes() == (src_dir / "f").read_bytes()
    assert full.st_blocks * 512 < 2 * chunk, "a hole was filled in"
    for got in (full, os.stat(tmp_path / "empty")):
        assert (got.st_uid, got.st_gid, stat.S_IMODE(got.st_mode)) == (1234, 5678, 0o4751)
        assert (got.st_atime_ns, got.st_mtime_ns) == (-1_500_000_000, 1_000_000_001)
    assert os.stat(tmp_path / "empty").st_size == 0, "without data the copy is empty"


def test_copy_file_of_a_missing_source_fails(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    st = os.stat(tmp_path / "f")
    dir_fd = os.open(tmp_path, os.O_PATH)
    try:
        with open(tmp_path / "copy", "wb") as copy, pytest.raises(FileNotFoundError):
            core.copy_file(dir_fd, b"gone", copy.fileno(), st, True, True)
    finally:
        os.close(dir_fd)
