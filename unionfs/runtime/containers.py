"""Containers of stored images: an image's layers plus one upper of the container's own, from
`create` to `rm`. Daemonless, as podman: a running container is its launcher process (recorded
with its start time, so a reused pid is never taken for it), and a launcher that died, even by
SIGKILL, leaves a container that shows as exited."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from unionfs.errors import EXIT_LAUNCHER_ERROR, ConfigError
from unionfs.runtime import launcher, runopts
from unionfs.runtime.container import GENERATED_ETC, RUNTIME_MOUNTS
from unionfs.store import archives, changes
from unionfs.store.store import Store, now

if TYPE_CHECKING:
    from unionfs.store.upperdiff import Change, ContainerView

LOG = "ctr.log"  # a detached container's stdout and stderr, in its directory
KILLED = 128 + signal.SIGKILL  # the exit code of a container whose launcher was killed
DEFAULT_STOP_TIMEOUT = 10


def process_start(pid: int) -> int | None:
    """When PID started (clock ticks after boot), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def final_command(image_config: dict, entrypoint: list[str] | None, arguments: list[str]) -> list[str]:
    """The command a container runs: its entrypoint (the image's unless given) followed by its
    arguments (the image's Cmd unless given), as podman composes them."""
    entry = entrypoint if entrypoint is not None else image_config.get("Entrypoint") or []
    command = list(entry) + (arguments or (image_config.get("Cmd") or [] if entrypoint is None else []))
    if not command:
        raise ConfigError("no command given, and the image has none")
    return command


def create(store: Store, image_reference: str, name: str | None, options: argparse.Namespace,
           entrypoint: list[str] | None, arguments: list[str]) -> str:
    """Record a container of the image with its options (checked now), in state created; its ID."""
    image_id = store.resolve_image(image_reference)
    image_config = store.image(image_id)["config"].get("config") or {}
    command = final_command(image_config, entrypoint, arguments)
    runopts.container_spec(options, command, image_config)  # one-line errors before anything is made
    config = {"command": command, "entrypoint": entrypoint, "arguments": arguments, "options": vars(options),
              "stop_signal": image_config.get("StopSignal")}
    return store.add_container(name, image_id, config)


def state(store: Store, container_id: str) -> dict:
    """The container's record, with a launcher that is gone (killed, crashed) taken for what it
    is: the container exited."""
    container = store.container(container_id)
    if container["state"] == "running" and process_start(container["pid"]) != container["pid_start"]:
        store.set_exited(container_id, KILLED)
        container = store.container(container_id)
    return container


def _run_config(store: Store, container: dict) -> launcher.RunConfig:
    config = container["config"]
    image_config = store.image(container["image"])["config"].get("config") or {}
    options = argparse.Namespace(**config["options"])
    options.hostname = options.hostname or container["id"][:12]
    spec = runopts.container_spec(options, config["command"], image_config)
    upper, work = store.container_layer_dirs(container["id"])
    return launcher.RunConfig(lowers=store.layer_paths(container["image"]), command=config["command"],
                              upper=upper, workdir=work, rootless=options.rootless, spec=spec,
                              scratch_parent=store.container_dir(container["id"]))


def _launch(store: Store, container_id: str, run_config: launcher.RunConfig,
            running: Callable[[], None] = lambda: None) -> int:
    """Run the container in this process, recorded as running while it does (RUNNING is told
    once it is); its exit code."""
    store.set_running(container_id, os.getpid(), process_start(os.getpid()))
    running()
    code = EXIT_LAUNCHER_ERROR
    try:
        code = launcher.run(run_config)
    except ConfigError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
    finally:
        store.set_exited(container_id, code)
    return code


def start(store: Store, container_id: str, attach: bool, remove: bool = False) -> int:
    """Start a created or exited container: attached, its exit code once it ends; detached, 0 once
    its launcher runs in the background (its output goes to the container's log)."""
    container = state(store, container_id)
    if container["state"] == "running":
        raise ConfigError(f"container {container['name']} is already running")
    run_config = _run_config(store, container)
    for name in os.listdir(run_config.scratch_parent):  # what a launcher killed by SIGKILL left
        if name.startswith(launcher.SCRATCH_PREFIX):
            shutil.rmtree(os.path.join(run_config.scratch_parent, name), ignore_errors=True)
    if attach:
        code = _launch(store, container_id, run_config)
        if remove:
            store.remove_container(container_id)
        return code
    log = os.open(log_path(store, container_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    started_r, started_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    store.close()
    pid = os.fork()
    if pid == 0:  # the launcher, in the background for as long as the container runs
        code = EXIT_LAUNCHER_ERROR
        try:
            os.close(started_r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            store.open()
            code = _launch(store, container_id, run_config, running=lambda: os.close(started_w))
            if remove:
                store.remove_container(container_id)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    store.open()
    os.close(started_w)
    os.close(log)
    with os.fdopen(started_r, "rb") as started:
        started.read()  # end of file: the launcher recorded itself as running, or died
    if state(store, container_id)["state"] not in ("running", "exited"):
        raise ConfigError(f"container {container['name']} did not start")
    return 0


def signal_number(text: str) -> int:
    """A signal by number or name (KILL, SIGKILL), as podman kill -s takes it."""
    if text.isdigit():
        return int(text)
    name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"no such signal: {text}") from None


def kill(store: Store, container_id: str, signum: int) -> None:
    """Send SIGNUM to the container's command, through its launcher, which forwards it. SIGKILL
    cannot be forwarded: it goes to the container's init (all the container dies with it), and
    the launcher, left alive, cleans up and records the exit, as podman's conmon does."""
    container = state(store, container_id)
    if container["state"] != "running":
        raise ConfigError(f"container {container['name']} is not running")
    target = container["pid"]
    if signum == signal.SIGKILL:
        target = next(iter(_container_inits(container["pid"])), target)  # none yet: the launcher
    os.kill(target, signum)


def _container_inits(launcher_pid: int) -> list[int]:
    """The launcher's children but its filesystem server: the init of the container's PID namespace."""
    children = []
    try:
        for task in os.listdir(f"/proc/{launcher_pid}/task"):
            with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
                children += [int(pid) for pid in f.read().split()]
    except OSError:
        return []
    inits = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != launcher.SERVER_NAME:
                    inits.append(pid)
        except OSError:
            continue
    return inits


def wait(store: Store, container_id: str, timeout: float | None = None) -> bool:
    """Wait until the container is not running (at most TIMEOUT seconds): whether it stopped."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while state(store, container_id)["state"] == "running":
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop(store: Store, container_id: str, timeout: float) -> None:
    """The image's stop signal (SIGTERM unless it names another), then SIGKILL after TIMEOUT."""
    container = state(store, container_id)
    if container["state"] != "running":
        return
    kill(store, container_id, signal_number(container["config"].get("stop_signal") or "TERM"))
    if not wait(store, container_id, timeout):
        kill(store, container_id, signal.SIGKILL)
        wait(store, container_id)


def remove(store: Store, container_id: str, force: bool) -> None:
    container = state(store, container_id)
    if container["state"] == "running":
        if not force:
            raise ConfigError(f"container {container['name']} is running: stop it first, or rm -f")
        kill(store, container_id, signal.SIGKILL)
        wait(store, container_id)
    store.remove_container(container_id)


def describe(store: Store, container: dict) -> dict[str, Any]:
    """`inspect`'s view of a container, with podman's key names."""
    image = store.image(container["image"])
    upper, work = store.container_layer_dirs(container["id"])
    return {"Id": container["id"], "Name": container["name"], "Image": container["image"],
            "ImageName": (image["names"] or [container["image"]])[0], "Created": container["created"],
            "Path": container["config"]["command"][0], "Args": container["config"]["command"][1:],
            "State": {"Status": container["state"], "Running": container["state"] == "running",
                      "Pid": container["pid"] or 0, "ExitCode": container["exit_code"] or 0,
                      "StartedAt": container["started"], "FinishedAt": container["finished"]},
            "Config": {"Cmd": container["config"]["command"], "StopSignal": container["config"].get("stop_signal")},
            "GraphDriver": {"Name": "pyunionfs", "Data": {
                "LowerDir": ":".join(store.layer_paths(container["image"])),
                "UpperDir": upper, "WorkDir": work}}}


def log_path(store: Store, container_id: str) -> str:
    return os.path.join(store.container_dir(container_id), LOG)


def follow_log(store: Store, container_id: str, follow: bool) -> None:
    """Copy the container's log to stdout; with FOLLOW, until the container is not running."""
    try:
        log = open(log_path(store, container_id), "rb")
    except FileNotFoundError:
        return
    with log:
        while True:
            chunk = log.read(1 << 16)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            if not follow or state(store, container_id)["state"] != "running":
                rest = log.read()
                sys.stdout.buffer.write(rest)
                sys.stdout.flush()
                return
            time.sleep(0.1)


def _view(store: Store, container: dict) -> ContainerView:
    # Imported here: the union's code brings pyfuse3 and trio, which the launcher never imports
    # (it makes namespaces, which a process with threads cannot enter).
    from unionfs.store.upperdiff import ContainerView

    run_config = _run_config(store, container)
    spec = run_config.spec
    runtime_paths = {*RUNTIME_MOUNTS, *GENERATED_ETC, *spec.tmpfs, *(volume.target for volume in spec.volumes)}
    return ContainerView(run_config.lowers, run_config.upper, frozenset(runtime_paths))


def diff(store: Store, container_id: str) -> list[Change]:
    with _view(store, state(store, container_id)) as view:
        return view.changes()


def export(store: Store, container_id: str, out: BinaryIO) -> None:
    with _view(store, state(store, container_id)) as view:
        view.write_root(out)


def commit(store: Store, container_id: str, names: list[str], instructions: list[str], message: str | None) -> str:
    """A new image: the container's image with one more layer, what the container changed; its
    config the image's as the container ran it (its command, environment, working directory and
    user), then INSTRUCTIONS. Its ID."""
    container = state(store, container_id)
    if container["state"] == "running":
        raise ConfigError(f"container {container['name']} is running: stop it before committing it")
    image = store.image(container["image"])
    config = _committed_config(image["config"].get("config") or {}, container["config"])
    for instruction in instructions:  # checked before anything is stored
        changes.apply(config, instruction)
    with tempfile.TemporaryFile(dir=store.staging_dir) as layer_tar:
        with _view(store, container) as view:
            view.write_layer(layer_tar)
        layer_tar.seek(0)
        with store.adding():
            layer = store.add_layer(layer_tar)
            created = now()
            image_config = {**image["config"], "created": created, "config": config,
                            "rootfs": {"type": "layers", "diff_ids": image["layers"] + [layer.diff_id]},
                            "history": image["config"].get("history", []) + [
                                {"created": created, "created_by": f"pyunionfs commit {container['id'][:12]}",
                                 **({"comment": message} if message else {})}]}
            sizes = {**{diff_id: store.layer_size(diff_id) for diff_id in image["layers"]}, layer.diff_id: layer.size}
            return store.add_image(archives.config_json(image_config), sizes, names)


def _committed_config(image_config: dict, container_config: dict) -> dict:
    """The image config of a commit, as podman's: the image's, with what the container was run
    with in its place."""
    config = dict(image_config)
    options = container_config["options"]
    if container_config.get("entrypoint") is not None:
        config["Entrypoint"] = container_config["entrypoint"]
        config["Cmd"] = container_config.get("arguments") or []
    elif container_config.get("arguments"):
        config["Cmd"] = container_config["arguments"]
    if options.get("env"):
        changes.add_env(config, (item.partition("=")[::2] for item in options["env"]))
    if options.get("chdir"):
        config["WorkingDir"] = options["chdir"]
    if options.get("user") is not None:
        config["User"] = options["user"]
    return config
