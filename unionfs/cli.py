"""The pyunionfs command: `mount`, `umount`, and the mount-helper form used by mount.fuse3 and
containers/storage (`pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=...`)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from unionfs.options import ConfigError, MountConfig, apply_option_string



class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="comma-separated mount options: lowerdir=A:B,upperdir=U,workdir=W, ro, ...")
    parser.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debug output (implies -f)")


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


def _config_from(args: argparse.Namespace, mountpoint: str, source: str = "pyunionfs") -> MountConfig:
    config = MountConfig(lowers=list(getattr(args, "lower", [])), mountpoint=mountpoint, source=source,
                         upper=getattr(args, "upper", None), workdir=getattr(args, "workdir", None))
    for text in args.options:
        apply_option_string(config, text)
    return config


def run(argv: Sequence[str]) -> int:
    # Imported here so that `--help` and bad input do not pay for pyfuse3 and trio.
    from unionfs import daemon, shim

    if argv and argv[0] == "umount":
        daemon.unmount(_umount_parser().parse_args(argv[1:]).mountpoint)
        return 0
    if argv and argv[0] == "mount":
        args = _mount_parser().parse_args(argv[1:])
        config = _config_from(args, args.mountpoint)
    else:
        args = _helper_parser().parse_args(argv)
        if len(args.paths) > 2:
            raise ConfigError("expected [SOURCE] MOUNTPOINT")
        config = _config_from(args, args.paths[-1], *args.paths[:-1])
    shim.restart_with_shim(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s")
    return daemon.serve(config, foreground=args.foreground or args.debug, debug=args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
