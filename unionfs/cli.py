"""The pyunionfs command: `mount`, `umount`, and the mount-helper form used by mount.fuse3 and
containers/storage (`pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=...`)."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from typing import NoReturn, Sequence

from unionfs import __version__
from unionfs.runtime.container import EXIT_LAUNCHER_ERROR
from unionfs.errors import ConfigError
from unionfs.fs import serve
from unionfs.fs.options import MountConfig, apply_option_string



class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="comma-separated mount options: lowerdir=A:B,upperdir=U,workdir=W, ro, ...")
    parser.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-d", "--debug", dest="debug", action="store_true",
                        help="log debug output (implies -f; also -o debug)")


def _mount_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyunionfs mount", description="Mount a union of directories.")
    parser.add_argument("--lower", action="append", default=[], metavar="DIR",
                        help="a read-only lower directory; repeat it, top layer first")
    parser.add_argument("--upper", metavar="DIR", help="the writable upper directory")
    parser.add_argument("--workdir", metavar="DIR", help="work directory on the upper's filesystem")
    parser.add_argument("mountpoint")
    _add_serve_flags(parser)
    return parser


def _helper_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pyunionfs",
        usage="pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,...] [-f] [-d]\n"
              "       pyunionfs mount --lower DIR [--lower DIR ...] [-o OPTS] [-f] [-d] MOUNTPOINT\n"
              "       pyunionfs umount MOUNTPOINT",
        description="A union filesystem with kernel overlayfs semantics. Commands: "
                    "`pyunionfs mount ...`, `pyunionfs umount MOUNTPOINT`, or the mount-helper form "
                    "`pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W]`.")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    _add_serve_flags(parser)
    return parser


def _umount_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyunionfs umount", description="Unmount a union.")
    parser.add_argument("mountpoint")
    return parser


def _run_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyunionfs run", usage="pyunionfs run --lower DIR [--lower DIR ...] [options] -- CMD [ARGS...]",
                           description="Run a command in new namespaces with the union as its root.")
    parser.add_argument("--lower", action="append", required=True, metavar="DIR", help="image layer, top first")
    parser.add_argument("--upper", metavar="DIR", help="the container's writable layer (default: a temporary one)")
    parser.add_argument("--workdir", metavar="DIR", help="the overlay work directory for --upper")
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
    parser.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def _run_config(args: argparse.Namespace):
    from unionfs.runtime.container import ContainerSpec, Volume
    from unionfs.runtime.launcher import RunConfig

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("no command given (pyunionfs run ... -- CMD)")
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
    spec = ContainerSpec(root="", command=command, env=env, cwd=args.chdir, hostname=args.hostname,
                         uid=uid, gid=gid, volumes=volumes, tmpfs=args.tmpfs, net_none=args.net == "none",
                         init=not args.no_init, preserve_fds=args.preserve_fds,
                         seccomp=_seccomp_profile(args.security_opt))
    return RunConfig(lowers=[os.path.abspath(d) for d in args.lower], command=command,
                     upper=args.upper and os.path.abspath(args.upper),
                     workdir=args.workdir and os.path.abspath(args.workdir), rootless=args.rootless,
                     spec=spec)


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
    from unionfs.runtime import seccomp

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


def _config_from(args: argparse.Namespace, mountpoint: str, source: str = "pyunionfs") -> MountConfig:
    config = MountConfig(lowers=list(getattr(args, "lower", [])), mountpoint=mountpoint, source=source,
                         upper=getattr(args, "upper", None), workdir=getattr(args, "workdir", None))
    for text in args.options:
        apply_option_string(config, text)
    return config


def _print_version() -> int:
    """As fuse-overlayfs --version does (podman info asks the mount program for it)."""
    fuse = ctypes.util.find_library("fuse3")
    library = ctypes.CDLL(fuse).fuse_pkgversion if fuse else None
    if library is not None:
        library.restype = ctypes.c_char_p
    print(f"pyunionfs: version {__version__}")
    print(f"FUSE library version {library().decode() if library is not None else 'unknown'}")
    return 0


def run(argv: Sequence[str]) -> int:
    if argv[:1] in (["--version"], ["-V"]):
        return _print_version()
    if argv and argv[0] == "run":
        # The launcher never imports pyfuse3 or trio: it makes namespaces, which a process
        # with threads cannot enter, and runs the filesystem server as a process of its own.
        from unionfs.runtime import launcher

        return launcher.run(_run_config(_run_parser().parse_args(argv[1:])))
    if argv and argv[0] == "umount":
        serve.unmount(_umount_parser().parse_args(argv[1:]).mountpoint)
        return 0
    if argv and argv[0] == "mount":
        args = _mount_parser().parse_args(argv[1:])
        config = _config_from(args, args.mountpoint)
    else:
        args = _helper_parser().parse_args(argv)
        if len(args.paths) > 2:
            raise ConfigError("expected [SOURCE] MOUNTPOINT")
        config = _config_from(args, args.paths[-1], *args.paths[:-1])
    return serve.serve(config, foreground=args.foreground, debug=args.debug or config.debug)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except ConfigError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        # `run` keeps 0-124 and 126-255 for the command, as podman does.
        return EXIT_LAUNCHER_ERROR if argv[:1] == ["run"] else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
