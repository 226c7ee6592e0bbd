"""The real-distribution tier (slow, needs the network): a debootstrap'ed Debian image, apt-get in
containers on it, by `pyunionfs run` and by `podman build` with pyunionfs as its mount program.
Run it with `scripts/test.sh -m slow`.

The image is built once with `debootstrap --variant=minbase bookworm` into $PYUNIONFS_BOOKWORM
(default /var/tmp/pyunionfs-bookworm) and kept there: it is only ever a lower layer."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from bench import podman
from mounts import PYUNIONFS
from trees import checksum

pytestmark = pytest.mark.slow

IMAGE = Path(os.environ.get("PYUNIONFS_BOOKWORM", "/var/tmp/pyunionfs-bookworm"))


@pytest.fixture(scope="module")
def bookworm() -> Path:
    if not (IMAGE / "usr" / "bin" / "apt-get").exists():
        if not shutil.which("debootstrap"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=True)
        shutil.rmtree(IMAGE, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(IMAGE)], check=True,
                       stdout=subprocess.DEVNULL)
    return IMAGE


def container(image: Path, upper: Path, script: str) -> subprocess.CompletedProcess:
    upper.mkdir(exist_ok=True)
    work = upper.with_name(upper.name + ".work")
    work.mkdir(exist_ok=True)
    return subprocess.run([PYUNIONFS, "run", "--lower", str(image), "--upper", str(upper), "--workdir",
                           str(work), "--", "sh", "-c", script], capture_output=True, text=True, timeout=900)


def test_apt_get_install_hello_and_keep_it(bookworm, tmp_path):
    before = checksum(bookworm)
    first = container(bookworm, tmp_path / "upper",
                      "apt-get update -qq && apt-get install -y -qq hello >/dev/null && hello")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Hello, world!" in first.stdout
    second = container(bookworm, tmp_path / "upper", "hello")
    assert second.returncode == 0 and "Hello, world!" in second.stdout
    assert checksum(bookworm) == before


def test_two_containers_on_one_image(bookworm, tmp_path):
    results: dict[str, subprocess.CompletedProcess] = {}

    def one(name: str) -> None:
        results[name] = container(bookworm, tmp_path / name,
                                  f"echo {name} > /etc/owner && sleep 1 && cat /etc/owner && "
                                  "dpkg -l | grep -c ^ii")

    threads = [threading.Thread(target=one, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("one", "two"):
        assert results[name].returncode == 0, results[name].stderr
        assert results[name].stdout.split()[0] == name
        assert (tmp_path / name / "etc" / "owner").read_text() == f"{name}\n"


@pytest.mark.skipif(not podman.available(), reason="podman and runc are not installed")
def test_apt_get_in_podman_build_on_pyunionfs(bookworm):
    """apt writes its lists through a file it has unlinked, and dpkg renames over open files."""
    scratch = Path(tempfile.mkdtemp(prefix="pm."))  # podman wants a runroot of 50 characters at most
    pm = podman.Podman(scratch / "p", podman.mount_program_storage(PYUNIONFS))
    try:
        subprocess.run(["tar", "-C", str(bookworm), "-cf", str(scratch / "bookworm.tar"), "."], check=True)
        pm("import", str(scratch / "bookworm.tar"), "localhost/bookworm", timeout=600)
        context = scratch / "context"
        context.mkdir()
        (context / "Containerfile").write_text("FROM localhost/bookworm\n"
                                               "RUN apt-get update && apt-get install -y hello\n")
        pm("build", "--pull=never", "--network=host", "-t", "localhost/hello", str(context), timeout=900)
        said = pm.text("run", "--rm", "--pull=never", "--network=none", "localhost/hello", "hello")
        assert said == "Hello, world!\n"
    finally:
        pm.close()
        shutil.rmtree(scratch, ignore_errors=True)
