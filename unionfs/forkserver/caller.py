"""What a process of the fork server takes on from its caller, so that it is what the caller's
own child would have been: its cgroups, resource limits, nice value, OOM score adjustment and
CPU affinity. What it cannot take on must be the same already: user and group ids, groups,
capabilities, no_new_privs, the seccomp mode, the LSM label and the cgroup namespace (a caller
confined by a seccomp filter must not get an unconfined process). Anything else declines the
request, before anything is done: the caller then does the work itself."""
from __future__ import annotations

import functools
import os
import resource
import signal

# Lines of /proc/PID/status that must match the server's.
SAME_STATUS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
LIMITS = [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]


class Unlike(Exception):
    """The caller differs in a way this process cannot take on."""


class Unreachable(Unlike):
    """The caller has a resource limit above this process's hard limit, or a priority above its
    own: only a privileged process may raise those, but a fork server that the caller started
    would have them."""


def effective_capabilities(status: dict[str, str]) -> int:
    """The effective capabilities in STATUS (see status())."""
    return int(status.get("CapEff", "0"), 16)


def take_on(pid: int, pidfd: int, status: dict[str, str]) -> None:
    """Become like process PID, whose status() is STATUS (PIDFD, a pidfd of it, proves it was PID
    throughout), or raise Unlike."""
    try:
        own = own_status()
        for key in SAME_STATUS:
            if status.get(key) != own.get(key):
                raise Unlike(f"its {key} differs")
        if _label(pid) != _label("self") or _namespace(pid, "cgroup") != _namespace("self", "cgroup"):
            raise Unlike("its LSM label or cgroup namespace differs")
        cgroups = _cgroups(str(pid))
        limits = {limit: resource.prlimit(pid, limit) for limit in LIMITS}
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        with open(f"/proc/{pid}/oom_score_adj") as f:
            oom_score_adj = f.read().strip()
        affinity = os.sched_getaffinity(pid)
        signal.pidfd_send_signal(pidfd, 0)  # all of that was read from the caller, not a successor
        _join_cgroups(cgroups)
        for limit, value in limits.items():
            if resource.getrlimit(limit) != value:
                try:
                    resource.setrlimit(limit, value)
                except ValueError as exc:  # EPERM: a hard limit above this process's
                    raise Unreachable(str(exc)) from None
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except PermissionError as exc:
                raise Unreachable(str(exc)) from None
        with open("/proc/self/oom_score_adj", "r+") as f:
            if f.read().strip() != oom_score_adj:
                f.write(oom_score_adj)
        if os.sched_getaffinity(0) != affinity:
            os.sched_setaffinity(0, affinity)
    except (OSError, ValueError) as exc:  # a limit, a priority or a cgroup this process may not take
        raise Unlike(str(exc)) from None


def status(pid: int | str) -> dict[str, str]:
    """/proc/PID/status, by line name."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").partition(":")[::2] for line in f)


@functools.cache
def own_status() -> dict[str, str]:
    """This process's status(), read once: the lines take_on() compares (ids, capabilities,
    no_new_privs, seccomp) are those of the fork server, which its forks keep."""
    return status("self")


def _label(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/attr/current") as f:
            return f.read()
    except OSError:  # no LSM that labels processes
        return None


def _namespace(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _cgroups(pid: str) -> dict[str, str]:
    """PID's cgroup in each hierarchy: {"ID:CONTROLLERS": path}."""
    with open(f"/proc/{pid}/cgroup") as f:
        return dict(line.rstrip("\n").rpartition(":")[::2] for line in f if line.strip())


def _join_cgroups(wanted: dict[str, str]) -> None:
    """Move this process into the cgroups WANTED, in every hierarchy where it is elsewhere."""
    own = _cgroups("self")
    for hierarchy, path in wanted.items():
        if own.get(hierarchy) != path:
            with open(os.path.join(_hierarchy_mount(hierarchy, path), path.lstrip("/"), "cgroup.procs"), "w") as f:
                f.write("0")


def _hierarchy_mount(hierarchy: str, path: str) -> str:
    """Where the cgroup hierarchy "ID:CONTROLLERS" is mounted in full (its root at /), to reach PATH."""
    controllers = set(hierarchy.partition(":")[2].split(",")) - {""}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            fstype, _, options = tail.split()[:3]
            root, mountpoint = fields.split()[3:5]
            if root != "/":
                continue
            if (fstype == "cgroup2" and not controllers) or (
                    fstype == "cgroup" and controllers and controllers <= set(options.split(","))):
                return mountpoint
    raise Unlike(f"no mount of the cgroup hierarchy {hierarchy} to reach {path}")
