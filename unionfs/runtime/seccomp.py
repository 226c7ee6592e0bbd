"""The container's seccomp filter: a profile in podman's format (containers/common seccomp.json:
defaultAction, archMap and syscalls rules with args, includes and excludes), compiled with
libseccomp (through cffi, against the system's libseccomp.so.2) into a BPF program, and loaded in
the command's process last before exec. A process compiles each profile once (the fork server
has the default's ready for every container it starts).

The default profile (DEFAULT_PROFILE) is pyunionfs's own, in that format. It refuses what
podman's default refuses, with the same errno, and is stricter where podman counts on the
capabilities instead: keyrings, mounts and new namespaces are refused outright, as Docker's
default profile does. Unlike podman's it allows what it does not name (see the README)."""
from __future__ import annotations

import errno
import functools
import json
import os
import platform
from dataclasses import dataclass
from typing import Any

from unionfs.errors import ConfigError
from unionfs.runtime import sysns

EPERM, ENOSYS, EINVAL = errno.EPERM, errno.ENOSYS, errno.EINVAL
CLONE_NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                         "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                         "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}


def _refuse(names: list[str], err: int = EPERM, unless_cap: str | None = None, **extra: Any) -> dict:
    rule: dict[str, Any] = {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": err, **extra}
    if unless_cap:
        rule["excludes"] = {"caps": [unless_cap]}
    return rule


def _refuse_flags(name: str, arg: int) -> list[dict]:
    """One rule per namespace flag: NAME is refused when argument ARG has it set."""
    return [_refuse([name], args=[{"index": arg, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}])
            for flag in CLONE_NAMESPACE_FLAGS.values()]


DEFAULT_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
    "syscalls": [
        # What podman refuses outright: obsolete calls, the kernel's own machinery, swap,
        # userfaultfd (a lever for kernel exploits) and vmsplice.
        _refuse(["bdflush", "io_pgetevents", "kexec_file_load", "kexec_load", "migrate_pages", "move_pages",
                 "nfsservctl", "nice", "oldfstat", "oldlstat", "oldolduname", "oldstat", "olduname",
                 "pciconfig_iobase", "pciconfig_read", "pciconfig_write", "sgetmask", "ssetmask", "swapcontext",
                 "swapoff", "swapon", "sysfs", "uselib", "userfaultfd", "ustat", "vm86", "vm86old", "vmsplice"]),
        # Not in podman's allowed list either, so refused there by its default action.
        _refuse(["io_uring_setup", "io_uring_enter", "io_uring_register", "add_key", "request_key"], ENOSYS),
        # What podman allows only with a capability the container does not have.
        _refuse(["open_by_handle_at"], unless_cap="CAP_DAC_READ_SEARCH"),
        _refuse(["bpf", "fanotify_init", "lookup_dcookie", "perf_event_open", "quotactl", "quotactl_fd",
                 "setdomainname", "sethostname", "setns"], unless_cap="CAP_SYS_ADMIN"),
        _refuse(["delete_module", "init_module", "finit_module", "query_module"], unless_cap="CAP_SYS_MODULE"),
        _refuse(["get_mempolicy", "mbind", "set_mempolicy"], unless_cap="CAP_SYS_NICE"),
        _refuse(["acct"], unless_cap="CAP_SYS_PACCT"),
        _refuse(["kcmp", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"],
                unless_cap="CAP_SYS_PTRACE"),
        _refuse(["iopl", "ioperm"], unless_cap="CAP_SYS_RAWIO"),
        _refuse(["settimeofday", "stime", "clock_settime", "clock_settime64"], unless_cap="CAP_SYS_TIME"),
        _refuse(["vhangup"], unless_cap="CAP_SYS_TTY_CONFIG"),
        _refuse(["syslog"], unless_cap="CAP_SYSLOG"),
        # Audit netlink sockets without CAP_AUDIT_WRITE, with podman's errno.
        _refuse(["socket"], EINVAL, unless_cap="CAP_AUDIT_WRITE",
                args=[{"index": 0, "value": 16, "valueTwo": 0, "op": "SCMP_CMP_EQ"},
                      {"index": 2, "value": 9, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]),
        # Stricter than podman, as Docker: the host's keyrings, mounts and new namespaces (a
        # user namespace would give back every capability dropped here).
        _refuse(["keyctl"]),
        _refuse(["mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
                 "move_mount", "open_tree", "mount_setattr"], unless_cap="CAP_SYS_ADMIN"),
        *_refuse_flags("unshare", 0),
        *_refuse_flags("clone", 0),  # the flags are clone's first argument on x86_64 and arm64
        # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes the C library
        # fall back to clone, whose flags it can.
        _refuse(["clone3"], ENOSYS),
    ],
}

# libseccomp's actions (seccomp.h) and comparison operators.
ACTIONS = {"SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
           "SCMP_ACT_TRAP": 0x00030000, "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
           "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000}
WITH_VALUE = {"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"}
OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
             "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
# podman's names of architectures, in includes.arches, by what platform.machine() says.
ARCH_NAMES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "x86", "s390x": "s390x",
              "ppc64le": "ppc64le"}


@dataclass(frozen=True)
class Profile:
    """A checked profile: what load() compiles."""

    source: str
    data: dict


def _action(name: Any, value: Any, where: str) -> int:
    if name not in ACTIONS:
        raise ConfigError(f"seccomp profile {where}: unknown action {name!r}")
    base = ACTIONS[name]
    return base | (int(value) & 0xFFFF) if name in WITH_VALUE else base


def parse(text: str, source: str) -> Profile:
    """Check TEXT (podman's JSON format) before anything is mounted or written."""
    try:
        data = json.loads(text)
        _action(data["defaultAction"], data.get("defaultErrnoRet", EPERM), "defaultAction")
        for number, rule in enumerate(data.get("syscalls", [])):
            where = f"syscalls[{number}]"
            if not isinstance(rule.get("names"), list) or not all(isinstance(n, str) for n in rule["names"]):
                raise ConfigError(f"seccomp profile {source}: {where} has no list of names")
            _action(rule.get("action"), rule.get("errnoRet", EPERM), where)
            for arg in rule.get("args") or []:
                if arg.get("op") not in OPERATORS or not 0 <= int(arg.get("index", -1)) < 6:
                    raise ConfigError(f"seccomp profile {source}: {where} has a bad argument rule {arg}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"seccomp profile {source} cannot be used: {exc}") from None
    return Profile(source, data)


def read(path: str) -> Profile:
    try:
        with open(path) as f:
            return parse(f.read(), path)
    except OSError as exc:
        raise ConfigError(f"cannot read seccomp profile {path}: {exc.strerror}") from None


def default() -> Profile:
    return Profile("the default profile", DEFAULT_PROFILE)


def _applies(rule: dict, caps: set[str], arch: str) -> bool:
    """Whether RULE's includes and excludes (podman's semantics) let it apply here."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if any(cap not in caps for cap in includes.get("caps") or []):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if any(cap in caps for cap in excludes.get("caps") or []):
        return False
    if arch in (excludes.get("arches") or []):
        return False
    min_kernel = includes.get("minKernel")
    if min_kernel and _kernel() < tuple(int(part) for part in str(min_kernel).split(".")[:2]):
        return False
    return True


def _kernel() -> tuple[int, ...]:
    release = platform.release().split("-")[0].split(".")
    return tuple(int(part) for part in release[:2] if part.isdigit())


@dataclass(frozen=True)
class Filter:
    """A profile compiled by libseccomp for this machine: its BPF program, to be loaded later.
    The library and the compiling are done while the host's files are still in reach, the loading
    last before exec."""

    program: bytes

    def load(self) -> None:
        """Load the filter into this process (no_new_privs set): for good, across exec, for every child."""
        sysns.load_seccomp_filter(self.program)


def compile_profile(profile: Profile, caps: set[str]) -> Filter:
    """PROFILE compiled for a process with capabilities CAPS."""
    return _compiled(json.dumps(profile.data, sort_keys=True), frozenset(caps))


@functools.lru_cache(maxsize=8)
def _compiled(profile_json: str, caps: frozenset[str]) -> Filter:
    from unionfs.runtime._seccomp_lib import open_library

    ffi, lib = open_library()
    data = json.loads(profile_json)
    ctx = lib.seccomp_init(_action(data["defaultAction"], data.get("defaultErrnoRet", EPERM), "defaultAction"))
    if ctx == ffi.NULL:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        _add_rules(ffi, lib, ctx, data, caps)
        exported = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, exported), "seccomp_export_bpf")
            return Filter(os.pread(exported, os.fstat(exported).st_size, 0))
        finally:
            os.close(exported)
    finally:
        lib.seccomp_release(ctx)


def _add_rules(ffi: Any, lib: Any, ctx: Any, data: dict, caps: frozenset[str]) -> None:
    from unionfs.runtime._seccomp_lib import NR_SCMP_ERROR

    native = lib.seccomp_arch_native()
    for entry in data.get("archMap") or []:
        if lib.seccomp_arch_resolve_name(_arch_token(entry["architecture"])) == native:
            for sub in entry.get("subArchitectures") or []:
                token = lib.seccomp_arch_resolve_name(_arch_token(sub))
                if token and lib.seccomp_arch_exist(ctx, token) != 0:
                    _check(lib.seccomp_arch_add(ctx, token), "seccomp_arch_add")
    arch = ARCH_NAMES.get(platform.machine(), platform.machine())
    for rule in data.get("syscalls") or []:
        if not _applies(rule, caps, arch):
            continue
        action = _action(rule["action"], rule.get("errnoRet", data.get("defaultErrnoRet", EPERM)), "rule")
        args = rule.get("args") or []
        indexes = [int(arg["index"]) for arg in args]
        # podman's rule: two conditions on one argument mean either, so one rule each.
        groups = [[arg] for arg in args] if len(set(indexes)) < len(indexes) else [args]
        for name in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == NR_SCMP_ERROR:
                continue  # not a system call of this architecture
            for group in groups:
                comparisons = ffi.new("struct scmp_arg_cmp[]", [
                    {"arg": int(arg["index"]), "op": OPERATORS[arg["op"]], "datum_a": int(arg["value"]),
                     "datum_b": int(arg.get("valueTwo", 0))} for arg in group]) if group else ffi.NULL
                rc = lib.seccomp_rule_add_array(ctx, action, number, len(group), comparisons)
                if rc in (-errno.EEXIST, -errno.EACCES):
                    continue  # the same rule twice, or one with the default action
                _check(rc, f"seccomp rule for {name}")


def _arch_token(name: str) -> bytes:
    """libseccomp's name of an architecture podman calls SCMP_ARCH_X86_64 and so on."""
    return name.removeprefix("SCMP_ARCH_").lower().encode()


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
