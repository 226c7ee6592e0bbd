"""pyunionfs as the mount program of containers/storage, with the real podman, as root and as an
unprivileged user: the same steps with pyunionfs and with fuse-overlayfs, their outputs compared
(run --rm, build --layers, the built image's files, image diff, diff of a stopped container,
commit, export). Where fuse-overlayfs is the one that is wrong, the right answer is checked."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from bench import podman
from mounts import PYUNIONFS
from launchers import ROOTLESS_USER, build_image

pytestmark = pytest.mark.skipif(not podman.available(), reason="podman and runc are not installed")

CONTAINERFILE = """\
FROM localhost/busybox
RUN mkdir -p /work/dir/sub /work/full /tmp && echo one > /work/file && echo hl > /work/hl1 && \
    ln /work/hl1 /work/hl2 && ln -s file /work/sym && echo x > /work/dir/sub/x && \
    echo y > /work/full/y && echo keep > /work/keep
RUN rm /work/file && mv /work/dir /work/dir2 && chmod 600 /work/keep && echo more >> /work/hl1 && \
    rm -r /work/full && mkdir /work/full && echo z > /work/full/z
RUN exec 3<>/tmp/unlinked && rm /tmp/unlinked && echo through-fd >&3 && \
    cat /proc/self/fd/3 > /work/from-fd && rm /bin/vi
"""
# Path, type, mode, owner, link count, size, link target and a digest of every file named. A
# merged directory's link count is 1 on pyunionfs, as on kernel overlayfs: directories get "-".
LISTING = ("cd / && find {paths} 2>/dev/null | sort | while read f; do "
           "echo \"$f $(stat -c '%F %a %u:%g %s %N' \"$f\") $([ -d \"$f\" ] && echo - || stat -c %h \"$f\") "
           "$(md5sum < \"$f\" 2>/dev/null | cut -c1-8)\"; done")
# fuse-overlayfs brings back the entries a step removes elsewhere when the same step recreates a
# non-empty directory (rm -r /work/full && mkdir /work/full): kernel overlayfs and pyunionfs
# do not. That entry is checked, then left out of the comparison.
FUSE_OVERLAYFS_BUG = "work/full/y"


def export_listing(tar_bytes: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return sorted((m.name, m.type, m.mode, m.size, m.linkname if m.issym() else "") for m in tar)


def flow(pm: podman.Podman, image_tar: Path, context: Path) -> dict[str, object]:
    """The steps a user takes, and what podman said to each."""
    run = ("run", "--pull=never", "--network=none")
    out: dict[str, object] = {}
    pm("import", str(image_tar), "localhost/busybox")
    out["run --rm"] = pm.text(*run, "--rm", "localhost/busybox", "sh", "-c", "echo hello; cat /data; id -u")
    # The type of the container's root filesystem: the mount program's own (fuse.NAME).
    out["root type"] = pm.text(*run, "--rm", "localhost/busybox", "sh", "-c",
                               "awk '$2 == \"/\" {print $3}' /proc/self/mounts")
    pm("build", "--pull=never", "--network=none", "--layers", "-t", "localhost/built", str(context))
    out["built image"] = pm.text(*run, "--rm", "localhost/built", "sh", "-c",
                                 LISTING.format(paths="work bin/vi bin/sh tmp data"))
    out["image diff"] = sorted(pm.text("image", "diff", "localhost/built").splitlines())
    pm(*run, "--name", "changed", "localhost/built", "sh", "-c",
       "echo changed > /data && rm /work/keep /work/hl2 && mkdir /new && echo n > /new/f && "
       "ln -s f /new/l && mv /work/dir2 /work/dir3 && echo again >> /work/hl1")
    out["diff"] = sorted(pm.text("diff", "changed").splitlines())
    pm("commit", "changed", "localhost/committed")
    out["committed image"] = pm.text(*run, "--rm", "localhost/committed", "sh", "-c",
                                     LISTING.format(paths="new work data"))
    pm("export", "--output", "exported.tar", "changed")  # into the storage's directory, which USER owns
    out["export"] = export_listing((pm.base / "exported.tar").read_bytes())
    return out


def compare(results: dict[str, dict[str, object]]) -> None:
    ours, theirs = results["pyunionfs"], results["fuse-overlayfs"]
    assert (ours["root type"], theirs["root type"]) == ("fuse.pyunionfs\n", "fuse.fuse-overlayfs\n")
    assert FUSE_OVERLAYFS_BUG not in ours["built image"]
    for step in ours.keys() - {"root type"}:
        mine, other = ours[step], theirs[step]
        if isinstance(mine, str):
            mine, other = (
                [line for line in text.splitlines() if FUSE_OVERLAYFS_BUG not in line] for text in (mine, other))
        elif step == "export":
            mine, other = ([entry for entry in listing if entry[0] != FUSE_OVERLAYFS_BUG]
                           for listing in (mine, other))
        assert mine == other, f"{step}: pyunionfs and fuse-overlayfs differ"


def run_tier(user: str | None) -> dict[str, dict[str, object]]:
    scratch = Path(tempfile.mkdtemp(prefix="pm."))  # podman wants a runroot of 50 characters at most
    scratch.chmod(0o755)
    try:
        image_tar = podman.image_tarball(build_image(scratch / "image"), scratch / "busybox.tar")
        context = scratch / "context"
        context.mkdir()
        (context / "Containerfile").write_text(CONTAINERFILE)
        results = {}
        for name, program in (("pyunionfs", PYUNIONFS), ("fuse-overlayfs", "/usr/bin/fuse-overlayfs")):
            pm = podman.Podman(scratch / name[0], podman.mount_program_storage(program), user)
            try:
                results[name] = flow(pm, image_tar, context)
            finally:
                pm.close()
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.timeout(600)
def test_podman_rootful_matches_fuse_overlayfs():
    results = run_tier(None)
    compare(results)
    assert results["pyunionfs"]["run --rm"] == "hello\nfrom the image\n0\n"
    assert "D /bin/vi" in results["pyunionfs"]["image diff"]
    assert "through-fd" not in results["pyunionfs"]["built image"]  # a digest, not the text
    assert "work/from-fd regular file" in results["pyunionfs"]["built image"]


@pytest.mark.timeout(600)
def test_podman_rootless_matches_fuse_overlayfs():
    user = os.environ.get(ROOTLESS_USER)
    if not user:
        pytest.skip(f"the rootless tier needs an unprivileged user with subuid ranges in ${ROOTLESS_USER}")
    results = run_tier(user)
    compare(results)
    assert results["pyunionfs"]["run --rm"] == "hello\nfrom the image\n0\n"
