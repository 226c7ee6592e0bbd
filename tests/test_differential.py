"""Copy-on-write against kernel overlayfs: the same random operations on both, over the same
lowers, must give the same results, the same merged tree and the same upper directory."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from fsops import OpGenerator, outcome
from mounts import kernel_overlay, pyunionfs
from trees import checksum, differences, make_opaque, make_whiteout, snapshot

# Kernel options and the pyunionfs options that give the same semantics.
MODES = {
    "redirect": ("redirect_dir=on,index=off,metacopy=off", ()),
    "exdev": ("redirect_dir=off,index=off,metacopy=off", ("-o", "redirect_dir=off")),
    # The kernel serves upper files through FUSE passthrough where it can (the default, as in
    # every other mode): the same without it.
    "passthrough-off": ("redirect_dir=on,index=off,metacopy=off", ("-o", "passthrough=off")),
    # The kernel's metacopy and index formats differ from pyunionfs's full copies on disk, so
    # this mode compares the merged trees and the round trips, not the upper directories.
    "all-kernel-features": ("redirect_dir=on,index=on,metacopy=on", ()),
    # Lower hard links stay together only with the kernel's index, so only this mode has them.
    # It has a device node too: `dev` lets both open it (a FUSE mount is nodev by default).
    "hard-links": ("redirect_dir=on,index=on,metacopy=on", ("-o", "dev")),
}
# What the comparison of upper directories looks at: the user's xattrs and the opaque marks.
# The kernel also writes origin, impure and uuid, which are its own bookkeeping.
UPPER_XATTRS = ("user.", "trusted.overlay.opaque", "trusted.overlay.overlay.", "trusted.t")


def build_lowers(root: Path, hard_links: bool) -> tuple[list[Path], list[str]]:
    """Two lowers with files, dirs, symlinks, a fifo, xattrs, a whiteout and an opaque dir, and
    with HARD_LINKS a lower hard-link pair of every type of file."""
    top, bottom = root / "top", root / "bottom"
    for d in range(4):
        for sub in ("", "/s"):
            (bottom / f"d{d}{sub}").mkdir(parents=True)
            for f in range(3):
                (bottom / f"d{d}{sub}" / f"f{f}").write_bytes(os.urandom(100 * (f + 1)))
    (bottom / "big").write_bytes(os.urandom(300_000))
    with open(bottom / "sparse", "wb") as sparse:
        sparse.truncate(5_000_000)
    (bottom / "rel-link").symlink_to("d0/f0")
    os.mkfifo(bottom / "fifo")
    os.setxattr(bottom / "d0" / "f1", "user.a", b"lower")
    os.setxattr(bottom / "d1", "user.b", b"dir")
    os.chown(bottom / "d2" / "f2", 1000, 1000)
    os.chmod(bottom / "d3" / "f0", 0o4755)
    (top / "d0").mkdir(parents=True)
    (top / "d0" / "f0").write_text("top replaces bottom\n")
    (top / "d0" / "t0").write_text("top only\n")
    make_whiteout(top / "d0" / "f2")
    (top / "d1").mkdir()
    make_opaque(top / "d1")
    (top / "d1" / "only").write_text("opaque dir\n")
    (top / "d4").mkdir()
    (top / "d4" / "new").write_text("top dir\n")
    if hard_links:  # one of each type: regular, symlink, fifo, socket, device
        os.link(bottom / "d2" / "f0", bottom / "d3" / "s" / "linked")
        os.link(bottom / "rel-link", bottom / "d1" / "link-too", follow_symlinks=False)
        os.link(bottom / "fifo", bottom / "d2" / "s" / "fifo-too")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(bottom / "d0" / "sock"))
        os.link(bottom / "d0" / "sock", bottom / "d3" / "sock-too")
        os.mknod(bottom / "d1" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.link(bottom / "d1" / "null", bottom / "d2" / "null-too")
    paths = sorted({os.path.relpath(os.path.join(dirpath, name), layer)
                    for layer in (top, bottom) for dirpath, dirs, files in os.walk(layer)
                    for name in dirs + files})
    paths += ["n0", "n1", "d0/n2", "d1/n3", "d2/s/n4", "d4/n5", "n0/n6"]
    return [top, bottom], paths


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_operations_match_kernel_overlay(seed, mode, tmp_path, mnt):
    kernel_options, our_options = MODES[mode]
    lowers, paths = build_lowers(tmp_path / "lowers", hard_links=mode == "hard-links")
    before = [checksum(layer) for layer in lowers]
    dirs = {name: tmp_path / name for name in ("kmnt", "kupper", "kwork", "upper", "work")}
    for path in dirs.values():
        path.mkdir()
    generator = OpGenerator(seed, paths)
    log = []
    with kernel_overlay(lowers, dirs["kmnt"], kernel_options, dirs["kupper"], dirs["kwork"]), \
            pyunionfs(lowers, mnt, *our_options, upper=dirs["upper"], workdir=dirs["work"]):
        for step in range(1000):
            label, action = generator.next()
            expected, got = outcome(action, dirs["kmnt"]), outcome(action, mnt)
            log.append(f"{step}: {label}: {expected}")
            assert got == expected, "\n".join(log[-15:] + [f"pyunionfs: {got}"])
        merged_kernel = snapshot(dirs["kmnt"], times=False)
        merged_ours = snapshot(mnt, times=False)
    assert differences(merged_kernel, merged_ours) == []
    if "metacopy=off" in kernel_options:
        assert differences(snapshot(dirs["kupper"], UPPER_XATTRS, times=False),
                           snapshot(dirs["upper"], UPPER_XATTRS, times=False)) == []
    assert [checksum(layer) for layer in lowers] == before
    # Round trips: each mounts the upper the other wrote, and shows the same tree.
    with kernel_overlay(lowers, dirs["kmnt"], kernel_options, dirs["upper"], dirs["work"]):
        assert differences(merged_ours, snapshot(dirs["kmnt"], times=False)) == []
    with pyunionfs(lowers, mnt, *our_options, upper=dirs["kupper"], workdir=dirs["kwork"]):
        assert differences(merged_kernel, snapshot(mnt, times=False)) == []
