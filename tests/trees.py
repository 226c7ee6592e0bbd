"""Building layer trees for tests, and snapshots of trees to compare."""
from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import subprocess
from pathlib import Path

WHITEOUT_DEV = os.makedev(0, 0)


# ---- writing layer objects in the forms real layers carry ----

def make_whiteout(path: Path) -> None:
    """The kernel's whiteout: a character device 0:0."""
    os.mknod(path, stat.S_IFCHR | 0o000, WHITEOUT_DEV)


def make_opaque(path: Path, namespace: str = "trusted") -> None:
    os.setxattr(path, f"{namespace}.overlay.opaque", b"y")


def make_xwhiteout(parent: Path, name: str) -> None:
    """The kernel's xwhiteout: an empty file with overlay.whiteout, in a dir marked opaque=x."""
    os.setxattr(parent, "trusted.overlay.opaque", b"x")
    (parent / name).touch()
    os.setxattr(parent / name, "trusted.overlay.whiteout", b"")


ACL_ACCESS = "system.posix_acl_access"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF
NOBODY = 65534


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """An ACL in the xattr format (version 2, then tag, permission bits, id per entry)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def grant_to_nobody() -> bytes:
    """An access ACL for a mode 0600 file that lets user nobody read it (mode then shows 0640)."""
    return posix_acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, NOBODY), (ACL_GROUP_OBJ, 0, NO_ID),
                     (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID))


def as_user(uid: int, gid: int, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command],
                          capture_output=True, text=True)


def reads_as_nobody(path: Path) -> bool:
    return as_user(NOBODY, NOBODY, "cat", str(path)).returncode == 0


# ---- snapshots ----

def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _xattrs(path: Path, prefixes: tuple[str, ...]) -> tuple:
    names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(prefixes))
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def describe(path: Path, xattr_prefixes: tuple[str, ...] = ("user.",), times: bool = True) -> tuple:
    """What a user sees of one object: type, mode, owner, size, times, content, target, xattrs."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(kind):
        body: object = _hash_file(path)
    elif stat.S_ISLNK(kind):
        body = os.readlink(path)
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        body = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        body = None
    nlink = None if stat.S_ISDIR(kind) or (stat.S_ISCHR(kind) and st.st_rdev == WHITEOUT_DEV) else st.st_nlink
    size = None if stat.S_ISDIR(kind) and not times else st.st_size
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_mtime_ns if times else None,
            nlink, body, _xattrs(path, xattr_prefixes))


def snapshot(root: Path, xattr_prefixes: tuple[str, ...] = ("user.",),
             ghosts: list[str] | None = None, times: bool = True) -> dict[str, tuple]:
    """Every object below ROOT (not following symlinks), by relative path. With GHOSTS, names that
    readdir lists but lookup does not find are collected there instead of failing."""
    result: dict[str, tuple] = {}
    pending = [Path(root)]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                path = Path(entry.path)
                rel = os.path.relpath(path, root)
                if ghosts is not None and not os.path.lexists(path):
                    ghosts.append(rel)
                    continue
                result[rel] = describe(path, xattr_prefixes, times)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
    return result


def checksum(root: Path) -> str:
    """A digest of everything in a tree, every xattr namespace included (for "never modified")."""
    digest = hashlib.sha256()
    for rel, info in sorted(snapshot(root, xattr_prefixes=("",)).items()):
        st = os.lstat(Path(root) / rel)
        digest.update(repr((rel, info, st.st_ino, st.st_ctime_ns)).encode())
    return digest.hexdigest()


def differences(left: dict[str, tuple], right: dict[str, tuple], limit: int = 10) -> list[str]:
    out = []
    for rel in sorted(set(left) | set(right)):
        if left.get(rel) != right.get(rel):
            out.append(f"{rel}: {left.get(rel)!r} != {right.get(rel)!r}")
            if len(out) == limit:
                break
    return out


# ---- a generated multi-layer image ----

class LayerBuilder:
    """Random but reproducible layers (index 0 is the top) that overlap name by name and use every
    form kernel overlayfs honours: char 0:0 whiteouts, opaque dirs, xwhiteouts, type changes
    between layers, symlinks (also leading out of the layer), hard links, fifos, device nodes,
    user xattrs, odd modes and owners, 255-byte names and a path near PATH_MAX."""

    OWNERS = (0, 0, 0, 1000, 65534)
    FILE_MODES = (0o644, 0o644, 0o600, 0o755, 0o4755, 0o444)

    def __init__(self, layers: list[Path], seed: int):
        self.layers = layers
        self.rng = random.Random(seed)
        self.bottom = len(layers) - 1

    def build(self, dirs: int, names_per_dir: int, long_chain: bool = True) -> None:
        rng = self.rng
        tree = [""]
        while len(tree) < dirs:
            parent = rng.choice(tree)
            if parent.count("/") < 6:
                tree.append(f"{parent}/d{len(tree)}".lstrip("/"))
        names = [f"f{k}" for k in range(names_per_dir)]
        for index in range(self.bottom, -1, -1):
            layer = self.layers[index]
            layer_dirs = self._layer_dirs(tree, bottom=index == self.bottom)
            for rel in layer_dirs:
                (layer / rel).mkdir(parents=True, exist_ok=True)
            for rel in layer_dirs:
                self._fill_dir(index, layer / rel, rng.sample(names, rng.randint(0, len(names))))
            if index < self.bottom:
                self._hide_below(index, layer_dirs, tree)
        if long_chain:
            self._long_chain()

    def _layer_dirs(self, tree: list[str], bottom: bool) -> list[str]:
        """Dirs of one layer, ancestor-closed: the bottom has most, upper layers a subset."""
        keep = 0.9 if bottom else 0.5
        chosen = {rel for rel in tree if self.rng.random() < keep}
        closed = {""}
        for rel in chosen:
            parts = rel.split("/")
            closed.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return sorted(closed, key=len)

    def _fill_dir(self, index: int, directory: Path, names: list[str]) -> None:
        rng = self.rng
        last_file: Path | None = None
        for name in names:
            path = directory / name
            kind = rng.choices(["file", "empty", "symlink", "hardlink", "fifo", "chardev", "blockdev"],
                               weights=[60, 6, 14, 6, 3, 3, 1])[0]
            if kind == "hardlink" and last_file is not None:
                os.link(last_file, path)
                continue
            if kind in ("file", "empty", "hardlink"):
                path.write_bytes(rng.randbytes(rng.randint(1, 3000)) if kind != "empty" else b"")
                os.chmod(path, rng.choice(self.FILE_MODES))
                if rng.random() < 0.1:
                    os.setxattr(path, "user.test", f"{index}:{name}".encode())
                last_file = path
            elif kind == "symlink":
                target = rng.choice(["/etc/passwd", "../outside", f"f{rng.randint(0, 9)}", "/", "d1/x"])
                path.symlink_to(target)
            elif kind == "fifo":
                os.mkfifo(path, 0o640)
            else:
                device_type = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
                os.mknod(path, device_type | 0o660, os.makedev(1, 3) if kind == "chardev" else os.makedev(7, 0))
            os.lchown(path, rng.choice(self.OWNERS), rng.choice(self.OWNERS))
            os.utime(path, ns=(rng.randint(0, 2**40), rng.randint(0, 2**40)), follow_symlinks=False)

    def _lower_names(self, index: int, rel: str) -> set[str]:
        names: set[str] = set()
        for lower in self.layers[index + 1:]:
            if (lower / rel).is_dir() and not (lower / rel).is_symlink():
                names.update(os.listdir(lower / rel))
        return names

    def _hide_below(self, index: int, layer_dirs: list[str], tree: list[str]) -> None:
        """Whiteouts, opaque dirs, xwhiteouts and type changes over the layers below INDEX."""
        rng = self.rng
        layer = self.layers[index]
        for rel in layer_dirs:
            here = set(os.listdir(layer / rel))
            below = sorted(self._lower_names(index, rel) - here)
            if not below:
                continue
            roll = rng.random()
            if roll < 0.08 and rel:
                make_opaque(layer / rel)
            elif roll < 0.16 and rel:
                for name in rng.sample(below, min(2, len(below))):
                    make_xwhiteout(layer / rel, name)
                (layer / rel / "empty-not-a-whiteout").touch()
            for name in rng.sample(below, min(len(below), rng.randint(0, 3))):
                target = layer / rel / name
                if (layer / rel / name).exists() or target.is_symlink():
                    continue
                choice = rng.random()
                if choice < 0.6:
                    make_whiteout(target)
                elif choice < 0.8:  # a file over whatever is below (often a directory)
                    target.write_text(f"replaced in layer {index}\n")
                else:  # a directory over whatever is below (often a file)
                    target.mkdir()
                    (target / "inside").write_text("new dir\n")

    def _long_chain(self) -> None:
        """255-byte names down to about 3,800 bytes of path, shared by the top and bottom layers."""
        parts = [("n%d" % i).ljust(255, "x") for i in range(14)]
        bottom = self.layers[self.bottom].joinpath(*parts)
        top = self.layers[0].joinpath(*parts[:8])
        bottom.mkdir(parents=True)
        top.mkdir(parents=True)
        (bottom / "deep-file").write_text("at the bottom of a long path\n")
        (top / ("t" * 255)).write_text("a 255-byte name in the top layer\n")
