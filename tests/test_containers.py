"""Containers of stored images, as podman users know them: create, start, run, ps, stop, kill,
rm, logs, inspect; the image's config honoured; and what happens when two commands run at once,
or a launcher is killed."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from bench.runner import command_lines
from launchers import ROOTLESS_USER, build_image, unprivileged_prefix
from mounts import PYUNIONFS, kernel_overlay
from test_store import layer_tree, one_line_error, stored_layers
from test_run import comm
from trees import differences, snapshot
from unionfs.runtime.launcher import SERVER_NAME

SLOW_EXIT = "echo hello > /hello.txt; sleep 2; exit 3"


def processes_of(root: Path) -> list[int]:
    """The pids of processes started with --root ROOT: launchers and their filesystem servers."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                arguments = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.isdigit() and str(root).encode() in arguments:
            pids.append(int(entry))
    return pids


def descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *descendants(child)]
    return found


def container_processes(launcher: int) -> list[int]:
    """The processes of a running container: its launcher's descendants (the container's init
    and command, and the filesystem server if the launcher forked it), and the server a fork
    server started for it, which is titled with the launcher's command line."""
    words = Path(f"/proc/{launcher}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")[2:]  # less python and script
    servers = [pid for pid, argv in command_lines().items() if argv[1:] == words and comm(pid) == SERVER_NAME]
    return sorted({*descendants(launcher), *servers})


def wait_until(condition, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory) -> Path:
    """busybox, with a user and a group to resolve by name."""
    scratch = tmp_path_factory.mktemp("image")
    root = build_image(scratch / "rootfs")
    with open(root / "etc" / "passwd", "a") as passwd:
        passwd.write("app:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    (root / "srv").mkdir()
    (root / "tree" / "a" / "b").mkdir(parents=True)
    (root / "tree" / "a" / "b" / "file").write_text("deep\n")
    (root / "tree" / "keep").write_text("kept\n")
    with tarfile.open(scratch / "busybox.tar", "w") as tar:
        tar.add(root, arcname=".")
    return scratch / "busybox.tar"


@dataclass
class Cli:
    """`pyunionfs --root ROOT`, run as root or, with PREFIX, as the unprivileged user."""
    root: Path
    prefix: list[str] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, PYUNIONFS, "--root", str(self.root), *args]

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def filled(store: Cli, image_tar: Path) -> Iterator[Cli]:
    """STORE with the busybox image as `busybox`; no container of it is left running after the
    test, and no process of it."""
    assert store("import", str(image_tar), "busybox").returncode == 0
    yield store
    left = store("ps", "-q").stdout.split()
    for container in store("ps", "-aq").stdout.split():
        store("rm", "-f", container)
    deadline = time.monotonic() + 10
    while (pids := processes_of(store.root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    mounts = [line for line in open("/proc/mounts") if str(store.root) in line]
    assert not left, f"containers left running: {left}"
    assert not pids, f"processes left running: {pids}"
    assert not mounts, f"mounts left: {mounts}"


@pytest.fixture
def store(tmp_path: Path, image_tar: Path) -> Iterator[Cli]:
    with filled(Cli(tmp_path / "store"), image_tar) as cli:
        yield cli


@pytest.fixture(params=["root", "rootless"])
def any_store(request, tmp_path: Path, image_tar: Path) -> Iterator[Cli]:
    """The store of root, and (the rootless tier) of the unprivileged user."""
    if request.param == "root":
        with filled(Cli(tmp_path / "store"), image_tar) as cli:
            yield cli
        return
    user = os.environ.get(ROOTLESS_USER)
    if not user:
        pytest.skip(f"the rootless tier needs an unprivileged user with subuid ranges in ${ROOTLESS_USER}")
    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-rootless-test."))  # pytest's base is 0700
    try:
        prefix, owner = unprivileged_prefix(user, scratch)
        (scratch / "store").mkdir()
        os.chown(scratch / "store", *owner)
        shutil.copy(image_tar, scratch / "busybox.tar")
        with filled(Cli(scratch / "store", prefix), scratch / "busybox.tar") as cli:
            yield cli
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ps(store: Cli, *args: str) -> list[dict[str, str]]:
    """`ps` rows by column (columns are split where the header has two or more spaces)."""
    result = store("ps", *args)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    starts = [match.start() for match in re.finditer(r"(?:^|(?<=  ))\S", header)]
    names = [header[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
    return [{name: line[a:b].strip() for name, a, b in zip(names, starts, starts[1:] + [None])} for line in lines]


def status(store: Cli, name: str) -> str:
    (row,) = [row for row in ps(store, "-a") if row["NAMES"] == name]
    return row["STATUS"]


def test_the_walkthrough(any_store: Cli):
    """import; create (Created); start (Up); the command exits 3 (Exited (3)); what it wrote is
    in its own upper, not in the image; start again; rm and rmi leave nothing behind."""
    created = any_store("create", "--name", "walk", "busybox", "sh", "-c", SLOW_EXIT)
    container_id = created.stdout.strip()
    assert created.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}", container_id), created.stderr
    (row,) = ps(any_store, "-a")
    assert row == {"CONTAINER ID": container_id[:12], "IMAGE": "localhost/busybox:latest",
                   "COMMAND": "sh -c echo hello ...", "CREATED": row["CREATED"], "STATUS": "Created",
                   "NAMES": "walk"}
    assert ps(any_store) == []  # ps without -a: running ones only
    directory = any_store.root / "containers" / container_id
    assert (directory / "upper").is_dir() and (directory / "work").is_dir()

    started = any_store("start", container_id[:8])
    assert started.returncode == 0 and started.stdout == f"{container_id[:8]}\n", started.stderr
    assert re.fullmatch(r"Up (Less than a second|\d+ seconds?)", status(any_store, "walk"))
    assert [row["NAMES"] for row in ps(any_store)] == ["walk"]
    wait_until(lambda: status(any_store, "walk").startswith("Exited"), what="the container to exit")
    assert re.fullmatch(r"Exited \(3\) .* ago", status(any_store, "walk"))
    assert (directory / "upper" / "hello.txt").read_text() == "hello\n"
    (layer,) = stored_layers(any_store.root)
    assert not (layer_tree(any_store.root, layer) / "hello.txt").exists()
    assert any_store("diff", "walk").stdout == "A /hello.txt\n"

    committed = any_store("commit", "walk", "walked")
    assert committed.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", committed.stdout), committed.stderr
    seen = any_store("run", "--rm", "walked", "cat", "/hello.txt")
    assert seen.stdout == "hello\n", seen.stderr

    again = any_store("start", "-a", "walk")  # attached: the container's exit code
    assert again.returncode == 3, again.stderr
    one_line_error(any_store("rmi", "busybox"), "used by a container")
    assert any_store("rm", "walk").stdout == f"{container_id}\n"
    assert not directory.exists() and ps(any_store, "-a") == []
    assert any_store("rmi", "walked", "busybox").returncode == 0
    assert stored_layers(any_store.root) == [] and os.listdir(any_store.root / "containers") == []


def test_run_attached_detached_and_removed(store: Cli):
    attached = store("run", "--name", "a", "busybox", "sh", "-c", "echo out; echo err >&2; exit 5")
    assert (attached.returncode, attached.stdout, attached.stderr) == (5, "out\n", "err\n")
    assert status(store, "a").startswith("Exited (5)")
    removed = store("run", "--rm", "busybox", "true")
    assert removed.returncode == 0 and [row["NAMES"] for row in ps(store, "-a")] == ["a"]
    detached = store("run", "-d", "--name", "d", "busybox", "sh", "-c", "echo out; echo err >&2")
    assert detached.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", detached.stdout), detached.stderr
    wait_until(lambda: status(store, "d").startswith("Exited"), what="the detached container to exit")
    assert status(store, "d").startswith("Exited (0)")
    assert sorted(store("logs", "d").stdout.splitlines()) == ["err", "out"]
    detached_removed = store("run", "-d", "--rm", "busybox", "true").stdout.strip()
    wait_until(lambda: detached_removed[:12] not in store("ps", "-aq").stdout, what="--rm")
    inspected = json.loads(store("inspect", "a").stdout)[0]
    assert inspected["State"]["ExitCode"] == 5 and inspected["Path"] == "sh"
    assert inspected["GraphDriver"]["Data"]["UpperDir"].startswith(str(store.root / "containers"))
    one_line_error(store("run", "--name", "a", "busybox", "true"), "name a is in use", code=125)
    one_line_error(store("start", "nothing"), "no such container", code=125)
    one_line_error(store("run", "nothing"), "no such image", code=125)


def test_the_image_config_is_honoured_and_overridden(store: Cli, image_tar: Path):
    changes = ["ENTRYPOINT [\"/bin/sh\", \"-c\"]", "CMD [\"echo $GREETING $(id -u):$(id -g):$(id -G) $(pwd)\"]",
               "ENV GREETING=hi OTHER=kept", "WORKDIR /srv", "USER app", "STOPSIGNAL SIGUSR1"]
    assert store("import", *[f"--change={c}" for c in changes], str(image_tar), "configured").returncode == 0
    result = store("run", "--rm", "configured")
    assert result.stdout == "hi 1000:1000:1000 50 /srv\n", result.stderr
    result = store("run", "--rm", "-e", "GREETING=hello", "-w", "/", "--user", "0:staff", "configured")
    assert result.stdout == "hello 0:50:50 /\n", result.stderr
    result = store("run", "--rm", "--entrypoint", "env", "configured")
    assert "OTHER=kept" in result.stdout.splitlines(), result.stderr
    result = store("run", "--rm", "--entrypoint", "[\"echo\", \"a\"]", "configured", "b")
    assert result.stdout == "a b\n", result.stderr
    inspected = json.loads(store("image", "inspect", "configured").stdout)[0]
    assert inspected["Config"]["StopSignal"] == "SIGUSR1" and inspected["Config"]["User"] == "app"
    result = store("run", "--rm", "--user", "nobody", "configured")
    assert result.returncode == 125 and "unable to find user nobody" in result.stderr
    one_line_error(store("import", "--change", "FROM x", str(image_tar)), "--change takes")
    one_line_error(store("create", "busybox"), "no command given", code=125)


def test_two_runs_at_once_and_ps_during_starts(store: Cli):
    runs = [subprocess.Popen(store.command("run", "--name", f"r{i}", "busybox", "sh", "-c",
                                           f"echo {i} > /mine; cat /mine"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]
    listings = 0
    while any(run.poll() is None for run in runs):
        ps(store, "-a")  # never fails, never sees a half-written container
        listings += 1
    outputs = [run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [out for out, _ in outputs] == ["0\n", "1\n"]
    assert sorted((row["NAMES"], row["STATUS"][:10]) for row in ps(store, "-a")) == [("r0", "Exited (0)"),
                                                                                   ("r1", "Exited (0)")]
    assert listings > 0


def test_stop_kill_and_rm_force(store: Cli):
    for name in ("stopped", "killed", "removed"):
        assert store("run", "-d", "--name", name, "busybox", "sleep", "60").returncode == 0
    wait_until(lambda: len(ps(store)) == 3, what="three containers up")
    begun = time.monotonic()
    assert store("stop", "-t", "5", "stopped").returncode == 0
    assert time.monotonic() - begun < 5  # SIGTERM ends sleep: no need for SIGKILL
    assert status(store, "stopped").startswith("Exited (143)")
    assert store("kill", "-s", "USR1", "killed").returncode == 0
    wait_until(lambda: status(store, "killed").startswith("Exited (138)"), what="SIGUSR1 to end sleep")
    one_line_error(store("rm", "removed"), "is running")
    one_line_error(store("kill", "-s", "NOSUCH", "removed"), "no such signal")
    assert store("rm", "-f", "removed").returncode == 0
    assert sorted(row["NAMES"] for row in ps(store, "-a")) == ["killed", "stopped"]
    one_line_error(store("kill", "stopped"), "is not running")


def test_kill_s_kill_ends_the_container_and_its_launcher_cleans_up(store: Cli):
    """SIGKILL goes to the container's init, not to the launcher, which unmounts, removes its
    scratch directory and records the exit, as podman's conmon does."""
    tmp = store.root.parent / "tmp"
    tmp.mkdir()
    store = Cli(store.root, ["env", f"TMPDIR={tmp}"])  # where a run's scratch would go if not in the store
    container_id = store("run", "-d", "busybox", "sleep", "60").stdout.strip()
    launcher = json.loads(store("inspect", container_id).stdout)[0]["State"]["Pid"]
    wait_until(lambda: len(container_processes(launcher)) >= 3, what="the server and the command")
    assert store("kill", "-s", "KILL", container_id).returncode == 0
    wait_until(lambda: not os.path.exists(f"/proc/{launcher}"), what="the launcher to finish")
    assert ps(store, "-a")[0]["STATUS"].startswith("Exited (137)")
    assert [name for directory in (tmp, store.root / "containers" / container_id)
            for name in os.listdir(directory) if name.startswith("pyunionfs-run.")] == []


def test_a_killed_launcher_leaves_an_exited_container(store: Cli):
    """SIGKILL of the launcher: ps shows Exited (137), not Up; its command and filesystem server
    go with it; the container starts again, and goes with rm -f."""
    container_id = store("run", "-d", "busybox", "sleep", "60").stdout.strip()
    launcher = json.loads(store("inspect", container_id).stdout)[0]["State"]["Pid"]
    processes = wait_until(lambda: len(container_processes(launcher)) >= 3 and container_processes(launcher),
                           what="the server and the command")  # the server, the init, sleep
    os.kill(launcher, signal.SIGKILL)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in processes),
               what="the server and the command to die with the launcher")
    (row,) = ps(store, "-a")
    assert row["STATUS"].startswith("Exited (137)")
    assert store("start", container_id).returncode == 0
    assert ps(store)[0]["STATUS"].startswith("Up")
    assert store("rm", "-f", container_id).returncode == 0 and ps(store, "-a") == []


def test_rmi_force_removes_the_containers_of_the_image(store: Cli):
    assert store("run", "-d", "--name", "user", "busybox", "sleep", "60").returncode == 0
    assert store("create", "--name", "other", "busybox", "true").returncode == 0
    one_line_error(store("rmi", "busybox"), "used by a container")
    assert store("rmi", "-f", "busybox").returncode == 0
    assert ps(store, "-a") == [] and stored_layers(store.root) == []


CHANGES = """set -e
echo new > /added
ln /added /added-link
rm /data
chmod 600 /not-executable
rm -r /box && mkdir /box && echo again > /box/fresh
mv /tree /renamed
echo more > /renamed/keep2
mkfifo /fifo
ln -s /data /sym
"""
DIFF = """A /added
A /added-link
C /box
A /box/fresh
D /box/item
D /data
A /fifo
C /not-executable
A /renamed
A /renamed/a
A /renamed/a/b
A /renamed/a/b/file
A /renamed/keep
A /renamed/keep2
A /sym
D /tree
"""
RUNTIME_PATHS = ("proc", "dev", "sys", "tmp", "etc/hostname", "etc/hosts", "etc/resolv.conf")


def test_diff_commit_and_export_are_the_containers_view(store: Cli, tmp_path: Path):
    """Files added, changed and deleted, a directory deleted and made again (opaque), one renamed
    (overlay.redirect, which OCI lacks), hard links, a fifo and a symlink: `diff` lists them as
    podman's does; the committed image, mounted by kernel overlayfs, is exactly what the container
    saw (less the runtime's mount targets); `export` holds all of it."""
    ran = store("run", "--name", "changer", "busybox", "sh", "-c", CHANGES)
    assert ran.returncode == 0, ran.stderr
    upper = Path(json.loads(store("inspect", "changer").stdout)[0]["GraphDriver"]["Data"]["UpperDir"])
    os.setxattr(upper / "added", "user.note", b"\xff binary")  # a user xattr goes along
    assert os.getxattr(upper / "renamed", "trusted.overlay.redirect")  # the rename is a redirect
    assert store("diff", "changer").stdout == DIFF

    committed = store("commit", "-c", "CMD [\"cat\", \"/added\"]", "-m", "the changes", "changer",
                          "changed")
    assert committed.returncode == 0, committed.stderr
    inspected = json.loads(store("image", "inspect", "changed").stdout)[0]
    image_layer, new_layer = (layer_tree(store.root, diff_id) for diff_id in inspected["RootFS"]["diff_ids"])
    assert inspected["History"][-1]["comment"] == "the changes"
    assert os.stat(new_layer / "added").st_ino == os.stat(new_layer / "added-link").st_ino
    assert os.getxattr(new_layer / "box", "trusted.overlay.opaque") == b"y"
    assert os.stat(new_layer / "tree").st_rdev == 0 and not (new_layer / "data").is_file()
    for path in new_layer.rglob("*"):  # no redirect: the renamed directory is there in full
        assert "trusted.overlay.redirect" not in os.listxattr(path, follow_symlinks=False)
    assert (new_layer / "renamed" / "a" / "b" / "file").read_text() == "deep\n"

    container_view, image_view = tmp_path / "container-view", tmp_path / "image-view"
    container_view.mkdir()
    image_view.mkdir()
    with kernel_overlay([upper, image_layer], container_view, "redirect_dir=follow"), \
            kernel_overlay([new_layer, image_layer], image_view, "redirect_dir=follow"):
        seen = snapshot(container_view, times=False)
        for path in RUNTIME_PATHS:
            seen.pop(path, None)
        assert differences(seen, snapshot(image_view, times=False)) == []
        exported = store("export", "-o", str(tmp_path / "root.tar"), "changer")
        assert exported.returncode == 0, exported.stderr
        with tarfile.open(tmp_path / "root.tar") as tar:
            names = {member.name.rstrip("/") for member in tar}
            assert tar.getmember("added").pax_headers["SCHILY.xattr.user.note"].encode(
                "utf-8", "surrogateescape") == b"\xff binary"
        assert names == set(snapshot(container_view, times=False))
    result = store("run", "--rm", "changed")
    assert result.stdout == "new\n", result.stderr
