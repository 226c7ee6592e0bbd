"""What runs in a `pyunionfs run` container stays in it, as root and rootless: the caller's open
files stay out, a hostile image's symlinks cannot send the launcher's mounts or files to the host,
`:ro` volumes are read-only all the way down, and a seccomp filter with podman's refusals (and
Docker's, for keyrings, mounts and namespaces) is on unless asked off."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mounts import PYUNIONFS
from launchers import Launcher, chown_tree
from trees import checksum
from unionfs.runtime.container import KEPT_CAPS

PROBE_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
/* probe NR [ARGS...]: make system call NR and print "ok" or the errno's name. */
int main(int argc, char **argv) {
    long a[6] = {0};
    for (int i = 2; i < argc && i < 8; i++) a[i - 2] = strtol(argv[i], NULL, 0);
    long rc = syscall(strtol(argv[1], NULL, 0), a[0], a[1], a[2], a[3], a[4], a[5]);
    printf("%s\n", rc < 0 ? strerrorname_np(errno) : "ok");
    return 0;
}
"""
# x86_64 system call numbers, with arguments that make each fail harmlessly if it runs at all.
PROBES = {"keyctl": "250 0", "add_key": "248 0 0 0 0 0", "unshare(CLONE_NEWUSER)": "272 0x10000000",
          "mount": "165 0 0 0 0 0", "open_by_handle_at": "304 -1 0 0", "clone3": "435 0 0", "getpid": "39"}


def run_on(launcher: Launcher, layers: list[Path], *args: str, open_fds: str = "") -> subprocess.CompletedProcess:
    """`pyunionfs run` with LAYERS on top of the launcher's image, from a shell that first opens
    OPEN_FDS (redirections such as `7<DIR`), as a careless caller would leave them open."""
    lowers = [arg for layer in layers for arg in ("--lower", str(layer))]
    command = [*launcher.prefix, "sh", "-c", f'exec {open_fds} "$@"', "sh", "env", f"TMPDIR={launcher.tmp}",
               PYUNIONFS, "run", *lowers, "--lower", str(launcher.image), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def owned_dir(launcher: Launcher, name: str) -> Path:
    """A directory the launcher's user owns, so that only the launcher's care keeps it intact."""
    return launcher.directory(name)


def test_the_callers_open_files_stay_out(launcher):
    host = owned_dir(launcher, "host")
    (host / "secret").write_text("host secret\n")
    message = owned_dir(launcher, "message") / "text"
    message.write_text("through fd 3\n")
    if launcher.owner:
        chown_tree(host, *launcher.owner)
        os.chown(message, *launcher.owner)
    before = checksum(host)
    opened = f'7<"{host}" 3<"{message}"'
    leaked = run_on(launcher, [], "--", "sh", "-c",
                    "cat /proc/self/fd/7/secret; echo x > /proc/self/fd/7/new; ls /proc/1/fd", open_fds=opened)
    preserved = run_on(launcher, [], "--preserve-fds", "1", "--", "sh", "-c", "cat <&3; ls /proc/self/fd",
                       open_fds=opened)
    assert "host secret" not in leaked.stdout and checksum(host) == before
    assert "7" not in leaked.stdout.split()  # nor does the container's init hold it
    assert "through fd 3" in preserved.stdout, preserved.stderr
    assert "7" not in preserved.stdout.split()


def test_symlinks_in_the_image_keep_mounts_and_made_files_inside(launcher):
    """A hostile layer points etc, a volume's, a tmpfs's and a file volume's parents at host
    directories: nothing is made or mounted there, and each mount is where the container looks."""
    hostile = launcher.directory("hostile")
    hosts = {name: owned_dir(launcher, name) for name in ("etc-target", "c-target", "t-target", "f-target")}
    for link, target in (("etc", "etc-target"), ("c", "c-target"), ("t", "t-target"), ("f", "f-target")):
        (hostile / link).symlink_to(hosts[target])
    volume, volume_file = launcher.directory("volume"), launcher.directory("file") / "content"
    (volume / "content").write_text("in the volume\n")
    volume_file.write_text("a file volume\n")
    if launcher.owner:
        for path in (hostile, volume, volume_file):
            chown_tree(path, *launcher.owner) if path.is_dir() else os.chown(path, *launcher.owner)
    before = {name: checksum(path) for name, path in hosts.items()}
    result = run_on(launcher, [hostile], "-v", f"{volume}:/c/sub/deeper", "-v", f"{volume_file}:/f/file",
                    "--tmpfs", "/t/x", "--hostname", "inside", "--", "sh", "-c",
                    "cat /c/sub/deeper/content /f/file /etc/hostname; "
                    '[ "$(stat -c %d /t/x)" != "$(stat -c %d /t)" ] && echo tmpfs mounted')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["in the volume", "a file volume", "inside", "tmpfs mounted"]
    assert {name: checksum(path) for name, path in hosts.items()} == before


def test_read_only_volumes_are_read_only_all_the_way_down(launcher, tmp_path):
    volume = launcher.directory("ro-volume")
    (volume / "sub").mkdir()
    if launcher.owner:
        chown_tree(volume, *launcher.owner)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(volume / "sub")], check=True)
    try:
        os.chmod(volume / "sub", 0o777)
        before = checksum(volume)
        result = run_on(launcher, [], "-v", f"{volume}:/x:ro", "--", "sh", "-c",
                        "touch /x/top; touch /x/sub/below; grep ' /x' /proc/self/mounts | grep -vc ' ro,'")
        after = checksum(volume)
    finally:
        subprocess.run(["umount", "-l", str(volume / "sub")], check=True)
    assert "Read-only file system" in result.stderr and result.stderr.count("Read-only") == 2
    assert result.stdout.strip() == "0"  # no mount below /x stays writable
    assert after == before


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """A static program that makes one system call and says how it went."""
    if platform.machine() != "x86_64":
        pytest.skip("the probe's system call numbers are x86_64's")
    build = tmp_path_factory.mktemp("probe")
    (build / "probe.c").write_text(PROBE_SOURCE)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(build / "probe"), str(build / "probe.c")], check=True)
    return build / "probe"


def probe_all(launcher: Launcher, probe: Path, *options: str) -> dict[str, str]:
    layer = launcher.directory("probe-layer")
    shutil.copy(probe, layer / "probe")
    if launcher.owner:
        chown_tree(layer, *launcher.owner)
    script = "; ".join(f"/probe {args}" for args in PROBES.values()) + "; grep ^Seccomp: /proc/self/status"
    result = run_on(launcher, [layer], *options, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    return {**dict(zip(PROBES, lines)), "status": lines[len(PROBES)]}


def test_the_default_seccomp_filter_refuses_as_podman_and_docker(launcher, probe):
    seen = probe_all(launcher, probe)
    assert seen == {"keyctl": "EPERM", "add_key": "ENOSYS", "unshare(CLONE_NEWUSER)": "EPERM", "mount": "EPERM",
                    "open_by_handle_at": "EPERM", "clone3": "ENOSYS", "getpid": "ok", "status": "Seccomp:\t2"}


def test_seccomp_unconfined_and_a_profile_file(launcher, probe):
    unconfined = probe_all(launcher, probe, "--security-opt", "seccomp=unconfined")
    assert unconfined["status"] == "Seccomp:\t0"
    assert unconfined["keyctl"] == "EINVAL" and unconfined["unshare(CLONE_NEWUSER)"] == "ok"
    assert unconfined["clone3"] != "ENOSYS"
    podmans = "/usr/share/containers/seccomp.json"  # podman's own default, where podman is installed
    if os.path.exists(podmans):
        with_podmans = probe_all(launcher, probe, "--security-opt", f"seccomp={podmans}")
        assert with_podmans["keyctl"] == "EINVAL" and with_podmans["add_key"] == "ENOSYS"
        assert with_podmans["status"] == "Seccomp:\t2"


def test_two_containers_on_one_upper_refused_in_one_line(launcher):
    upper, work = launcher.directory("shared-upper"), launcher.directory("shared-work")
    first = subprocess.Popen([*launcher.prefix, "env", f"TMPDIR={launcher.tmp}", PYUNIONFS, "run", "--lower",
                              str(launcher.image), "--upper", str(upper), "--workdir", str(work), "--",
                              "sh", "-c", "touch /started; sleep 5"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (upper / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_on(launcher, [], "--upper", str(upper), "--workdir", str(work), "--", "true")
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 125
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "upper directory is in use by another mount" in lines[0]


@pytest.mark.parametrize("options", [
    ["--user", "99999999999"], ["--user", "-5"], ["--tmpfs", "relative/path"], ["--tmpfs", "/"],
    ["-v", "/tmp:/"], ["-v", "/tmp:relative"], ["--preserve-fds", "5"], ["--preserve-fds", "-1"],
    ["--security-opt", "seccomp=/nonexistent.json"], ["--security-opt", "label=disable"],
])
def test_bad_run_options_are_one_line_before_anything_is_made(launcher, options):
    tmp_before = sorted(os.listdir(launcher.tmp))
    result = run_on(launcher, [], *options, "--", "true")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 125 and len(lines) == 1 and lines[0].startswith("pyunionfs: "), result.stderr
    assert sorted(os.listdir(launcher.tmp)) == tmp_before  # no scratch directory, no mount


def test_profiles_are_checked_when_read():
    from unionfs.runtime import seccomp
    from unionfs.errors import ConfigError

    good = seccomp.parse('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], '
                         '"action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}]}',
                         "good.json")
    assert good.data["syscalls"][0]["names"] == ["read"]
    for bad in ("not json", '{"syscalls": []}', '{"defaultAction": "SCMP_ACT_MAYBE"}',
                '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "read", "action": "SCMP_ACT_ALLOW"}]}',
                '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", '
                '"args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]}'):
        with pytest.raises(ConfigError):
            seccomp.parse(bad, "bad.json")


def test_capabilities_no_new_privs_and_a_read_only_sys(launcher):
    """podman's default capability set is the bounding set, no_new_privs is on, /sys is
    read-only and /proc's sensitive parts are masked or read-only."""
    result = run_on(launcher, [], "--", "sh", "-c",
                    "grep -E '^(CapBnd|NoNewPrivs):' /proc/self/status; touch /sys/x 2>&1; "
                    "sh -c 'echo 1 > /proc/sys/vm/drop_caches' 2>&1; cat /proc/kcore | wc -c")
    lines = result.stdout.splitlines()
    kept = sum(1 << cap for cap in KEPT_CAPS)
    assert lines[0] == f"CapBnd:\t{kept:016x}" and lines[1] == "NoNewPrivs:\t1"
    assert "Read-only file system" in lines[2] and "Read-only file system" in lines[3]
    assert lines[4].strip() == "0"
