"""The image store: `import`, `images`, `tag`, `rmi`, `image inspect`, and layers unpacked into the
kernel's format from crafted, hostile tarballs: nothing is ever written outside the layer, and an
archive that cannot be stored leaves nothing stored."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard

from launchers import ROOTLESS_USER, build_image, unprivileged_prefix
from mounts import PYUNIONFS, kernel_overlay
from trees import checksum
from unionfs.runtime.userns import SUBGID_FILE, SUBUID_FILE, subordinate_range

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep


def pyunionfs(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYUNIONFS, "--root", str(root), *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def one_line_error(result: subprocess.CompletedProcess, *words: str, code: int = 1) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("pyunionfs: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def stored_layers(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root / "layers") if name != ".staging")


def nothing_stored(root: Path) -> None:
    """No layer, no half-unpacked one, no image."""
    assert stored_layers(root) == [] and os.listdir(root / "layers" / ".staging") == []
    assert pyunionfs(root, "images", "-q").stdout.strip() == ""


def layer_tree(root: Path, layer: str) -> Path:
    """A stored layer's tree, as overlay mounts take it."""
    return root / "layers" / layer.removeprefix("sha256:") / "diff"


def tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = fields.pop("mtime", 1_700_000_000)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def image_tar(tmp_path: Path) -> Path:
    root = build_image(tmp_path / "rootfs")
    with tarfile.open(tmp_path / "busybox.tar", "w") as tar:
        tar.add(root, arcname=".")
    return tmp_path / "busybox.tar"


def test_import_images_tag_inspect_rmi(image_tar, tmp_path):
    root = tmp_path / "store"
    imported = pyunionfs(root, "import", str(image_tar), "busybox")
    assert imported.returncode == 0, imported.stderr
    image_id = imported.stdout.strip()
    assert len(image_id) == 64
    assert pyunionfs(root, "tag", "busybox", "other:1").returncode == 0
    listing = pyunionfs(root, "images").stdout.splitlines()
    assert listing[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert [line.split()[:3] for line in listing[1:]] == [["localhost/busybox", "latest", image_id[:12]],
                                                         ["localhost/other", "1", image_id[:12]]]
    inspected = json.loads(pyunionfs(root, "image", "inspect", image_id[:6]).stdout)[0]
    assert inspected["Id"] == image_id and inspected["RepoTags"] == ["localhost/busybox:latest", "localhost/other:1"]
    (layer,) = stored_layers(root)
    assert "sha256:" + layer == inspected["RootFS"]["diff_ids"][0]
    assert (layer_tree(root, layer) / "bin" / "busybox").is_file()
    removed = pyunionfs(root, "rmi", "other:1")
    assert removed.stdout == "Untagged: localhost/other:1\n" and stored_layers(root) == [layer]
    removed = pyunionfs(root, "rmi", "busybox")
    assert removed.stdout == f"Untagged: localhost/busybox:latest\nDeleted: {image_id}\n"
    assert stored_layers(root) == [] and pyunionfs(root, "images", "-q").stdout.strip() == ""
    one_line_error(pyunionfs(root, "rmi", "busybox"), "no such image")


def test_a_layer_shared_by_two_images_stays_until_both_go(image_tar, tmp_path):
    root = tmp_path / "store"
    first = pyunionfs(root, "import", str(image_tar), "one").stdout.strip()
    assert pyunionfs(root, "import", str(image_tar), "two").returncode == 0
    layers = stored_layers(root)
    assert len(layers) == 1  # one layer, unpacked once, held by both
    assert pyunionfs(root, "rmi", first).returncode == 0  # both names go with the ID
    assert stored_layers(root) == layers


def test_whiteouts_and_metadata_in_the_kernels_format(tmp_path, mnt):
    """OCI whiteouts become the kernel's; owners, set-id bits, file capabilities, long names and
    holes are kept; overlay xattrs in the tar are not. Kernel overlayfs mounts the result."""
    long_name = "d/" + "n" * 200
    sparse = bytes(1 << 20) + b"end"
    capability = entry("d/cap", pax_headers={"SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1"),
                                             "SCHILY.xattr.trusted.overlay.redirect": "/../../etc"})
    archive = tarball(tmp_path / "layer.tar", [
        (entry("d", tarfile.DIRTYPE, uid=1000, gid=1000, mode=0o2775), None),
        (entry("d/suid", mode=0o4755, uid=0, gid=0), b"#!/bin/sh\n"),
        (capability, b"binary"),
        (entry(long_name), b"long\n"),
        (entry("d/sparse"), sparse),
        (entry("d/.wh.gone"), b""),
        (entry("opaque", tarfile.DIRTYPE), None),
        (entry("opaque/.wh..wh..opq"), b""),
        (entry("/absolute"), b"taken from the layer root\n"),
    ])
    root = tmp_path / "store"
    assert pyunionfs(root, "import", str(archive)).returncode == 0
    layer = layer_tree(root, stored_layers(root)[0])
    st = os.stat(layer / "d")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o2775)
    assert stat.S_IMODE(os.stat(layer / "d" / "suid").st_mode) == 0o4755
    assert os.getxattr(layer / "d" / "cap", "security.capability") == CAPABILITY
    assert "trusted.overlay.redirect" not in os.listxattr(layer / "d" / "cap")
    assert (layer / long_name).read_text() == "long\n"
    assert (layer / "d" / "sparse").read_bytes() == sparse and os.stat(layer / "d" / "sparse").st_blocks < 64
    gone = os.lstat(layer / "d" / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(layer / "opaque", "trusted.overlay.opaque") == b"y"
    assert not (layer / "opaque" / ".wh..wh..opq").exists() and (layer / "absolute").is_file()
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "gone").write_text("hidden by the layer\n")
    (lower / "opaque").mkdir()
    (lower / "opaque" / "hidden").write_text("hidden too\n")
    with kernel_overlay([layer, lower], mnt):
        assert not (mnt / "d" / "gone").exists() and os.listdir(mnt / "opaque") == []


HOSTILE = {
    "dot-dot": ([(entry("../escape"), b"out\n")], "outside"),
    "dot-dot inside": ([(entry("a/../../escape"), b"out\n")], "outside"),
    "below its own symlink": ([(entry("link", tarfile.SYMTYPE, linkname="{host}"), None),
                               (entry("link/planted"), b"planted\n")], "below a symlink"),
    "below a symlink that replaced a directory": ([(entry("d", tarfile.DIRTYPE), None), (entry("d/x"), b"x\n"),
                                                   (entry("d", tarfile.SYMTYPE, linkname="{host}"), None),
                                                   (entry("d/planted"), b"planted\n")], "below a symlink"),
    "hard link out": ([(entry("hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)], "outside"),
    "hard link to nothing": ([(entry("hard", tarfile.LNKTYPE, linkname="missing"), None)], "does not have"),
    "hard link through its symlink": ([(entry("link", tarfile.SYMTYPE, linkname="{host}"), None),
                                       (entry("hard", tarfile.LNKTYPE, linkname="link/secret"), None)],
                                      "does not have"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_whole(case, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host secret\n")
    before = checksum(host)
    members, words = HOSTILE[case]
    for info, _ in members:
        info.linkname = info.linkname.replace("{host}", str(host))
    archive = tarball(tmp_path / "hostile.tar", members)
    root = tmp_path / "store"
    one_line_error(pyunionfs(root, "import", str(archive)), words)
    assert checksum(host) == before
    nothing_stored(root)
    assert not (tmp_path / "escape").exists()


def test_truncated_and_absurd_archives_store_nothing(image_tar, tmp_path):
    root = tmp_path / "store"
    data = image_tar.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    one_line_error(pyunionfs(root, "import", str(truncated)), "truncated")
    huge = entry("huge")
    huge.size = 1 << 40  # a terabyte announced, a few bytes there
    absurd = tmp_path / "absurd.tar"
    absurd.write_bytes(huge.tobuf(tarfile.PAX_FORMAT) + b"x" * 1024)
    one_line_error(pyunionfs(root, "import", str(absurd)))
    one_line_error(pyunionfs(root, "import", str(tmp_path / "missing.tar")), "cannot read")
    for name, compress in (("corrupt.tar.gz", gzip.compress), ("corrupt.tar.zst", zstandard.ZstdCompressor().compress)):
        packed = bytearray(compress(data))
        packed[len(packed) // 2: len(packed) // 2 + 64] = bytes(64)  # a run of the stream zeroed
        (tmp_path / name).write_bytes(bytes(packed))
        one_line_error(pyunionfs(root, "import", str(tmp_path / name)), "corrupt")
    nothing_stored(root)


def test_gzip_and_zstd_layers(image_tar, tmp_path):
    root = tmp_path / "store"
    subprocess.run(["gzip", "-k", str(image_tar)], check=True)
    (tmp_path / "busybox.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(image_tar.read_bytes()))
    ids = {pyunionfs(root, "import", str(path)).stdout.strip()
           for path in (image_tar, tmp_path / "busybox.tar.gz", tmp_path / "busybox.tar.zst")}
    assert len(stored_layers(root)) == 1  # one diff_id: the same uncompressed tar
    assert all(len(image_id) == 64 for image_id in ids)


def test_rootless_import_shifts_owners_into_the_subuid_range_and_skips_devices(tmp_path):
    """As podman rootless: the store is used from the user's namespace, so the layer's root is
    the user and its uid 1000 is the 1000th subordinate id; device nodes are not made."""
    user = os.environ.get(ROOTLESS_USER)
    if not user:
        pytest.skip(f"the rootless tier needs an unprivileged user with subuid ranges in ${ROOTLESS_USER}")
    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-rootless-test."))  # pytest's base is 0700
    try:
        prefix, (uid, gid) = unprivileged_prefix(user, scratch)
        archive = tarball(scratch / "layer.tar", [
            (entry("by-root"), b"root's\n"),
            (entry("by-1000", uid=1000, gid=1000, mode=0o4755), b"user's\n"),
            (entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        ])
        root = scratch / "store"
        root.mkdir()
        os.chown(root, uid, gid)
        result = subprocess.run([*prefix, PYUNIONFS, "--root", str(root), "import", str(archive)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        layer = layer_tree(root, stored_layers(root)[0])
        subuid = subordinate_range(SUBUID_FILE, uid, user).start
        subgid = subordinate_range(SUBGID_FILE, uid, user).start
        st = os.stat(layer / "by-1000")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (subuid + 999, subgid + 999, 0o4755)
        assert (os.stat(layer / "by-root").st_uid, os.stat(layer / "by-root").st_gid) == (uid, gid)
        assert not os.path.lexists(layer / "null")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
