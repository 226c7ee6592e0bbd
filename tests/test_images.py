"""Images in and out: `load` of docker-archive, oci-archive and OCI layout directories (plain,
gzip, zstd; every digest checked), `save` in both formats giving back the very layers loaded,
hostile and broken archives refused whole, Ctrl-C and two loads at once; and the round trip with
podman: its archives loaded, a container's change committed, saved, loaded by podman and seen
by `podman run` exactly."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import zstandard

from bench import podman
from launchers import build_image
from mounts import PYUNIONFS
from test_store import nothing_stored, one_line_error, pyunionfs, stored_layers


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The busybox image, imported with a config, saved in both formats by pyunionfs."""
    scratch = tmp_path_factory.mktemp("saved")
    rootfs = build_image(scratch / "rootfs")
    with tarfile.open(scratch / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    root = scratch / "store"
    assert pyunionfs(root, "import", "--change", "CMD [\"sh\"]", str(scratch / "rootfs.tar"), "busybox").returncode == 0
    archives = {"docker-archive": scratch / "docker.tar", "oci-archive": scratch / "oci.tar",
                "rootfs": scratch / "rootfs.tar"}
    for image_format in ("docker-archive", "oci-archive"):
        result = pyunionfs(root, "save", "--format", image_format, "-o", str(archives[image_format]), "busybox")
        assert result.returncode == 0, result.stderr
    return archives


def test_load_saves_of_both_formats_and_save_gives_the_same_bytes(saved, tmp_path):
    docker = members(saved["docker-archive"])
    (manifest,) = json.loads(docker["manifest.json"])
    assert manifest["RepoTags"] == ["localhost/busybox:latest"]
    image_id = manifest["Config"].removesuffix(".json")
    assert sha256(docker[manifest["Config"]]) == f"sha256:{image_id}"
    for image_format in ("docker-archive", "oci-archive"):
        root = tmp_path / image_format
        loaded = pyunionfs(root, "load", "-i", str(saved[image_format]))
        assert loaded.stdout == f"Loaded image: localhost/busybox:latest\n{image_id}\n", loaded.stderr
        again = tmp_path / f"{image_format}-again.tar"
        assert pyunionfs(root, "save", "--format", image_format, "-o", str(again), "busybox").returncode == 0
        assert members(again) == members(saved[image_format])  # the same layer bytes: the same IDs
        result = pyunionfs(root, "run", "--rm", "busybox", "cat", "/data")
        assert result.stdout == "from the image\n", result.stderr
    oci = members(saved["oci-archive"])
    index = json.loads(oci["index.json"])
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "localhost/busybox:latest"


def test_oci_layouts_gzip_and_zstd(saved, tmp_path):
    """An OCI layout directory, with its layer recompressed (zstd) and the descriptors made to
    match; a gzip-compressed docker-archive. The layer is the same diff_id: stored once."""
    layout = tmp_path / "layout"
    with tarfile.open(saved["oci-archive"]) as tar:
        tar.extractall(layout)
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads(manifest_path.read_text())
    layer = manifest["layers"][0]
    compressed = zstandard.ZstdCompressor().compress((layout / "blobs" / "sha256" /
                                                      layer["digest"].removeprefix("sha256:")).read_bytes())
    layer.update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd", digest=sha256(compressed),
                 size=len(compressed))
    (layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")).write_bytes(compressed)
    manifest_bytes = json.dumps(manifest).encode()
    (layout / "blobs" / "sha256" / sha256(manifest_bytes).removeprefix("sha256:")).write_bytes(manifest_bytes)
    index["manifests"][0].update(digest=sha256(manifest_bytes), size=len(manifest_bytes))
    (layout / "index.json").write_text(json.dumps(index))
    root = tmp_path / "store"
    result = pyunionfs(root, "load", "-i", str(layout))
    assert result.returncode == 0, result.stderr
    zipped = tmp_path / "docker.tar.gz"
    zipped.write_bytes(gzip.compress(saved["docker-archive"].read_bytes()))
    result = pyunionfs(root, "load", "-i", str(zipped))
    assert result.returncode == 0, result.stderr
    assert len(stored_layers(root)) == 1 and len(pyunionfs(root, "images", "-q").stdout.split()) == 1


def broken_archives(saved: dict[str, Path], tmp_path: Path) -> dict[str, tuple[Path, str]]:
    docker = members(saved["docker-archive"])
    (manifest,) = json.loads(docker["manifest.json"])
    layer_name = manifest["Layers"][0]
    layer = bytearray(docker[layer_name])
    layer[600] ^= 1  # a bit of the first file's content

    def variant(name: str, **changes: bytes) -> Path:
        return write_tar(tmp_path / f"{name}.tar", {**docker, **changes})

    config = json.loads(docker[manifest["Config"]])
    config["config"]["Cmd"] = "rm -rf /"  # a string where a list must be
    hostile_config = json.dumps(config).encode()
    hostile_name = sha256(hostile_config).removeprefix("sha256:") + ".json"
    oci = members(saved["oci-archive"])
    blob = next(name for name, data in oci.items() if len(data) > 10000)
    oci_bad = write_tar(tmp_path / "oci-bad.tar", {**oci, blob: bytes(oci[blob][:-1]) + b"x"})
    return {
        "a layer that is not its diff_id": (variant("layer", **{layer_name: bytes(layer)}), "does not match its diff_id"),
        "a config that is not its name": (variant("config", **{manifest["Config"]: docker[manifest["Config"]] + b" "}),
                                          "does not match its digest"),
        "a blob that is not its digest": (oci_bad, "does not match its digest"),
        "a manifest that is not a list": (variant("manifest", **{"manifest.json": b"{}"}), "not a list"),
        "a manifest naming a layer outside": (variant("outside", **{"manifest.json": json.dumps(
            [{**manifest, "Layers": ["../../etc/passwd"]}]).encode()}), "outside it"),
        "a config of the wrong shape": (variant("shape", **{hostile_name: hostile_config, "manifest.json": json.dumps(
            [{**manifest, "Config": hostile_name}]).encode()}), "Cmd is not a list of strings"),
        "a truncated archive": (_truncated(saved["docker-archive"], tmp_path), "not an image archive"),
        "not an archive": (saved["rootfs"], "not a docker-archive"),
    }


def _truncated(archive: Path, tmp_path: Path) -> Path:
    path = tmp_path / "truncated.tar"
    path.write_bytes(archive.read_bytes()[:1536])
    return path


def test_broken_and_hostile_archives_are_refused_whole(saved, tmp_path):
    for case, (archive, words) in broken_archives(saved, tmp_path).items():
        root = tmp_path / "store"
        result = pyunionfs(root, "load", "-i", str(archive))
        assert result.returncode == 1, case
        one_line_error(result, words)
        nothing_stored(root)
        shutil.rmtree(root)


def test_ctrl_c_during_load_leaves_nothing_and_a_rerun_works(tmp_path):
    """SIGINT while a big layer unpacks: exit 130, no half layer, no image; then the same load works."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for i in range(8):
        (rootfs / f"blob{i}").write_bytes(os.urandom(16 << 20))
    with tarfile.open(tmp_path / "big.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    root = tmp_path / "store"
    assert pyunionfs(root, "import", str(tmp_path / "big.tar"), "big").returncode == 0
    assert pyunionfs(root, "save", "-o", str(tmp_path / "big-image.tar"), "big").returncode == 0
    target = tmp_path / "target"
    load = subprocess.Popen([PYUNIONFS, "--root", str(target), "load", "-i", str(tmp_path / "big-image.tar")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = target / "layers" / ".staging"
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and os.listdir(staging)) and load.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    load.send_signal(signal.SIGINT)
    out, err = load.communicate(timeout=60)
    assert load.returncode == 130 and "Traceback" not in err, err
    nothing_stored(target)
    rerun = pyunionfs(target, "load", "-i", str(tmp_path / "big-image.tar"))
    assert rerun.returncode == 0 and len(stored_layers(target)) == 1, rerun.stderr


def test_two_loads_at_once(saved, tmp_path):
    root = tmp_path / "store"
    loads = [subprocess.Popen([PYUNIONFS, "--root", str(root), "load", "-i", str(saved[f])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in ("docker-archive", "oci-archive")]
    results = [(load.wait(timeout=120), load.stderr.read()) for load in loads]
    for load in loads:
        load.stdout.close()
        load.stderr.close()
    assert results == [(0, ""), (0, "")]
    assert len(stored_layers(root)) == 1 and len(pyunionfs(root, "images", "-q").stdout.split()) == 1


ROUND_TRIP_CHANGE = "echo new > /created && rm /data && mv /box /moved"
LIST_ROOT = "cd / && find . -path ./proc -prune -o -path ./sys -prune -o -path ./dev -prune -o -print | sort"
RUNTIME_FILES = ("./run", "./tmp", "./etc/hostname", "./etc/hosts", "./etc/resolv.conf", "./etc/mtab")


def image_files(listing: str) -> list[str]:
    """LIST_ROOT's lines less what each runtime makes in a container (podman /run and /etc/mtab,
    pyunionfs /tmp, both the /etc files they mount)."""
    return [line for line in listing.splitlines() if not line.startswith(RUNTIME_FILES)]


@pytest.mark.skipif(not podman.available(), reason="podman and runc are not installed")
def test_round_trip_with_podman(tmp_path):
    """podman save (both formats) -> load -> run a change -> commit -> save (both formats) ->
    podman load -> podman run sees exactly the change; podman image diff matches our diff."""
    rootfs = build_image(tmp_path / "rootfs")
    scratch = Path(tempfile.mkdtemp(prefix="pm."))  # podman wants a runroot of 50 characters at most
    pm = podman.Podman(scratch, podman.mount_program_storage("fuse-overlayfs"))
    try:
        pm("import", str(podman.image_tarball(rootfs, tmp_path / "rootfs.tar")), "localhost/busybox")
        podman_id = pm.text("images", "--no-trunc", "--format", "{{.ID}}").strip().removeprefix("sha256:")
        root = tmp_path / "store"
        for image_format in ("docker-archive", "oci-archive"):
            archive = tmp_path / f"podman-{image_format}.tar"
            pm("save", "--format", image_format, "-o", str(archive), "localhost/busybox")
            loaded = pyunionfs(root, "load", "-i", str(archive))
            assert loaded.stdout == f"Loaded image: localhost/busybox:latest\n{podman_id}\n", loaded.stderr
        ran = pyunionfs(root, "run", "--name", "changer", "busybox", "sh", "-c", ROUND_TRIP_CHANGE)
        assert ran.returncode == 0, ran.stderr
        ours = pyunionfs(root, "diff", "changer").stdout
        assert ours == "D /box\nA /created\nD /data\nA /moved\nA /moved/item\n"
        assert pyunionfs(root, "commit", "changer", "localhost/changed").returncode == 0
        expected = pyunionfs(root, "run", "--rm", "changed", "sh", "-c", LIST_ROOT).stdout
        assert "./created" in expected and "./moved/item" in expected and "./data" not in expected
        for image_format in ("docker-archive", "oci-archive"):
            archive = tmp_path / f"ours-{image_format}.tar"
            assert pyunionfs(root, "save", "--format", image_format, "-o", str(archive), "changed").returncode == 0
            pm("rmi", "--force", "localhost/changed", check=False)
            assert "localhost/changed" in pm.text("load", "-i", str(archive))
            seen = pm.text("run", "--rm", "localhost/changed", "sh", "-c", LIST_ROOT)
            assert image_files(seen) == image_files(expected)
            assert pm.text("run", "--rm", "localhost/changed", "cat", "/created") == "new\n"
            assert sorted(pm.text("image", "diff", "localhost/changed").splitlines()) == sorted(ours.splitlines())
    finally:
        pm.close()
        shutil.rmtree(scratch, ignore_errors=True)


def test_save_to_a_full_disk_is_one_line_and_leaves_no_file(saved, tmp_path):
    root = tmp_path / "store"
    assert pyunionfs(root, "load", "-i", str(saved["docker-archive"])).returncode == 0
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        one_line_error(pyunionfs(root, "save", "-o", str(small / "image.tar"), "busybox"), "No space left")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
