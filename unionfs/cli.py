"""The pyunionfs command, a thin front over the filesystem (unionfs/fs), the container runtime
(unionfs/runtime) and the image and container store (unionfs/store): a command table, each
command's arguments, and one line for any error. Also the mount-helper form that mount.fuse3 and
containers/storage use (`pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=...`)."""
from __future__ import annotations

import argparse
import contextlib
import functools
import ctypes
import ctypes.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, NoReturn, Sequence

from unionfs import __version__, present
from unionfs.errors import EXIT_LAUNCHER_ERROR, ConfigError
from unionfs.fs import serve
from unionfs.fs.options import MountConfig, apply_option_string

if TYPE_CHECKING:
    from unionfs.store.store import Store


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


@dataclass
class MountRequest:
    config: MountConfig
    foreground: bool
    debug: bool

    def serve(self) -> int:
        return serve.serve(self.config, foreground=self.foreground, debug=self.debug)

    def rehearse(self, interrupted: Callable[[], bool]) -> None:
        """Open its union and answer requests on it without mounting until INTERRUPTED(), then
        close it (a fork server's spare process does, so that its caller does not wait for what
        that first run costs)."""
        serve.rehearse(self.config, interrupted)

    def serve_forked(self, ready_fd: int, answered_fd: int) -> int:
        """Serve it from this process, a fork server's, which reports to READY_FD, then closes
        ANSWERED_FD."""
        return serve.serve(self.config, ready_fd=ready_fd, forked=True, answered_fd=answered_fd)

    def serve_attached(self, ready_fd: int, lifeline_fd: int, answered_fd: int) -> int:
        """Serve it from this process, a fork server's, for a caller that stays (the container
        launcher): report to READY_FD, then close ANSWERED_FD; unmount when LIFELINE_FD closes."""
        return serve.serve(self.config, foreground=True, ready_fd=ready_fd, lifeline_fd=lifeline_fd,
                           answered_fd=answered_fd)


def _request(args: argparse.Namespace, config: MountConfig) -> MountRequest:
    debug = args.debug or config.debug
    return MountRequest(config, args.foreground or debug, debug)


# Both mount parsers are made once: the fork server makes them before it forks, so that each
# mount it serves only parses.
@functools.cache
def _mount_parser() -> OneLineParser:
    parser = _parser("mount", "Mount a union of directories.")
    parser.add_argument("--lower", action="append", default=[], metavar="DIR",
                        help="a read-only lower directory; repeat it, top layer first")
    parser.add_argument("--upper", metavar="DIR", help="the writable upper directory")
    parser.add_argument("--workdir", metavar="DIR", help="work directory on the upper's filesystem")
    parser.add_argument("mountpoint")
    _add_serve_flags(parser)
    return parser


def _mount_request(argv: list[str]) -> MountRequest:
    args = _mount_parser().parse_args(argv)
    return _request(args, _config_from(args, args.mountpoint))


@functools.cache
def _helper_parser() -> OneLineParser:
    """The form of mount.fuse3 and of containers/storage's mount_program."""
    parser = OneLineParser(prog="pyunionfs", usage="pyunionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,...] [-f] [-d]")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    _add_serve_flags(parser)
    return parser


def _helper_request(argv: list[str]) -> MountRequest:
    args = _helper_parser().parse_args(argv)
    if len(args.paths) > 2:
        raise ConfigError("expected [SOURCE] MOUNTPOINT")
    return _request(args, _config_from(args, args.paths[-1], *args.paths[:-1]))


def mount(argv: list[str], root: str | None) -> int:
    return _mount_request(argv).serve()


def mount_helper(argv: list[str]) -> int:
    return _helper_request(argv).serve()


def fork_server(argv: list[str], root: str | None) -> int:
    from unionfs.forkserver import client, server

    parser = _parser("fork-server", "Serve mounts from a resident process that forks a ready FUSE server "
                     "per mount (started on first use; also runs as a service).")
    parser.add_argument("--idle", type=float, default=client.IDLE_SECONDS, metavar="SECONDS",
                        help=f"exit after this long without a request (0: never; default {client.IDLE_SECONDS})")
    parser.add_argument("--stop", action="store_true", help="stop this user's fork server and exit")
    args = parser.parse_args(argv)
    if args.stop:
        return server.stop()
    _mount_parser()
    _helper_parser()
    _run_parser()
    return server.run(args.idle, {client.MOUNT: mount_request, client.RUN: run_request})


def umount(argv: list[str], root: str | None) -> int:
    parser = _parser("umount", "Unmount a union.")
    parser.add_argument("mountpoint")
    serve.unmount(parser.parse_args(argv).mountpoint)
    return 0


# ---- containers ----

def _container_parser(command: str, description: str, usage: str) -> OneLineParser:
    from unionfs.runtime import runopts

    parser = _parser(command, description, usage)
    parser.add_argument("--name", help="the container's name (default: a made-up one)")
    parser.add_argument("--entrypoint", help="instead of the image's: a command, or a JSON list")
    runopts.add_run_options(parser)
    return parser


def _entrypoint(text: str | None) -> list[str] | None:
    """--entrypoint: a JSON list of strings, or one command."""
    from unionfs.store import changes

    if text is None:
        return None
    exec_form = changes.string_list(text)
    return exec_form if exec_form is not None else [text]


def _command_words(words: list[str]) -> list[str]:
    """A command as given after the options, less a `--` before it."""
    return words[1:] if words[:1] == ["--"] else words


def _image_and_command(rest: list[str]) -> tuple[str, list[str]]:
    if not rest:
        raise ConfigError("no image given")
    return rest[0], _command_words(rest[1:])


# Made once: the fork server makes it before it forks (see _mount_parser).
@functools.cache
def _run_parser() -> OneLineParser:
    parser = _container_parser(
        "run", "Run a command in a new container of an image, or on layers given by hand.",
        "pyunionfs run [options] IMAGE [CMD...]\n"
        "       pyunionfs run --lower DIR [--lower DIR ...] [--upper U --workdir W] [options] -- CMD...")
    parser.add_argument("-d", "--detach", action="store_true", help="run in the background; print its ID")
    parser.add_argument("--rm", action="store_true", help="remove the container when it exits")
    parser.add_argument("--lower", action="append", metavar="DIR", help="a layer given by hand, top first")
    parser.add_argument("--upper", metavar="DIR", help="with --lower: the writable layer (default: a temporary one)")
    parser.add_argument("--workdir", metavar="DIR", help="with --lower: the overlay work directory for --upper")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="IMAGE [CMD...]")
    return parser


def run(argv: list[str], root: str | None) -> int:
    return _run(_run_parser().parse_args(argv), root)


def _run(args: argparse.Namespace, root: str | None) -> int:
    # The launcher never imports pyfuse3 or trio: it makes namespaces, which a process with
    # threads cannot enter, and runs the filesystem server as a process of its own.
    from unionfs.runtime import containers, launcher, runopts

    if args.lower:
        command = _command_words(args.rest)
        if not command:
            raise ConfigError("no command given (pyunionfs run --lower DIR ... -- CMD)")
        spec = runopts.container_spec(args, command)
        return launcher.run(launcher.RunConfig(
            lowers=[os.path.abspath(d) for d in args.lower], command=command,
            upper=args.upper and os.path.abspath(args.upper),
            workdir=args.workdir and os.path.abspath(args.workdir), rootless=args.rootless, spec=spec))
    image, command = _image_and_command(args.rest)
    store = _store(root)
    container_id = containers.create(store, image, args.name, _run_options(args), _entrypoint(args.entrypoint),
                                     command)
    if args.detach:
        containers.start(store, container_id, attach=False, remove=args.rm)
        print(container_id)
        return 0
    return containers.start(store, container_id, attach=True, remove=args.rm)


def _run_options(args: argparse.Namespace) -> argparse.Namespace:
    """The options a container keeps for its starts: those of add_run_options()."""
    from unionfs.runtime import runopts

    reference = argparse.ArgumentParser(add_help=False)
    runopts.add_run_options(reference)
    return argparse.Namespace(**{action.dest: getattr(args, action.dest) for action in reference._actions})


def create(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _container_parser("create", "Create a container of an image (state Created); print its ID.",
                               "pyunionfs create [options] IMAGE [CMD...]")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="IMAGE [CMD...]")
    args = parser.parse_args(argv)
    image, command = _image_and_command(args.rest)
    print(containers.create(_store(root), image, args.name, _run_options(args), _entrypoint(args.entrypoint),
                            command))
    return 0


def start(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("start", "Start containers (in the background unless -a).")
    parser.add_argument("-a", "--attach", action="store_true", help="in the foreground; exit with its exit code")
    parser.add_argument("containers", nargs="+", metavar="CONTAINER")
    args = parser.parse_args(argv)
    if args.attach:
        if len(args.containers) > 1:
            raise ConfigError("start -a takes one container")
        store = _store(root)
        return containers.start(store, store.resolve_container(args.containers[0]), attach=True)
    return _for_each(root, args.containers,
                     lambda store, container_id: containers.start(store, container_id, attach=False))


def ps(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers
    from unionfs.store.store import SHORT_ID

    parser = _parser("ps", "List running containers (all of them with -a).")
    parser.add_argument("-a", "--all", action="store_true", help="also created and exited ones")
    parser.add_argument("-q", "--quiet", action="store_true", help="container IDs only")
    args = parser.parse_args(argv)
    store = _store(root)
    rows = []
    for container in store.containers():
        container = containers.state(store, container["id"])
        if not args.all and container["state"] != "running":
            continue
        if args.quiet:
            rows.append([container["id"][:SHORT_ID]])
            continue
        image = store.image(container["image"])
        command = " ".join(container["config"]["command"])
        rows.append([container["id"][:SHORT_ID], (image["names"] or [image["id"][:SHORT_ID]])[0],
                     command if len(command) <= 20 else command[:17] + "...",
                     present.human_ago(container["created"]), _status(container), container["name"]])
    if args.quiet:
        print("\n".join(row[0] for row in rows))
    else:
        present.table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"], rows)
    return 0


def _status(container: dict) -> str:
    """podman's STATUS: Created, Up 5 seconds, Exited (0) 3 minutes ago."""
    if container["state"] == "running":
        return f"Up {present.human_duration(container['started'])}"
    if container["state"] == "exited":
        return f"Exited ({container['exit_code']}) {present.human_ago(container['finished'])}"
    return "Created"


def _for_each(root: str | None, references: list[str], action: Callable[[Store, str], object],
              print_id: bool = False) -> int:
    """ACTION on each container named, printing its name as given (or its ID), as podman does."""
    store = _store(root)
    for reference in references:
        container_id = store.resolve_container(reference)
        action(store, container_id)
        print(container_id if print_id else reference)
    return 0


def stop(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("stop", "Stop containers: their stop signal, then SIGKILL after a timeout.")
    parser.add_argument("-t", "--time", type=int, default=containers.DEFAULT_STOP_TIMEOUT, metavar="SECONDS")
    parser.add_argument("containers", nargs="+", metavar="CONTAINER")
    args = parser.parse_args(argv)
    return _for_each(root, args.containers,
                     lambda store, container_id: containers.stop(store, container_id, args.time))


def kill(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("kill", "Send a signal to containers' commands.")
    parser.add_argument("-s", "--signal", default="KILL", metavar="SIGNAL")
    parser.add_argument("containers", nargs="+", metavar="CONTAINER")
    args = parser.parse_args(argv)
    signum = containers.signal_number(args.signal)
    return _for_each(root, args.containers,
                     lambda store, container_id: containers.kill(store, container_id, signum))


def rm(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("rm", "Remove containers, with what they wrote.")
    parser.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    parser.add_argument("containers", nargs="+", metavar="CONTAINER")
    args = parser.parse_args(argv)
    return _for_each(root, args.containers,
                     lambda store, container_id: containers.remove(store, container_id, args.force), print_id=True)


def logs(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("logs", "Print what a detached container wrote to stdout and stderr.")
    parser.add_argument("-f", "--follow", action="store_true", help="and go on while it runs")
    parser.add_argument("container")
    args = parser.parse_args(argv)
    store = _store(root)
    containers.follow_log(store, store.resolve_container(args.container), args.follow)
    return 0


def inspect(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("inspect", "Describe containers.")
    parser.add_argument("containers", nargs="+", metavar="CONTAINER")
    args = parser.parse_args(argv)
    store = _store(root)
    described = [containers.describe(store, containers.state(store, store.resolve_container(reference)))
                 for reference in args.containers]
    print(json.dumps(described, indent=4))
    return 0


def _add_change_option(parser: argparse.ArgumentParser, whose: str) -> None:
    from unionfs.store import changes

    parser.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                        help=f"a Dockerfile instruction for {whose} config: {', '.join(changes.INSTRUCTIONS)}")


def diff(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("diff", "List what a container added (A), changed (C) and deleted (D).")
    parser.add_argument("container")
    args = parser.parse_args(argv)
    store = _store(root)
    for change in containers.diff(store, store.resolve_container(args.container)):
        print(f"{change.kind} {change.path}")
    return 0


def commit(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("commit", "Make an image of a container: its image and one more layer, what it changed.")
    _add_change_option(parser, "the new image's")
    parser.add_argument("-m", "--message", help="a comment for the new layer's history entry")
    parser.add_argument("container")
    parser.add_argument("image", nargs="?", help="a name for the new image")
    args = parser.parse_args(argv)
    store = _store(root)
    print(containers.commit(store, store.resolve_container(args.container), [args.image] if args.image else [],
                            args.change, args.message))
    return 0


@contextlib.contextmanager
def _archive_output(path: str | None) -> Iterator[BinaryIO]:
    """PATH, written whole or not at all (a temporary file beside it, renamed into place); with
    no PATH, standard output, unless that is a terminal."""
    if path is None:
        if sys.stdout.isatty():
            raise ConfigError("refusing to write an archive to a terminal: use -o FILE or redirect")
        yield sys.stdout.buffer
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".pyunionfs-")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def export(argv: list[str], root: str | None) -> int:
    from unionfs.runtime import containers

    parser = _parser("export", "Write a container's root filesystem as a tar archive.")
    parser.add_argument("-o", "--output", metavar="FILE", help="(default: standard output, not a terminal)")
    parser.add_argument("container")
    args = parser.parse_args(argv)
    store = _store(root)
    container_id = store.resolve_container(args.container)
    with _archive_output(args.output) as out:
        containers.export(store, container_id, out)
    return 0


# ---- images ----

def _store(root: str | None) -> Store:
    from unionfs.store.store import Store, default_root

    path = root or default_root()
    if os.geteuid() != 0:
        # Rootless, the store is used from the user's namespace, as podman's is: its layers
        # keep their owners shifted into the user's subordinate ids.
        from unionfs.runtime import userns

        userns.enter_user_namespace()
    return Store(path)


def import_image(argv: list[str], root: str | None) -> int:
    from unionfs.store import archives

    parser = _parser("import", "Make a one-layer image of a root filesystem tarball, as podman import.")
    _add_change_option(parser, "the image's")
    parser.add_argument("tarball")
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    print(archives.import_tarball(_store(root), args.tarball, args.name, args.change))
    return 0


def load(argv: list[str], root: str | None) -> int:
    from unionfs.store import archives

    parser = _parser("load", "Load images from a docker-archive or oci-archive file or an OCI image layout.")
    parser.add_argument("-i", "--input", required=True, metavar="FILE|DIR",
                        help="`podman save`/`docker save` output (either format, compressed or not), or an "
                             "OCI image layout directory")
    args = parser.parse_args(argv)
    with present.Progress() as progress:
        loaded = archives.load(_store(root), args.input, progress)
    for image_id, names in loaded:
        for name in names or [f"sha256:{image_id}"]:
            print(f"Loaded image: {name}")
        print(image_id)
    return 0


def save(argv: list[str], root: str | None) -> int:
    from unionfs.store import archives

    parser = _parser("save", "Write images as a docker-archive or oci-archive, for podman load or docker load.")
    parser.add_argument("-o", "--output", metavar="FILE", help="(default: standard output, not a terminal)")
    parser.add_argument("--format", choices=archives.FORMATS, default="docker-archive")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    store = _store(root)
    with _archive_output(args.output) as out:
        archives.save(store, args.images, args.format, out)
    return 0


def images(argv: list[str], root: str | None) -> int:
    from unionfs.store.store import SHORT_ID

    parser = _parser("images", "List the images in the store.")
    parser.add_argument("-q", "--quiet", action="store_true", help="image IDs only")
    args = parser.parse_args(argv)
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
    from unionfs.runtime import containers
    from unionfs.store.store import ImageInUse

    parser = _parser("rmi", "Remove images (a name, or the image when it has no other).")
    parser.add_argument("-f", "--force", action="store_true", help="also remove the containers that use them")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    store = _store(root)
    for reference in args.images:
        try:
            image_id, names = store.remove_image(reference)
        except ImageInUse as in_use:
            if not args.force:
                raise
            for container_id in in_use.containers:
                containers.remove(store, container_id, force=True)
            image_id, names = store.remove_image(reference)
        for name in names:
            print(f"Untagged: {name}")
        if not store.has_image(image_id):
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
    "run": Command("run a command in a new container of an image (or on layers given by hand)", run,
                   EXIT_LAUNCHER_ERROR),
    "create": Command("create a container of an image", create, EXIT_LAUNCHER_ERROR),
    "start": Command("start containers", start, EXIT_LAUNCHER_ERROR),
    "ps": Command("list containers", ps),
    "stop": Command("stop containers", stop),
    "kill": Command("send a signal to containers", kill),
    "rm": Command("remove containers", rm),
    "logs": Command("print a container's output", logs),
    "inspect": Command("describe containers", inspect),
    "diff": Command("list what a container changed", diff),
    "commit": Command("make an image of a container", commit),
    "export": Command("write a container's root filesystem as a tar archive", export),
    "load": Command("load images from a docker-archive, an oci-archive or an OCI layout", load),
    "save": Command("write images as a docker-archive or oci-archive", save),
    "import": Command("make an image of a root filesystem tarball", import_image),
    "images": Command("list images", images),
    "tag": Command("give an image another name", tag),
    "rmi": Command("remove images", rmi),
    "image": Command("image inspect: describe images", image),
    "mount": Command("mount a union of directories", mount),
    "umount": Command("unmount a union", umount),
    "fork-server": Command("serve mounts from a resident process (started on first use)", fork_server),
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


def mount_request(argv: list[str]) -> MountRequest | None:
    """The union ARGV mounts, if it is a mount (`mount ...` or the mount-helper form), else None;
    ConfigError for bad arguments."""
    if argv[:1] == ["mount"]:
        return _mount_request(argv[1:])
    if not argv or argv[0] in COMMANDS or argv[0] in (ROOT_OPTION, "--version", "-V", "-h", "--help"):
        return None
    return _helper_request(argv)


@dataclass
class RunRequest:
    """A container run (`[--root DIR] run ...`), parsed, for a process of the fork server to run."""
    args: argparse.Namespace
    root: str | None

    @property
    def preserve_fds(self) -> int:
        return self.args.preserve_fds

    def run(self) -> int:
        return _reporting_errors("run", lambda: _run(self.args, self.root))


def run_request(argv: list[str]) -> RunRequest | None:
    """The container run ARGV is, if it is one, else None; ConfigError for bad arguments."""
    root, command = _split_root(argv)
    if command[:1] != ["run"]:
        return None
    return RunRequest(_run_parser().parse_args(command[1:]), root)


def _split_root(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--root's directory or None, the rest of ARGV)."""
    if argv[:1] == [ROOT_OPTION] and len(argv) > 1:
        return argv[1], argv[2:]
    return None, argv


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
    root, argv = _split_root(sys.argv[1:] if argv is None else list(argv))
    if argv[:1] == [ROOT_OPTION]:
        print(f"pyunionfs: {ROOT_OPTION} takes a directory", file=sys.stderr)
        return 1
    return _reporting_errors(argv[0] if argv else None, lambda: dispatch(argv, root))


def _reporting_errors(command: str | None, action: Callable[[], int]) -> int:
    """ACTION's exit code; an error as one line and COMMAND's exit code for errors."""
    try:
        return action()
    except (ConfigError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `pyunionfs export C | head`: the reader is done
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
            return 141
        if isinstance(exc, OSError):  # the machine's answer (no space left, a permission): one line
            exc = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return COMMANDS[command].exit_on_error if command in COMMANDS else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # The command (csrc/front.c) runs `python -P -m unionfs.cli ARGS`: shown as the command it is.
    present.set_title("pyunionfs", " ".join(["pyunionfs", *sys.argv[1:]]))
    sys.exit(main())
