"""The pyunionfs command, a thin front over the filesystem (unionfs/fs), the container runtime
(unionfs/runtime) and the image and container store (unionfs/store): a command table, each
command's arguments, and one line for any error. Also the mount-helper form that mount.fuse3 and
containers/storage use (`pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=...`)."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from unionfs import __version__, present
from unionfs.errors import EXIT_LAUNCHER_ERROR, ConfigError
from unionfs.fs import serve
from unionfs.fs.options import MountConfig, apply_option_string


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _parser(command: str, description: str, usage: str | None = None) -> OneLineParser:
    return OneLineParser(prog=f"pyunionfs {command}", description=description, usage=usage)


# ---- mounting ----

def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="comma-separated mount options: lowerdir=A:B,upperdir=U,workdir=W, ro, ...")
    parser.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-d", "--debug", dest="debug", action="store_true",
                        help="log debug output (implies -f; also -o debug)")


def _config_from(args: argparse.Namespace, mountpoint: str, source: str = "pyunionfs") -> MountConfig:
    config = MountConfig(lowers=list(getattr(args, "lower", [])), mountpoint=mountpoint, source=source,
                         upper=getattr(args, "upper", None), workdir=getattr(args, "workdir", None))
    for text in args.options:
        apply_option_string(config, text)
    return config


def mount(argv: list[str], root: str | None) -> int:
    parser = _parser("mount", "Mount a union of directories.")
    parser.add_argument("--lower", action="append", default=[], metavar="DIR",
                        help="a read-only lower directory; repeat it, top layer first")
    parser.add_argument("--upper", metavar="DIR", help="the writable upper directory")
    parser.add_argument("--workdir", metavar="DIR", help="work directory on the upper's filesystem")
    parser.add_argument("mountpoint")
    _add_serve_flags(parser)
    args = parser.parse_args(argv)
    config = _config_from(args, args.mountpoint)
    return serve.serve(config, foreground=args.foreground, debug=args.debug or config.debug)


def mount_helper(argv: list[str]) -> int:
    """The form of mount.fuse3 and of containers/storage's mount_program."""
    parser = OneLineParser(prog="pyunionfs", usage="pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,...] [-f] [-d]")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    _add_serve_flags(parser)
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        raise ConfigError("expected [SOURCE] MOUNTPOINT")
    config = _config_from(args, args.paths[-1], *args.paths[:-1])
    return serve.serve(config, foreground=args.foreground, debug=args.debug or config.debug)


def umount(argv: list[str], root: str | None) -> int:
    parser = _parser("umount", "Unmount a union.")
    parser.add_argument("mountpoint")
    serve.unmount(parser.parse_args(argv).mountpoint)
    return 0


# ---- containers ----

def run(argv: list[str], root: str | None) -> int:
    # The launcher never imports pyfuse3 or trio: it makes namespaces, which a process with
    # threads cannot enter, and runs the filesystem server as a process of its own.
    from unionfs.runtime import launcher, runopts

    parser = _parser("run", "Run a command in new namespaces with the union as its root.",
                     "pyunionfs run --lower DIR [--lower DIR ...] [options] -- CMD [ARGS...]")
    parser.add_argument("--lower", action="append", required=True, metavar="DIR", help="image layer, top first")
    parser.add_argument("--upper", metavar="DIR", help="the container's writable layer (default: a temporary one)")
    parser.add_argument("--workdir", metavar="DIR", help="the overlay work directory for --upper")
    runopts.add_run_options(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("no command given (pyunionfs run ... -- CMD)")
    spec = runopts.container_spec(args, command)
    return launcher.run(launcher.RunConfig(
        lowers=[os.path.abspath(d) for d in args.lower], command=command,
        upper=args.upper and os.path.abspath(args.upper), workdir=args.workdir and os.path.abspath(args.workdir),
        rootless=args.rootless, spec=spec))


# ---- images ----

def _store(root: str | None):
    from unionfs.store.store import Store, default_root

    return Store(root or default_root())


def import_image(argv: list[str], root: str | None) -> int:
    from unionfs.store import archives

    parser = _parser("import", "Make a one-layer image of a root filesystem tarball, as podman import.")
    parser.add_argument("tarball")
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    print(archives.import_tarball(_store(root), args.tarball, args.name))
    return 0


def images(argv: list[str], root: str | None) -> int:
    parser = _parser("images", "List the images in the store.")
    parser.add_argument("-q", "--quiet", action="store_true", help="image IDs only")
    args = parser.parse_args(argv)
    from unionfs.store.store import SHORT_ID

    rows = []
    for image in _store(root).images():
        short = image["id"][:SHORT_ID]
        if args.quiet:
            rows.append([short])
            continue
        for name in image["names"] or ["<none>:<none>"]:
            repository, _, tag = name.rpartition(":")
            rows.append([repository, tag, short, present.human_ago(image["created"]),
                         present.human_size(image["size"])])
    if args.quiet:
        print("\n".join(dict.fromkeys(row[0] for row in rows)))
    else:
        present.table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows)
    return 0


def tag(argv: list[str], root: str | None) -> int:
    parser = _parser("tag", "Give an image more names.")
    parser.add_argument("image")
    parser.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    store = _store(root)
    for name in args.names:
        store.tag(args.image, name)
    return 0


def rmi(argv: list[str], root: str | None) -> int:
    parser = _parser("rmi", "Remove images (a name, or the image when it has no other).")
    parser.add_argument("-f", "--force", action="store_true", help="also remove the containers that use them")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    store = _store(root)
    for reference in args.images:
        image_id, names = store.remove_image(reference)
        for name in names:
            print(f"Untagged: {name}")
        if not store.db.row("SELECT 1 FROM images WHERE id = ?", image_id):
            print(f"Deleted: {image_id}")
    return 0


def image(argv: list[str], root: str | None) -> int:
    parser = _parser("image", "Image commands: inspect.", "pyunionfs image inspect IMAGE...")
    parser.add_argument("action", choices=["inspect"])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    store = _store(root)
    described = []
    for reference in args.images:
        found = store.image(store.resolve_image(reference))
        config = found["config"]
        described.append({"Id": found["id"], "RepoTags": found["names"], "Created": found["created"],
                          "Size": found["size"], "Architecture": config.get("architecture"), "Os": config.get("os"),
                          "Config": config.get("config", {}), "RootFS": config.get("rootfs"),
                          "History": config.get("history", [])})
    print(json.dumps(described, indent=4))
    return 0


# ---- the command table ----

@dataclass(frozen=True)
class Command:
    summary: str
    handler: Callable[[list[str], str | None], int]
    exit_on_error: int = 1


COMMANDS = {
    "run": Command("run a command in a container on layers given by hand", run, EXIT_LAUNCHER_ERROR),
    "import": Command("make an image of a root filesystem tarball", import_image),
    "images": Command("list images", images),
    "tag": Command("give an image another name", tag),
    "rmi": Command("remove images", rmi),
    "image": Command("image inspect: describe images", image),
    "mount": Command("mount a union of directories", mount),
    "umount": Command("unmount a union", umount),
}
ROOT_OPTION = "--root"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pyunionfs [--root DIR] COMMAND [ARGS...]",
             "       pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W][,...]",
             "", "A union filesystem with kernel overlayfs semantics, and containers on it.", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"  {ROOT_OPTION} DIR: the image and container store (default: $PYUNIONFS_ROOT, "
              "/var/lib/pyunionfs as root, $XDG_DATA_HOME/pyunionfs rootless)",
              "  Each command has --help; --version prints the version."]
    return "\n".join(lines)


def _print_version() -> int:
    """As fuse-overlayfs --version does (podman info asks the mount program for it)."""
    fuse = ctypes.util.find_library("fuse3")
    library = ctypes.CDLL(fuse).fuse_pkgversion if fuse else None
    if library is not None:
        library.restype = ctypes.c_char_p
    print(f"pyunionfs: version {__version__}")
    print(f"FUSE library version {library().decode() if library is not None else 'unknown'}")
    return 0


def dispatch(argv: list[str], root: str | None) -> int:
    if argv[:1] in (["--version"], ["-V"]):
        return _print_version()
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(_help())
        return 0 if argv else 1
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]].handler(argv[1:], root)
    return mount_helper(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    root = None
    if argv[:1] == [ROOT_OPTION] and len(argv) > 1:
        root, argv = argv[1], argv[2:]
    try:
        if argv[:1] == [ROOT_OPTION]:
            raise ConfigError(f"{ROOT_OPTION} takes a directory")
        return dispatch(argv, root)
    except ConfigError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return COMMANDS[argv[0]].exit_on_error if argv and argv[0] in COMMANDS else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
