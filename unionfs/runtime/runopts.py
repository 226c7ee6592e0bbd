"""The options of `pyunionfs run` (and `create`) that shape a container, named as in podman and
bubblewrap, and the container they describe. Everything is checked here, before anything is
mounted or made."""
from __future__ import annotations

import argparse
import os

from unionfs.errors import ConfigError
from unionfs.runtime import seccomp
from unionfs.runtime.container import ContainerSpec, Volume


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of `run` and `create` that shape the container, named as in podman."""
    parser.add_argument("--hostname", default="pyunionfs")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--env-file", action="append", default=[], metavar="FILE")
    parser.add_argument("-w", "--chdir", default="/", metavar="DIR", help="working directory in the container")
    parser.add_argument("--user", metavar="UID[:GID]")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]")
    parser.add_argument("--tmpfs", action="append", default=[], metavar="DST")
    parser.add_argument("--net", choices=("host", "none"), default="host")
    parser.add_argument("--no-init", action="store_true", help="the command is PID 1")
    parser.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                        help="pass fds 3 to 3+N-1 on to the command (others are closed)")
    parser.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                        help="seccomp=unconfined, seccomp=PROFILE.json (podman's format), no-new-privileges")
    parser.add_argument("--rootless", action="store_true", help="(default when not root)")


def container_spec(args: argparse.Namespace, command: list[str]) -> ContainerSpec:
    """The container add_run_options() described, checked before anything is made."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "TERM": os.environ.get("TERM", "xterm"), "container": "pyunionfs"}
    lines = [line for path in args.env_file for line in _read_lines(path)] + args.env
    for line in lines:
        key, has_value, value = line.partition("=")
        if not key or not has_value:
            raise ConfigError(f"environment entries are K=V: {line}")
        env[key] = value
    uid, gid = _user(args.user) if args.user else (0, 0)
    volumes = []
    for text in args.volume:
        source, _, rest = text.partition(":")
        target, _, mode = rest.partition(":")
        if not source or mode not in ("", "ro", "rw"):
            raise ConfigError(f"volumes are SRC:DST[:ro]: {text}")
        _check_destination("volume", target)
        if not os.path.exists(source):
            raise ConfigError(f"volume source does not exist: {source}")
        volumes.append(Volume(os.path.abspath(source), target, mode == "ro"))
    for target in args.tmpfs:
        _check_destination("--tmpfs", target)
    if args.preserve_fds < 0:
        raise ConfigError(f"--preserve-fds takes a number of fds: {args.preserve_fds}")
    for fd in range(3, 3 + args.preserve_fds):
        try:
            os.fstat(fd)
        except OSError:
            raise ConfigError(f"--preserve-fds {args.preserve_fds}: fd {fd} is not open") from None
    return ContainerSpec(root="", command=command, env=env, cwd=args.chdir, hostname=args.hostname,
                         uid=uid, gid=gid, volumes=volumes, tmpfs=args.tmpfs, net_none=args.net == "none",
                         init=not args.no_init, preserve_fds=args.preserve_fds,
                         seccomp=_seccomp_profile(args.security_opt))


MAX_USER_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel


def _user(text: str) -> tuple[int, int]:
    """--user UID[:GID], numeric, as ids the kernel takes."""
    uid_text, _, gid_text = text.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise ConfigError(f"--user takes numeric UID[:GID]: {text}") from None
    if not (0 <= uid <= MAX_USER_ID and 0 <= gid <= MAX_USER_ID):
        raise ConfigError(f"--user takes ids from 0 to {MAX_USER_ID}: {text}")
    return uid, gid


def _check_destination(what: str, target: str) -> None:
    """A mount destination in the container: absolute, and not the root itself."""
    if not target.startswith("/") or not target.strip("/"):
        raise ConfigError(f"{what} destinations must be absolute paths other than /: {target or '(empty)'}")


def _seccomp_profile(options: list[str]):
    """The seccomp profile --security-opt asks for: pyunionfs's default, a file, or none."""
    profile = seccomp.default()
    for option in options:
        key, _, value = option.partition("=")
        if key == "seccomp" and value == "unconfined":
            profile = None
        elif key == "seccomp" and value:
            profile = seccomp.read(value)
        elif option not in ("no-new-privileges", "no-new-privileges=true"):  # always so
            raise ConfigError(f"unsupported --security-opt: {option} (seccomp=unconfined|PROFILE, "
                              "no-new-privileges)")
    return profile



def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
