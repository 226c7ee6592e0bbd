"""The systems compared: each is a mount command and an unmount command (templates), so any FUSE
union can be added with a TOML file:

    [systems.my-union]
    mount = "my-union -o lowerdir={lowerdir},upperdir={upper},workdir={work} {mnt}"
    umount = "fusermount3 -u {mnt}"
    # run = "..."  how to start `true` in a container on {image}; default: mount, bwrap, umount
    # podman = "..."  podman's storage arguments for the podman-run workload, e.g.
    #   "--storage-driver overlay --storage-opt overlay.mount_program=my-union"
    # engine = "..."  a container engine of its own taking podman's load and run, {store} its
    #   storage directory, for image-load and run-true; default: podman on the podman storage

Template fields: {lowerdir} (top:base), {branches} (unionfs-fuse's form), {upper}, {work}, {mnt},
{image} (run only), {store} (engine only), {pyunionfs} (this checkout's command)."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

PYUNIONFS = str(Path(sys.executable).with_name("pyunionfs"))
BWRAP_TRUE = ("bwrap --bind {mnt} / --proc /proc --dev /dev --unshare-pid --unshare-uts --unshare-ipc "
              "--die-with-parent /bin/true")


class BenchError(Exception):
    """A problem with the benchmark's input, reported on one line."""


@dataclass(frozen=True)
class System:
    name: str
    mount: str | None  # None: the plain directory (native)
    umount: str | None
    run: str | None = None  # a container start that mounts by itself
    podman: str | None = None  # podman's storage arguments (podman-run); None: not podman's storage
    # A container engine of its own, with podman's load and run: its command, {store} its
    # storage directory (image-load, run-true); None: podman on the system's storage does those.
    engine: str | None = None

    @property
    def is_union(self) -> bool:
        return self.mount is not None

    def program(self) -> str | None:
        """The command this system needs (None for native)."""
        if not self.mount:
            return None
        first = shlex.split(self.mount)[0]
        return PYUNIONFS if first == "{pyunionfs}" else first


MOUNT_PROGRAM = "--storage-driver overlay --storage-opt overlay.mount_program="
BUILTIN = {
    "native": System("native", None, None, podman="--storage-driver vfs"),
    "overlay": System("overlay", "mount -t overlay overlay -o lowerdir={lowerdir},upperdir={upper},workdir={work} {mnt}",
                      "umount {mnt}", podman="--storage-driver overlay"),
    "fuse-overlayfs": System("fuse-overlayfs", "fuse-overlayfs -o lowerdir={lowerdir},upperdir={upper},workdir={work} {mnt}",
                             "fusermount3 -u {mnt}", podman=MOUNT_PROGRAM + "fuse-overlayfs"),
    "pyunionfs": System("pyunionfs", "{pyunionfs} {mnt} -o lowerdir={lowerdir},upperdir={upper},workdir={work}",
                        "fusermount3 -u {mnt}", run="{pyunionfs} run --lower {image} --upper {upper} --workdir {work} -- /bin/true",
                        podman=MOUNT_PROGRAM + "{pyunionfs}", engine="{pyunionfs} --root {store}"),
    # fuse-overlayfs does not sync copies; pyunionfs does (as the kernel), unless told not to.
    "pyunionfs-fsync0": System("pyunionfs-fsync0",
                               "{pyunionfs} {mnt} -o lowerdir={lowerdir},upperdir={upper},workdir={work},fsync=0",
                               "fusermount3 -u {mnt}"),
    "unionfs-fuse": System("unionfs-fuse", "unionfs -o cow {branches} {mnt}", "fusermount3 -u {mnt}"),
}
DEFAULT = ["native", "overlay", "fuse-overlayfs", "pyunionfs"]


def fill(template: str, **fields: str | Path | list[Path]) -> list[str]:
    """The argv of TEMPLATE with its fields filled in (lists of lowers joined as each form wants)."""
    lowers = [str(path) for path in fields.pop("lowers", [])]
    values = {"lowerdir": ":".join(lowers), "branches": ":".join(f"{path}=RO" for path in lowers),
              "pyunionfs": PYUNIONFS, **{key: str(value) for key, value in fields.items()}}
    if "upper" in fields:
        values["branches"] = f"{fields['upper']}=RW:{values['branches']}"
    return [word.format(**values) for word in shlex.split(template)]


def load(names: list[str], systems_file: str | None) -> list[System]:
    """The systems NAMES, from the built-in ones and SYSTEMS_FILE; each must be installed."""
    known = dict(BUILTIN)
    if systems_file:
        try:
            with open(systems_file, "rb") as f:
                table = tomllib.load(f).get("systems", {})
            known.update({name: System(name, entry["mount"], entry["umount"], entry.get("run"), entry.get("podman"),
                                       entry.get("engine")) for name, entry in table.items()})
        except (OSError, tomllib.TOMLDecodeError, KeyError, AttributeError) as exc:
            raise BenchError(f"cannot read the systems file {systems_file}: {exc}") from None
    chosen = []
    for name in names:
        if name not in known:
            raise BenchError(f"unknown system {name!r} (known: {', '.join(known)})")
        program = known[name].program()
        if program and not (shutil.which(program) or os.access(program, os.X_OK)):
            raise BenchError(f"system {name} needs {program}, which is not installed")
        chosen.append(known[name])
    return chosen
