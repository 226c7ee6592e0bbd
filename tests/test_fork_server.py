"""The fork server (unionfs/forkserver): a mount that daemonizes, or a container's run, is served
by a fork of a resident process, which takes on the caller's context; what it cannot take on, it
declines, and the caller does the work the slow way. Each test has a server directory of its own."""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launchers import build_image
from mounts import PYUNIONFS, daemons_for, force_unmount, is_mounted
from test_run import leftovers, unique_sleep
from test_store import one_line_error
from unionfs.forkserver import client, server


def server_pid() -> int | None:
    where = client.location(create=False)
    try:
        return int(Path(where, client.PID).read_text()) if where else None
    except (OSError, ValueError):
        return None


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, parent, ... (proc(5) field 3 on)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def gone(pid: int) -> bool:
    """PID has ended (a zombie that nobody reaps counts as ended)."""
    try:
        return stat_fields(pid)[0] == "Z"
    except FileNotFoundError:
        return True


def parent_of(pid: int) -> int:
    return int(stat_fields(pid)[1])


def wait_until_serving(started: subprocess.Popen) -> None:
    """Until the fork server STARTED (in this test's server directory) listens."""
    deadline = time.monotonic() + 30
    while not (server_pid() and os.path.exists(os.path.join(client.location(), client.SOCKET))):
        assert started.poll() is None and time.monotonic() < deadline, "the fork server did not start"
        time.sleep(0.02)


@pytest.fixture
def fork_server(tmp_path, monkeypatch) -> int:
    """A running fork server of this test's own: its pid. Stopped afterwards."""
    base = tmp_path / "servers"
    base.mkdir()
    monkeypatch.setenv(client.DIRECTORY, str(base))
    started = subprocess.Popen([PYUNIONFS, "fork-server", "--idle", "60"])
    wait_until_serving(started)
    yield started.pid
    started.terminate()
    started.wait(timeout=10)


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("lower", "upper", "work", "mnt")}
    for path in paths.values():
        path.mkdir()
    (paths["lower"] / "f").write_text("lower\n")
    yield paths
    force_unmount(paths["mnt"])
    deadline = time.monotonic() + 5
    while daemons_for(paths["mnt"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemons_for(paths["mnt"]), "a FUSE server was left running"


def helper(dirs: dict[str, Path], *prefix: str, options: str = "", **env: str) -> subprocess.CompletedProcess:
    """The mount-helper form, as containers/storage runs it (daemonizing)."""
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}" + options
    return subprocess.run([*prefix, PYUNIONFS, "-o", opts, str(dirs["mnt"])], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_a_mount_is_served_by_a_fork_of_the_server(fork_server, dirs):
    result = helper(dirs)
    assert result.returncode == 0, result.stderr
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) == fork_server  # forked by the server, not started by the command
    assert Path(f"/proc/{daemon}/comm").read_text() == "pyunionfs\n"
    assert (dirs["mnt"] / "f").read_text() == "lower\n"
    (dirs["mnt"] / "new").write_text("upper\n")
    assert (dirs["upper"] / "new").read_text() == "upper\n"
    # Killing it unmounts cleanly, and the server reaps it.
    os.kill(daemon, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (is_mounted(dirs["mnt"]) or not gone(daemon)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(dirs["mnt"]) and not os.path.exists(f"/proc/{daemon}")  # reaped by the server
    # The next mount of the same directories works, again through the server.
    assert helper(dirs).returncode == 0
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) == fork_server and (dirs["mnt"] / "new").read_text() == "upper\n"


def test_malformed_requests_leave_the_server_serving(fork_server, dirs):
    # Callers gone before it answers (its "hello" meets a closed socket) ...
    for _ in range(50):
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.with_socket_path(client.location(), gone.connect)
        gone.close()
    # ... and requests that are not requests.
    fields = [b"%d" % client.PROTOCOL, client.MOUNT.encode(), b"18", b"", b""]
    for message in (b"garbage", b"(" * 100_000, b"\0".join([*fields, b"not a count"]) + b"\0",
                    b"\0".join([*fields, b"1000"]) + b"\0", b"\0".join([*fields, b"0", b"NO_EQUALS_SIGN"]) + b"\0",
                    client.request_message("unknown kind", 0o22, None, [], {}),
                    client.request_message(client.MOUNT, 0o22, None, [], {})[:-1]):
        connection = client.connect(client.location())
        assert connection is not None
        fds = b"".join(fd.to_bytes(4, "little") for fd in (0, 1, 2, 0, 1, 2, 0))
        connection.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        assert connection.recv(16) == b""  # declined: closed without a word
        connection.close()
    assert helper(dirs).returncode == 0
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) == fork_server


def test_first_use_starts_a_server_and_mounts_without_it(tmp_path, dirs, monkeypatch):
    monkeypatch.setenv(client.DIRECTORY, str(tmp_path))
    result = helper(dirs)
    assert result.returncode == 0, result.stderr
    (daemon,) = daemons_for(dirs["mnt"])
    deadline = time.monotonic() + 30
    while not server_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = server_pid()
    assert started and parent_of(daemon) != started
    assert Path(client.location(), client.SOCKET).exists()
    try:
        assert os.stat(client.location()).st_mode & 0o777 == 0o700
    finally:
        server.stop()
    assert gone(started) and not Path(client.location(), client.SOCKET).exists()


def test_a_server_started_from_any_directory_runs_the_callers_code(tmp_path, dirs, monkeypatch):
    """The first use starts the server with the caller's interpreter and environment. A package
    named unionfs in the caller's working directory (another checkout, or one planted in a
    directory root works in) must not be what the server runs."""
    (tmp_path / "servers").mkdir()
    monkeypatch.setenv(client.DIRECTORY, str(tmp_path / "servers"))
    decoy = tmp_path / "cwd" / "unionfs"
    decoy.mkdir(parents=True)
    ran = tmp_path / "the decoy ran"
    (decoy / "__init__.py").write_text("")
    (decoy / "cli.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    result = subprocess.run([PYUNIONFS, "-o", opts, str(dirs["mnt"])], cwd=tmp_path / "cwd",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30
    try:
        while not (server_pid() and Path(client.location(), client.SOCKET).exists()):
            assert not ran.exists(), "the server ran the package in the caller's working directory"
            assert time.monotonic() < deadline, "the fork server did not start"
            time.sleep(0.05)
    finally:
        server.stop()
    assert not ran.exists()


def test_a_server_that_hangs_up_after_its_hello_is_one_that_declined(tmp_path, dirs, monkeypatch):
    """A server that goes away between its hello and the request (stopped just then): the
    command's send fails (EPIPE), and it mounts by itself, as after a decline."""
    monkeypatch.setenv(client.DIRECTORY, str(tmp_path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.settimeout(30)
    client.with_socket_path(client.location(), listener.bind)
    listener.listen()

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.send(b"hello")
        connection.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        result = helper(dirs)
    finally:
        thread.join()
        listener.close()
    assert result.returncode == 0, result.stderr
    assert daemons_for(dirs["mnt"]) and (dirs["mnt"] / "f").read_text() == "lower\n"


def test_sigterm_right_after_start_stops_the_server(tmp_path, monkeypatch):
    """SIGTERM as soon as the pid file is there, while the server forks its first spare: a signal
    handled inside os.fork's at-fork callbacks must not be lost (it was, about one time in ten)."""
    monkeypatch.setenv(client.DIRECTORY, str(tmp_path))
    for _ in range(12):
        started = subprocess.Popen([PYUNIONFS, "fork-server", "--idle", "60"])
        try:
            while not server_pid():
                assert started.poll() is None, "the fork server did not start"
                time.sleep(0.001)
            started.send_signal(signal.SIGTERM)
            assert started.wait(timeout=5) == 0
        finally:
            started.kill()
            started.wait()
        assert not any(Path(client.location(), name).exists() for name in (client.SOCKET, client.PID))


def test_bad_input_reads_as_without_the_server(fork_server, dirs):
    cases = [dict(options=",bogus=1"), dict(options=",lowerdir=/nonexistent/x")]
    for case in cases:
        served = helper(dirs, **case)
        alone = helper(dirs, **case, **{client.DISABLE: "off"})
        one_line_error(served)
        assert (served.returncode, served.stderr) == (alone.returncode, alone.stderr)
    os.rmdir(dirs["mnt"])  # a failure after the server took the mount on: reported the same way
    served, alone = helper(dirs), helper(dirs, **{client.DISABLE: "off"})
    one_line_error(served, "mnt")
    assert (served.returncode, served.stderr) == (alone.returncode, alone.stderr)
    dirs["mnt"].mkdir()


def test_a_caller_gone_before_the_mount_is_live_leaves_no_mount(dirs):
    """A forked server whose caller died (podman's timeout killed the mount program) cannot say
    "ok": nobody knows of the mount, so it unmounts instead of leaving it (dead) behind."""
    script = f"""if True:
        import os
        from unionfs import cli
        ready_r, ready_w = os.pipe()
        os.close(ready_r)  # the caller is gone
        opts = "lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        raise SystemExit(cli.mount_request(["{dirs['mnt']}", "-o", opts]).serve_forked(ready_w, -1))"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and not result.stderr, result.stderr
    assert not is_mounted(dirs["mnt"])


def test_a_rehearsal_leaves_nothing_for_the_mount_served_after_it(dirs, tmp_path):
    """A spare rehearses requests on a union of its own before it serves a mount: what the shim
    would learn there is keyed by node ids that the mount's union numbers from the start again,
    so none of it may answer the mount's requests (an xattr hidden, a directory's attributes)."""
    os.setxattr(dirs["lower"] / "f", "user.mark", b"kept")
    ready_r, ready_w = os.pipe()
    script = f"""if True:
        from unionfs import cli
        from unionfs.forkserver import client, server
        readers = {{client.MOUNT: cli.mount_request, client.RUN: cli.run_request}}
        server._rehearse(readers, server._make_stage({str(tmp_path)!r}), lambda: False)
        opts = "lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        raise SystemExit(cli.mount_request(["{dirs['mnt']}", "-o", opts]).serve_forked({ready_w}, -1))"""
    daemon = subprocess.Popen([sys.executable, "-c", script], pass_fds=[ready_w])
    os.close(ready_w)
    try:
        assert os.read(ready_r, 100) == b"ok"
        (dirs["mnt"] / "new").write_text("upper\n")  # a node the rehearsal's file had
        assert os.getxattr(dirs["mnt"] / "f", "user.mark") == b"kept"
        assert (dirs["mnt"] / "f").is_file() and (dirs["mnt"] / "f").stat().st_size == len("lower\n")
        assert (dirs["mnt"] / "new").stat().st_size == len("upper\n")
        assert sorted(os.listdir(dirs["mnt"])) == ["f", "new"]
    finally:
        os.close(ready_r)
        force_unmount(dirs["mnt"])
        daemon.wait(timeout=10)
    assert not (tmp_path / server.STAGE / "upper").exists() or not os.listdir(tmp_path / server.STAGE / "upper")


def test_a_caller_with_fewer_capabilities_is_declined(fork_server, dirs):
    """A root process without CAP_SYS_ADMIN must not get a mount from a server that has it."""
    result = helper(dirs, "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all")
    for daemon in daemons_for(dirs["mnt"]):
        assert parent_of(daemon) != fork_server
    if result.returncode == 0:  # fusermount3 may still mount it, the slow way
        assert is_mounted(dirs["mnt"])


def test_a_server_below_the_callers_limits_makes_way_for_the_callers_own(tmp_path, monkeypatch, dirs):
    """A server started with a lower hard limit than a later caller's (podman applies its
    default_ulimits to itself and to the mount program it starts) cannot give that caller's
    mount the caller's limits: it declines and exits, and the caller, mounting the slow way,
    starts a server of its own, which serves the next mount (with the old one, every such
    caller went the slow way until it idled out)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip("this process's hard limit of open files is not above 1024")
    base = tmp_path / "servers"
    base.mkdir()
    monkeypatch.setenv(client.DIRECTORY, str(base))
    low = subprocess.Popen(["prlimit", "--nofile=1024:1024", PYUNIONFS, "fork-server", "--idle", "60"])
    try:
        wait_until_serving(low)
        result = helper(dirs)
        assert result.returncode == 0, result.stderr
        (daemon,) = daemons_for(dirs["mnt"])
        assert parent_of(daemon) != low.pid and resource.prlimit(daemon, resource.RLIMIT_NOFILE)[1] == hard
        assert low.wait(timeout=10) == 0
        deadline = time.monotonic() + 30
        socket_path = os.path.join(client.location(), client.SOCKET)
        while not (server_pid() not in (None, low.pid) and os.path.exists(socket_path)):
            assert time.monotonic() < deadline, "the caller started no server of its own"
            time.sleep(0.02)
        own = server_pid()
        assert resource.prlimit(own, resource.RLIMIT_NOFILE)[1] == hard
        force_unmount(dirs["mnt"])
        while daemons_for(dirs["mnt"]):
            assert time.monotonic() < deadline, "the first mount's FUSE server did not end"
            time.sleep(0.02)
        assert helper(dirs).returncode == 0
        (daemon,) = daemons_for(dirs["mnt"])
        assert parent_of(daemon) == own
    finally:
        low.kill()
        low.wait()
        server.stop_all(str(base))


def test_new_code_retires_the_server(fork_server, dirs):
    """A server that runs code older than what is installed declines, and exits."""
    module = Path(client.__file__)
    before = os.stat(module)
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    try:
        result = helper(dirs)
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert result.returncode == 0, result.stderr
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) != fork_server
    pidfd = os.pidfd_open(fork_server)
    assert select.select([pidfd], [], [], 10)[0], "the old server did not exit"
    os.close(pidfd)
    # The caller it turned away started a new one.
    deadline = time.monotonic() + 30
    while server_pid() in (None, fork_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_pid() not in (None, fork_server)
    server.stop()


def test_a_server_that_exits_while_its_mounts_live_is_replaced(fork_server, dirs, tmp_path):
    """The mounts a server forked outlive it (podman's containers run for days); the next caller
    after it exits (idle, or stopped) starts a new one, and the new one serves: the FUSE servers
    hold nothing of the old one's, its lock least of all."""
    assert helper(dirs).returncode == 0
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) == fork_server
    server.stop()
    second = {name: tmp_path / f"second-{name}" for name in ("upper", "work", "mnt")}
    for path in second.values():
        path.mkdir()
    try:
        assert helper({**dirs, **second}).returncode == 0  # the slow way; it starts a new server
        deadline = time.monotonic() + 30
        while server_pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        replacement = server_pid()
        assert replacement not in (None, fork_server), "no new server started"
        force_unmount(second["mnt"])
        while daemons_for(second["mnt"]) and time.monotonic() < deadline:  # the slow way's server exits
            time.sleep(0.05)
        assert helper({**dirs, **second}).returncode == 0
        (served,) = daemons_for(second["mnt"])
        assert parent_of(served) == replacement
    finally:
        force_unmount(second["mnt"])
        server.stop()


def waiting_spare_started(server_pid: int) -> float:
    """When the spare SERVER_PID forked to wait for a caller started (seconds since boot); waited
    for."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
            children = f.read().split()
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text() == "pyunionfs fork-\n":  # "... fork-server spare"
                    return int(stat_fields(int(child))[19]) / os.sysconf("SC_CLK_TCK")  # starttime
            except FileNotFoundError:
                continue
        time.sleep(0.01)
    raise AssertionError("the server forked no spare")


def test_a_slow_callers_next_spare_is_forked_once_its_container_has_started(fork_server, dirs, tmp_path):
    """After a caller that came long after the last one had its answer, the next spare is forked
    FORK_DELAY later (its fork would take the CPU the caller's container starts with); callers
    that come right after one another are all served by the server (which, for one that connects
    before the next spare is forked, forks it at once)."""
    time.sleep(2 * server.FORK_DELAY)  # the first caller comes slowly
    assert helper(dirs).returncode == 0
    answered = time.clock_gettime(time.CLOCK_BOOTTIME)
    started = waiting_spare_started(fork_server)
    # The spare's start is counted in clock ticks; the caller had its answer a little before `answered`.
    assert started >= answered + server.FORK_DELAY - 0.03, (started, answered)

    others = []
    for name in ("second", "third"):
        other = {key: tmp_path / name / key for key in ("upper", "work", "mnt")}
        for path in other.values():
            path.mkdir(parents=True)
        others.append({"lower": dirs["lower"], **other})
    try:
        time.sleep(2 * server.FORK_DELAY)
        assert helper(others[0]).returncode == 0
        assert helper(others[1]).returncode == 0  # most likely within the delay
        for other in others:
            (daemon,) = daemons_for(other["mnt"])
            assert parent_of(daemon) == fork_server and (other["mnt"] / "f").read_text() == "lower\n"
    finally:
        for other in others:
            force_unmount(other["mnt"])


def test_the_server_and_its_mounts_keep_few_fds(fork_server, dirs):
    """Each request is served by a spare the server forked ahead of time: the server keeps nothing
    per spare, and a FUSE server it forked has the fds of one mount only."""

    def fds(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    def server_fds() -> int:
        """The server's fds between forks: it forks the next spare once a mount is answered (or
        FORK_DELAY later), and holds both ends of its pipe to it for that moment."""
        time.sleep(server.FORK_DELAY)
        samples = []
        for _ in range(10):
            time.sleep(0.02)
            samples.append(fds(fork_server))
        return min(samples)

    counts = []
    for _ in range(6):
        assert helper(dirs).returncode == 0
        (daemon,) = daemons_for(dirs["mnt"])
        assert parent_of(daemon) == fork_server
        os.stat(dirs["mnt"] / "f")  # answered: its event loop (and its fds) is up, not starting
        counts.append((server_fds(), fds(daemon)))
        force_unmount(dirs["mnt"])
        deadline = time.monotonic() + 10
        while daemons_for(dirs["mnt"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(set(counts)) == 1, counts
    assert counts[0][1] < 32


def test_an_idle_server_exits(tmp_path, monkeypatch):
    monkeypatch.setenv(client.DIRECTORY, str(tmp_path))
    started = subprocess.run([PYUNIONFS, "fork-server", "--idle", "0.5"], timeout=60)
    assert started.returncode == 0
    assert not Path(client.location(), client.SOCKET).exists()


def test_other_users_cannot_reach_the_server(fork_server):
    where = Path(client.location())
    assert where.stat().st_mode & 0o777 == 0o700 and (where / client.SOCKET).stat().st_mode & 0o077 == 0
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                            "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
                            "s.connect(sys.argv[1])", f"{where.name}/{client.SOCKET}"],
                           capture_output=True, text=True, cwd=where.parent)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr


def status_line(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(key + ":"))


@pytest.fixture
def v2_cgroup(tmp_path) -> tuple[Path, str]:
    """A new cgroup (v2) below this process's, removed afterwards: its directory and its path
    as /proc/PID/cgroup shows it."""
    mounts = [line.split(" - ")[0].split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split(" - ")[1].startswith("cgroup2 ") and line.split()[3] == "/"]
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
               None)
    if not mounts or own is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    name = f"pyunionfs-test-{os.getpid()}-{tmp_path.name}"
    path = Path(mounts[0] + own.rstrip("/")) / name
    path.mkdir()
    yield path, f"{own.rstrip('/')}/{name}"
    for pid in (path / "cgroup.procs").read_text().split():  # what a failed test left: back to our cgroup
        (path.parent / "cgroup.procs").write_text(pid)
    deadline = time.monotonic() + 10
    while "populated 1" in (path / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    path.rmdir()


def test_the_served_process_takes_on_the_callers_cgroup_and_limits(fork_server, dirs, v2_cgroup):
    """As the caller's own child would: its cgroup, resource limits, nice value, OOM score."""
    directory, cgroup = v2_cgroup
    enter = f"echo $$ > {directory}/cgroup.procs && echo 500 > /proc/self/oom_score_adj && exec \"$@\""
    result = helper(dirs, "sh", "-c", enter, "sh", "prlimit", "--nofile=1000:2000", "--core=4096:8192",
                    "nice", "-n", "7")
    assert result.returncode == 0, result.stderr
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) == fork_server
    assert f"0::{cgroup}\n" in Path(f"/proc/{daemon}/cgroup").read_text()
    assert Path(f"/proc/{daemon}/oom_score_adj").read_text() == "500\n"
    assert os.getpriority(os.PRIO_PROCESS, daemon) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    limits = Path(f"/proc/{daemon}/limits").read_text()
    assert [line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size")] == [
        ["4096", "8192"]]
    assert [line.split()[4] for line in limits.splitlines() if line.startswith("Max open files")] == [
        "2000"]  # the hard limit (a FUSE server raises its soft limit to it)
    force_unmount(dirs["mnt"])


@pytest.mark.parametrize("confinement", ["no_new_privs", "seccomp"])
def test_a_confined_caller_is_declined(fork_server, dirs, confinement):
    """A caller under no_new_privs or a seccomp filter must not get an unconfined server: the
    server declines, and the caller mounts by itself (its daemon inherits the confinement)."""
    if confinement == "no_new_privs":
        prefix = ["setpriv", "--no-new-privs"]
    else:  # a filter that refuses one harmless call, loaded before exec
        profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["acct"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
        prefix = [sys.executable, "-c", "import json, os, sys; from unionfs.runtime import seccomp; "
                  "seccomp.compile_profile(seccomp.parse(sys.argv[1], 'test'), set()).load(); "
                  "os.execvp(sys.argv[2], sys.argv[2:])", json.dumps(profile)]
    result = helper(dirs, *prefix)
    assert result.returncode == 0, result.stderr
    (daemon,) = daemons_for(dirs["mnt"])
    assert parent_of(daemon) != fork_server
    assert status_line(daemon, "NoNewPrivs" if confinement == "no_new_privs" else "Seccomp") != "0"


def served_launchers(fork_server: int, command: str) -> list[int]:
    """The server's processes that are the launcher of a caller's `run` COMMAND (their children,
    its FUSE server, pyunionfs-fuse, and the container's init, have its command line too)."""
    processes = leftovers(command)[1]
    return [pid for pid in processes if parent_of(pid) == fork_server and Path(f"/proc/{pid}/comm").read_text() ==
            "pyunionfs\n" and any(parent_of(child) == pid for child in processes)]


@pytest.fixture
def image(tmp_path) -> Path:
    return build_image(tmp_path / "image")


def test_a_container_run_is_served_by_the_server(fork_server, image, tmp_path):
    """A process of the server is the launcher; the caller gets the command's output and exit
    status, and its signals reach the command."""
    run = [PYUNIONFS, "run", "--lower", str(image), "--"]
    result = subprocess.run([*run, "sh", "-c", "echo out; echo err >&2; exit 7"], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = subprocess.Popen([*run[:-1], "-v", f"{ready}:/ready", "--", "sh", "-c",
                             'trap "exit 3" TERM; touch /ready/go; while :; do sleep 0.1; done'])
    try:
        deadline = time.monotonic() + 30
        while not (ready / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(served_launchers(fork_server, "/ready/go")) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_a_served_run_gets_the_callers_bytes(fork_server, image, tmp_path):
    """The command (csrc/front.c) sends arguments and environment as bytes: what is not UTF-8,
    or needs quoting in the request, reaches the served run's command as the caller has it."""
    seen = tmp_path / "seen"
    seen.mkdir()
    word, term = b"caf\xe9 \xff'\\\"\n)", b"xterm\x80\x01"
    sleep = unique_sleep()
    script = b'printf "%s|%s" "$TERM" "$0" > /seen/it; exec "$@"'
    proc = subprocess.Popen([os.fsencode(PYUNIONFS), b"run", b"--lower", bytes(image), b"-v", b"%s:/seen" % bytes(seen),
                             b"--", b"sh", b"-c", script, word, *map(str.encode, sleep)],
                            env={**os.environb, b"TERM": term, b"TMPDIR": bytes(tmp_path)})
    try:
        deadline = time.monotonic() + 30
        while not served_launchers(fork_server, "\0".join(sleep)) or not (seen / "it").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not take the run on"
            time.sleep(0.05)
        assert (seen / "it").read_bytes() == term + b"|" + word
    finally:
        proc.kill()
        proc.wait()


def test_killing_a_served_runs_caller_leaves_nothing(fork_server, image, tmp_path):
    """The caller's end (SIGKILL: nothing it can do) ends the server's process that is its
    launcher, as it would end a launcher of its own: no mount, no process left."""
    sleep = unique_sleep()
    proc = subprocess.Popen([PYUNIONFS, "run", "--lower", str(image), "--", *sleep],
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 30
    while not served_launchers(fork_server, "\0".join(sleep)):
        assert time.monotonic() < deadline, "the server did not take the run on"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while leftovers("\0".join(sleep)) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers("\0".join(sleep)) == ([], [])
