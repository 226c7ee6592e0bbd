"""OCI/AUFS whiteout markers in the upper directory: containers/storage stores the layers it
imports, commits and builds with ".wh.NAME" and ".wh..wh..opq" when a mount program is set, and
`podman image diff` mounts such a layer as the upper. They hide what they name, as fuse-overlayfs
reads them; a name made again through the union turns its marker into the kernel's whiteout."""
from __future__ import annotations

import os
from pathlib import Path

from mounts import PYUNIONFS, helper_mount, kernel_overlay, overlay_options
from trees import snapshot


def make_layers(root: Path) -> tuple[Path, Path, Path]:
    lower, upper, work = root / "lower", root / "upper", root / "work"
    for path in (lower / "bin", lower / "etc", lower / "d", upper / "bin", upper / "etc", work):
        path.mkdir(parents=True)
    for name in ("bin/vi", "bin/sh", "etc/a", "etc/b", "d/x"):
        (lower / name).write_text(f"lower {name}\n")
    (upper / "bin" / ".wh.vi").touch()
    (upper / "etc" / ".wh..wh..opq").touch()
    (upper / "etc" / "c").write_text("upper etc/c\n")
    (upper / ".wh.d").touch()
    return lower, upper, work


def test_upper_markers_hide_as_in_fuse_overlayfs(tmp_path):
    seen = {}
    for program in (PYUNIONFS, "fuse-overlayfs"):
        lower, upper, work = make_layers(tmp_path / os.path.basename(program))
        mnt = tmp_path / f"mnt-{os.path.basename(program)}"
        mnt.mkdir()
        with helper_mount(program, mnt, overlay_options([lower], upper, work)):
            seen[program] = snapshot(mnt, times=False)
    assert seen[PYUNIONFS] == seen["fuse-overlayfs"]
    assert sorted(seen[PYUNIONFS]) == ["bin", "bin/sh", "etc", "etc/c"]


def test_a_name_made_again_leaves_the_upper_in_the_kernel_format(tmp_path, mnt):
    lower, upper, work = make_layers(tmp_path)
    options = overlay_options([lower], upper, work)
    with helper_mount(PYUNIONFS, mnt, options):
        (mnt / "bin" / "vi").write_text("new vi\n")
        (mnt / "d").mkdir()
        os.rename(mnt / "etc" / "c", mnt / "bin" / "c")
        made = snapshot(mnt, times=False)
    assert not any(name.startswith(".wh.") for name in os.listdir(upper / "bin") + os.listdir(upper))
    with helper_mount(PYUNIONFS, mnt, options):
        assert snapshot(mnt, times=False) == made
        assert (mnt / "bin" / "vi").read_text() == "new vi\n" and os.listdir(mnt / "d") == []
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    with kernel_overlay([lower], kernel_mnt, upper=upper, workdir=tmp_path / "work"):
        kernel = snapshot(kernel_mnt, times=False)
    # etc keeps its ".wh..wh..opq", which the kernel does not read: everything else agrees.
    assert {k: v for k, v in kernel.items() if not k.startswith("etc")} == \
        {k: v for k, v in made.items() if not k.startswith("etc")}
