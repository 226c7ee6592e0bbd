"""The options of `pyunionfs run` (and `create`) that shape a container, named as in podman and
bubblewrap, and the container they describe. Everything is checked here, before anything is
mounted or made."""
from __future__ import annotations

import argparse
import os
import re

from unionfs.errors import ConfigError
from unionfs.runtime import seccomp
from unionfs.runtime.container import ContainerSpec, Volume


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of `run` and `create` that shape the container, named as in podman."""
    parser.add_argument("--hostname", help="(default: the container's short ID, or pyunionfs)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--env-file", action="append", default=[], metavar="FILE")
    parser.add_argument("-w", "--chdir", dest="chdir", metavar="DIR",
                        help="working directory in the container (default: the image's, or /)")
    parser.add_argument("-u", "--user", metavar="USER[:GROUP]",
                        help="names (from the image's /etc/passwd and /etc/group) or ids")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]")
    parser.add_argument("--tmpfs", action="append", default=[], metavar="DST")
    parser.add_argument("--net", choices=("host", "none"), default="host")
    parser.add_argument("--no-init", action="store_true", help="the command is PID 1")
    parser.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                        help="pass fds 3 to 3+N-1 on to the command (others are closed)")
    parser.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                        help="seccomp=unconfined, seccomp=PROFILE.json (podman's format), no-new-privileges")
    parser.add_argument("--rootless", action="store_true", help="(default when not root)")


def container_spec(args: argparse.Namespace, command: list[str], image: dict | None = None) -> ContainerSpec:
    """The container add_run_options() described, on an image whose OCI config section (Env,
    WorkingDir, User) is IMAGE; the options override it. Checked before anything is made."""
    image = image or {}
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "TERM": os.environ.get("TERM", "xterm"), "container": "pyunionfs"}
    lines = (image.get("Env") or []) + [line for path in args.env_file for line in _read_lines(path)] + args.env
    for line in lines:
        key, has_value, value = line.partition("=")
        if not key or not has_value:
            raise ConfigError(f"environment entries are K=V: {line}")
        env[key] = value
    user = args.user if args.user is not None else image.get("User") or ""
    _check_user(user)
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
    return ContainerSpec(root="", command=command, env=env, cwd=args.chdir or image.get("WorkingDir") or "/",
                         hostname=args.hostname or "pyunionfs", user=user, volumes=volumes, tmpfs=args.tmpfs,
                         net_none=args.net == "none",
                         init=not args.no_init, preserve_fds=args.preserve_fds,
                         seccomp=_seccomp_profile(args.security_opt))


MAX_USER_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")


def _check_user(text: str) -> None:
    """USER[:GROUP]: names (resolved in the container) or ids the kernel takes."""
    for part in text.split(":", 1) if text else []:
        if part.lstrip("-").isdigit():
            if not 0 <= int(part) <= MAX_USER_ID:
                raise ConfigError(f"--user takes ids from 0 to {MAX_USER_ID}: {text}")
        elif not NAME.fullmatch(part):
            raise ConfigError(f"--user takes USER[:GROUP], names or ids: {text}")


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
