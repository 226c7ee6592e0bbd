"""The read path against kernel overlayfs: the same lowers must show the same tree."""
from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mounts import kernel_overlay, pyunionfs
from trees import (ACL_ACCESS, LayerBuilder, checksum, differences, grant_to_nobody, make_opaque, make_whiteout,
                   reads_as_nobody, snapshot)


def count_entries(roots: list[Path]) -> int:
    return sum(len(files) + len(dirs) for root in roots for _, dirs, files in os.walk(root))


def timed_find(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["find", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("generated")
    layers = [root / f"layer{i}" for i in range(3)]
    for layer in layers:
        layer.mkdir()
    LayerBuilder(layers, seed=20261128).build(dirs=400, names_per_dir=30)
    return layers


def is_whiteout_in_layers(layers: list[Path], rel: str) -> bool:
    """Is REL, in the highest layer that has it, a char 0:0 whiteout or an xwhiteout?"""
    path = next(layer / rel for layer in layers if os.path.lexists(layer / rel))
    st = os.lstat(path)
    return (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or (
        stat.S_ISREG(st.st_mode) and "trusted.overlay.whiteout" in os.listxattr(path))


def test_generated_tree_matches_kernel_overlay(generated, tmp_path, mnt):
    assert count_entries(generated) >= 10_000
    before = [checksum(layer) for layer in generated]
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    # Kernel 6.18 quirk: in a lower-only mount, readdir of a directory that merges nothing below
    # (it is opaque) lists its whiteouts and xwhiteouts, though lookup answers ENOENT for them.
    # pyunionfs hides them in both; they must be whiteouts, nothing else.
    ghosts: list[str] = []
    with kernel_overlay(generated, kernel_mnt):
        expected = snapshot(kernel_mnt, ghosts=ghosts)
        kernel_find = timed_find(kernel_mnt)
    with pyunionfs(generated, mnt):
        cold_find = timed_find(mnt)
        got = snapshot(mnt)
        warm_find = timed_find(mnt)
    print(f"\nfind over {len(expected)} entries: kernel overlayfs {kernel_find:.3f}s, "
          f"pyunionfs cold {cold_find:.3f}s, warm {warm_find:.3f}s")
    assert len(expected) > 5_000
    assert differences(expected, got) == []
    assert all(is_whiteout_in_layers(generated, rel) for rel in ghosts), ghosts
    assert [checksum(layer) for layer in generated] == before


def test_kernel_forms_on_every_layer(tmp_path, mnt):
    """Whiteouts and opaque dirs in the top, middle and bottom layers, each against the kernel."""
    layers = [tmp_path / name for name in ("top", "middle", "bottom")]
    for depth, layer in enumerate(layers):
        (layer / "d").mkdir(parents=True)
        for name in ("a", "b", "c"):
            (layer / "d" / f"{name}{depth}").write_text(f"{name} {depth}\n")
            (layer / f"{name}{depth}").write_text(f"{name} {depth}\n")
    make_whiteout(layers[0] / "a1")
    make_whiteout(layers[1] / "a2")
    make_whiteout(layers[0] / "d" / "b2")
    make_opaque(layers[1] / "d")
    (layers[2] / "gone").mkdir()
    (layers[2] / "gone" / "child").touch()
    make_whiteout(layers[1] / "gone")
    (layers[0] / "gone").mkdir()  # a new dir over a whiteout: nothing of the bottom shows
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    with kernel_overlay(layers, kernel_mnt):
        expected = snapshot(kernel_mnt)
    with pyunionfs(layers, mnt):
        got = snapshot(mnt)
    assert "gone/child" not in got and "a1" not in got and "d/a2" not in got
    assert differences(expected, got) == []


def test_posix_acls_of_the_layers_count_as_in_the_kernel(shared_tmp):
    lower, mnt = shared_tmp / "lower", shared_tmp / "mnt"
    lower.mkdir()
    mnt.mkdir()
    for name in ("granted", "plain", "to-grant"):
        (lower / name).write_text(f"{name}\n")
        (lower / name).chmod(0o600)
    grant = grant_to_nobody()
    os.setxattr(lower / "granted", ACL_ACCESS, grant)
    before = checksum(lower)
    results, uppers = {}, {}
    for name, mount in (("kernel", kernel_overlay), ("pyunionfs", pyunionfs)):
        upper, work = shared_tmp / f"{name}-upper", shared_tmp / f"{name}-work"
        upper.mkdir()
        work.mkdir()
        with mount([lower], mnt, upper=upper, workdir=work):
            os.setxattr(mnt / "to-grant", ACL_ACCESS, grant)  # copies it up
            results[name] = {entry: (reads_as_nobody(mnt / entry), os.stat(mnt / entry).st_mode)
                             for entry in ("granted", "plain", "to-grant")}
        uppers[name] = (os.getxattr(upper / "to-grant", ACL_ACCESS), os.stat(upper / "to-grant").st_mode)
    assert results["kernel"] == {"granted": (True, 0o100640), "plain": (False, 0o100600),
                                 "to-grant": (True, 0o100640)}
    assert results["pyunionfs"] == results["kernel"]
    assert uppers["pyunionfs"] == uppers["kernel"]
    assert checksum(lower) == before
