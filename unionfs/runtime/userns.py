"""The rootless launcher's user namespace: the caller's id as root, plus its subordinate ids.

A process cannot write a map with more than its own id into its own user namespace; the setuid
helpers newuidmap/newgidmap do it for the ranges in /etc/subuid and /etc/subgid, as podman and
rootlesskit use them. They must run outside the new namespace (a setuid binary run inside it has
no privilege there), so a helper is forked before the launcher unshares, and writes the maps of
the launcher once it has."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass

from unionfs.runtime import sysns
from unionfs.errors import ConfigError

SUBUID_FILE = "/etc/subuid"
SUBGID_FILE = "/etc/subgid"


@dataclass(frozen=True)
class IdRange:
    start: int
    count: int


def subordinate_range(path: str, user_id: int, user_name: str | None) -> IdRange | None:
    """The first range of PATH (subuid(5) format: name-or-id:start:count) for this user."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (str(user_id), user_name):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if count > 0:
            return IdRange(start, count)
    return None


def id_map(own_id: int, subordinate: IdRange) -> list[int]:
    """newuidmap's arguments after the pid: the caller's id as 0, the range from 1 on."""
    return [0, own_id, 1, 1, subordinate.start, subordinate.count]


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def enter_user_namespace() -> None:
    """Become root of a new user namespace, with a mount namespace (A) in which the FUSE server
    can mount with mount(2): with the subordinate ranges when the user has them, else one id."""
    uid, gid = os.geteuid(), os.getegid()
    name = _user_name(uid)
    uids = subordinate_range(SUBUID_FILE, uid, name)
    gids = subordinate_range(SUBGID_FILE, uid, name)
    helpers = shutil.which("newuidmap"), shutil.which("newgidmap")
    if uids and gids and all(helpers):
        _unshare_with_helpers(helpers, id_map(uid, uids), id_map(gid, gids))
        return
    sysns.unshare(sysns.CLONE_NEWUSER | sysns.CLONE_NEWNS)
    for file, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{file}", "w") as f:
            f.write(text)
    why = "no newuidmap/newgidmap (package uidmap)" if uids and gids else \
        f"no entry for {name or uid} in {SUBUID_FILE} and {SUBGID_FILE}"
    print(f"pyunionfs: rootless with one id mapped (uid {uid} as root; {why}): chown to other ids "
          "fails, and apt needs -o APT::Sandbox::User=root", file=sys.stderr)


def _unshare_with_helpers(helpers: tuple[str, str], uid_map: list[int], gid_map: list[int]) -> None:
    launcher = os.getpid()
    unshared_r, unshared_w = os.pipe()
    report_r, report_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(unshared_w)
        os.close(report_r)
        failure = "the launcher could not create a user namespace"
        try:
            if os.read(unshared_r, 1) == b"1":
                failure = _write_maps(helpers, launcher, uid_map, gid_map)
        except Exception as exc:  # reported by the launcher, which has the one error line
            failure = str(exc)
        try:
            os.write(report_w, failure.encode())
        finally:
            os._exit(0)
    os.close(unshared_r)
    os.close(report_w)
    try:
        sysns.unshare(sysns.CLONE_NEWUSER | sysns.CLONE_NEWNS)
        os.write(unshared_w, b"1")
    finally:
        os.close(unshared_w)  # an unshare that failed tells the helper with end of file
        with os.fdopen(report_r, "rb") as report:
            failure = report.read().decode(errors="replace")
        os.waitpid(helper, 0)
    if failure:
        raise ConfigError(f"cannot map the ids of {SUBUID_FILE} and {SUBGID_FILE}: {failure}")


def _write_maps(helpers: tuple[str, str], pid: int, uid_map: list[int], gid_map: list[int]) -> str:
    """Run newuidmap and newgidmap on PID: an empty string, or what went wrong, on one line."""
    for helper, ids in zip(helpers, (uid_map, gid_map)):
        result = subprocess.run([helper, str(pid), *map(str, ids)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            return " ".join(result.stderr.split()) or f"{helper} failed"
    return ""
