"""Renaming directories that come from lower layers: overlay.redirect, as kernel overlayfs with
redirect_dir=on writes and reads it."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mounts import kernel_overlay, pyunionfs
from trees import differences, snapshot


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("top", "bottom", "upper", "work", "kernel")}
    for path in paths.values():
        path.mkdir()
    for layer in ("top", "bottom"):
        (paths[layer] / "d" / "sub").mkdir(parents=True)
        (paths[layer] / "d" / f"from-{layer}").write_text(layer)
        (paths[layer] / "d" / "sub" / f"deep-{layer}").write_text(layer)
    (paths["top"] / "e").mkdir()
    return paths


def union(layers, mnt, *options):
    return pyunionfs([layers["top"], layers["bottom"]], mnt, *options, upper=layers["upper"],
                     workdir=layers["work"])


EXPECTED = ["from-bottom", "from-top", "sub", "sub/deep-bottom", "sub/deep-top"]


def tree(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
                  for n in dirs + files)


def test_merged_directory_moves_with_its_lower_entries(layers, mnt):
    with union(layers, mnt):
        os.rename(mnt / "d", mnt / "e" / "moved")
        assert not (mnt / "d").exists()
        assert tree(mnt / "e" / "moved") == EXPECTED
        os.rename(mnt / "e" / "moved", mnt / "e" / "again")  # a second rename, in the same directory
        (mnt / "e" / "again" / "sub" / "new").write_text("new")
        merged = snapshot(mnt, times=False)
    assert os.getxattr(layers["upper"] / "e" / "again", "trusted.overlay.redirect") == b"/d"
    assert os.stat(layers["upper"] / "d").st_rdev == 0  # a whiteout where the directory was
    with union(layers, mnt):
        assert differences(merged, snapshot(mnt, times=False)) == []
    with kernel_overlay([layers["top"], layers["bottom"]], layers["kernel"], "redirect_dir=on",
                        layers["upper"], layers["work"]):
        assert differences(merged, snapshot(layers["kernel"], times=False)) == []


def test_moved_into_a_new_directory(layers, mnt):
    """An absolute redirect leads to the lower layers also below a directory that has none."""
    with union(layers, mnt):
        os.mkdir(mnt / "new")
        os.rename(mnt / "d", mnt / "new" / "d")
        assert tree(mnt / "new" / "d") == EXPECTED
    with union(layers, mnt):
        assert tree(mnt / "new" / "d") == EXPECTED


def test_rename_in_the_same_directory_records_the_old_name(layers, mnt):
    with union(layers, mnt):
        os.rename(mnt / "d", mnt / "d2")
        assert tree(mnt / "d2") == EXPECTED
    assert os.getxattr(layers["upper"] / "d2", "trusted.overlay.redirect") == b"d"


def test_recreated_directory_does_not_bring_the_lower_back(layers, mnt):
    """fuse-overlayfs shows the lower d again after rm -rf d; mkdir d; mv d d2 (reference (d) 6)."""
    with union(layers, mnt):
        for dirpath, dirs, files in os.walk(mnt / "d", topdown=False):
            for name in files:
                os.unlink(os.path.join(dirpath, name))
            for name in dirs:
                os.rmdir(os.path.join(dirpath, name))
        os.rmdir(mnt / "d")
        os.mkdir(mnt / "d")
        os.rename(mnt / "d", mnt / "d2")
        assert not (mnt / "d").exists()
        assert os.listdir(mnt / "d2") == []
    with union(layers, mnt):
        assert not (mnt / "d").exists() and os.listdir(mnt / "d2") == []


def test_redirect_dir_off_answers_exdev(layers, mnt):
    with union(layers, mnt, "-o", "redirect_dir=off"):
        with pytest.raises(OSError) as exc:
            os.rename(mnt / "d", mnt / "d2")
        assert exc.value.errno == errno.EXDEV
        os.mkdir(mnt / "fresh")
        os.rename(mnt / "fresh", mnt / "e" / "fresh")  # a directory only in the upper moves
    assert not any("redirect" in name for name in os.listxattr(layers["upper"] / "e" / "fresh"))
