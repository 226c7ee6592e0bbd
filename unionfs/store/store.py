"""The image and container store: layer directories named by diff_id and shared between
images, the metadata in SQLite, and the rules that keep them consistent (reference counts,
names, IDs abbreviated to a unique prefix).

Layout of ROOT: store.db; layers/HEX/ (a layer: diff/, its tree in the kernel's format, and
tar-split.zst, what it takes to write its archive again); layers/.staging/
(layers being unpacked: renamed into place when whole, so a crash leaves no half layer visible);
containers/ID/ (a container's upper, work directory and log)."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from typing import BinaryIO, Callable, Iterator

from unionfs.errors import ConfigError
from unionfs.fs import syscalls
from unionfs.fs.layers import overlay_xattr_namespace, privileged
from unionfs.store import tarsplit, unpack
from unionfs.store.db import Database

ROOT_ENV = "PYUNIONFS_ROOT"
DEFAULT_ROOT = "/var/lib/pyunionfs"
SHORT_ID = 12  # hex digits of an ID as podman prints it
LAYER_TREE, TAR_SPLIT = "diff", "tar-split.zst"  # in layers/HEX/


def default_root() -> str:
    """$PYUNIONFS_ROOT, else /var/lib/pyunionfs as root, $XDG_DATA_HOME/pyunionfs rootless."""
    if os.environ.get(ROOT_ENV):
        return os.environ[ROOT_ENV]
    if os.geteuid() == 0:
        return DEFAULT_ROOT
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "pyunionfs")


def now() -> str:
    """The time in RFC 3339, to the microsecond (two imports of one tarball are two images)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _created(config: dict) -> str:
    """When the image was made, as its config says if that is a time; else now."""
    created = config.get("created")
    try:
        datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return now()
    return created


def normalize_name(name: str) -> str:
    """REPOSITORY:TAG as podman stores a name it is given: a short name is localhost's, and a
    missing tag is latest."""
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    if not repository:
        repository, tag = name, ""
    first = repository.split("/", 1)[0]
    if "/" not in repository or not ("." in first or ":" in first or first == "localhost"):
        repository = "localhost/" + repository
    return f"{repository}:{tag or 'latest'}"


class ImageInUse(ConfigError):
    """The image is not removed: containers use it."""
    def __init__(self, message: str, containers: list[str]):
        super().__init__(message)
        self.containers = containers


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        try:
            for path in (self.root, self.layers_dir, self.staging_dir, self.containers_dir):
                os.makedirs(path, mode=0o700, exist_ok=True)
            self.open()
        except OSError as exc:
            raise ConfigError(f"cannot use the store at {self.root}: {exc.strerror}") from None
        # Unpacking writes the kernel's overlay format: trusted.* as root, user.* rootless.
        self.xattr_namespace = overlay_xattr_namespace()
        self._clean_staging()

    @property
    def layers_dir(self) -> str:
        return os.path.join(self.root, "layers")

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.layers_dir, ".staging")

    @property
    def containers_dir(self) -> str:
        return os.path.join(self.root, "containers")

    def _layer_dir(self, diff_id: str) -> str:
        """Where a layer is kept: its tree in diff/ (in the kernel's format), its tar-split beside it."""
        return os.path.join(self.layers_dir, diff_id.removeprefix("sha256:"))

    def layer_path(self, diff_id: str) -> str:
        """The layer's tree, as overlay mounts take it."""
        return os.path.join(self._layer_dir(diff_id), LAYER_TREE)

    @contextlib.contextmanager
    def layer_archive(self, diff_id: str) -> Iterator[tarsplit.Archive]:
        """The layer's archive as it was loaded or committed (the same bytes, its diff_id), to read."""
        fd = syscalls.open_root(self.layer_path(diff_id))
        try:
            yield tarsplit.Archive(os.path.join(self._layer_dir(diff_id), TAR_SPLIT), fd, diff_id)
        finally:
            os.close(fd)

    def open(self) -> None:
        self.db = Database(os.path.join(self.root, "store.db"))

    def close(self) -> None:
        """Close the metadata. Before a fork, too: SQLite keeps its POSIX locks per process, so a
        child of a process with the database open would believe it held them."""
        self.db.close()

    # ---- layers ----

    @contextlib.contextmanager
    def adding(self) -> Iterator[None]:
        """Held while layers are unpacked and an image that holds them is recorded: a layer that
        no image holds is removed only under the exclusive side of this lock, so one that is
        about to be used again never goes."""
        with _locked(self.layers_dir, blocking=True, shared=True):
            yield

    def _clean_staging(self) -> None:
        """Remove what a crashed or interrupted unpack left; one still running holds a lock."""
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            with contextlib.suppress(OSError), _locked(path, blocking=False):
                shutil.rmtree(path)

    def add_layer(self, raw: BinaryIO, expected_diff_id: str | None = None,
                  check: Callable[[], None] = lambda: None) -> unpack.Unpacked:
        """Unpack the layer in RAW (a buffered stream) and keep it, unless the store has it
        already. With EXPECTED_DIFF_ID, one whose content has another digest is refused; CHECK,
        called once RAW is read, may refuse it too (a blob digest that does not match)."""
        staging = tempfile.mkdtemp(dir=self.staging_dir)
        try:
            with _locked(staging, blocking=True):
                os.mkdir(os.path.join(staging, LAYER_TREE), 0o755)
                fd = os.open(os.path.join(staging, LAYER_TREE), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    with open(os.path.join(staging, TAR_SPLIT), "wb") as split:
                        unpacked = unpack.unpack(raw, fd, split, self.xattr_namespace, privileged=privileged())
                finally:
                    os.close(fd)
                check()
                if expected_diff_id and unpacked.diff_id != expected_diff_id:
                    raise unpack.LayerError(f"a layer's content does not match its diff_id {expected_diff_id} "
                                            f"(it is {unpacked.diff_id})")
                final = self._layer_dir(unpacked.diff_id)
                try:
                    os.rename(staging, final)
                except OSError:  # the store had it, or another command unpacked it meanwhile
                    if not os.path.isdir(final):
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return unpacked

    def layer_size(self, diff_id: str) -> int | None:
        """The size of the stored layer's archive; None when the store does not hold the layer."""
        row = self.db.row("SELECT size FROM layers WHERE diff_id = ?", diff_id)
        return row["size"] if row and os.path.isdir(self.layer_path(diff_id)) else None

    # ---- images ----

    def add_image(self, config: bytes, sizes: dict[str, int], names: list[str]) -> str:
        """Record the image CONFIG (an OCI image config, as stored bytes), whose layers are in the
        store already (SIZES: the size of each by diff_id), with NAMES; its ID."""
        image_id = hashlib.sha256(config).hexdigest()
        parsed = json.loads(config)
        diff_ids = parsed["rootfs"]["diff_ids"]
        with self.db.change() as db:
            if db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                db.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?)",
                           (image_id, config, json.dumps(diff_ids), _created(parsed),
                            sum(sizes[d] for d in diff_ids)))
                for diff_id in diff_ids:
                    db.execute("INSERT INTO layers VALUES (?, ?, 1) ON CONFLICT(diff_id) DO UPDATE SET refs = refs + 1",
                               (diff_id, sizes[diff_id]))
            for name in names:
                db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (normalize_name(name), image_id))
        return image_id

    def resolve_image(self, reference: str) -> str:
        """The ID of the image REFERENCE names: a name (short, or without a tag, as podman takes
        them), an ID, or a unique prefix of one."""
        names = {row["name"]: row["image"] for row in self.db.rows("SELECT name, image FROM names")}
        full = normalize_name(reference)
        for candidate in (reference, full):
            if candidate in names:
                return names[candidate]
        tagged = reference if ":" in reference.rsplit("/", 1)[-1] else reference + ":latest"
        by_suffix = {image for name, image in names.items() if name.endswith("/" + tagged)}
        if len(by_suffix) == 1:
            return by_suffix.pop()
        ids = [row["id"] for row in self.db.rows("SELECT id FROM images WHERE id LIKE ?",
                                                 reference.removeprefix("sha256:") + "%")]
        if len(ids) == 1 and len(reference) >= 3:
            return ids[0]
        if len(ids) > 1 or len(by_suffix) > 1:
            raise ConfigError(f"more than one image matches {reference}: give more of it")
        raise ConfigError(f"no such image: {reference}")

    def image(self, image_id: str) -> dict:
        row = self.db.row("SELECT * FROM images WHERE id = ?", image_id)
        names = [r["name"] for r in self.db.rows("SELECT name FROM names WHERE image = ? ORDER BY name", image_id)]
        config = row["config"] if isinstance(row["config"], bytes) else row["config"].encode()
        return {"id": row["id"], "config": json.loads(config), "config_bytes": config,
                "layers": json.loads(row["layers"]), "created": row["created"], "size": row["size"], "names": names}

    def images(self) -> list[dict]:
        return [self.image(row["id"]) for row in self.db.rows("SELECT id FROM images ORDER BY created DESC")]

    def tag(self, reference: str, name: str) -> None:
        image_id = self.resolve_image(reference)
        with self.db.change() as db:
            db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (normalize_name(name), image_id))

    def layer_paths(self, image_id: str) -> list[str]:
        """The image's layer directories, top first (as --lower takes them)."""
        return [self.layer_path(d) for d in reversed(self.image(image_id)["layers"])]

    def remove_image(self, reference: str) -> tuple[str, list[str]]:
        """Remove a name, or the image itself when it has no other name (or REFERENCE is its ID);
        layers no image holds any more go too. The image ID and what was untagged."""
        image_id = self.resolve_image(reference)
        name = normalize_name(reference)
        unused: list[str] = []
        with self.db.change() as db:
            names = [r["name"] for r in db.execute("SELECT name FROM names WHERE image = ?", (image_id,))]
            if name in names and len(names) > 1:
                db.execute("DELETE FROM names WHERE name = ?", (name,))
                return image_id, [name]
            users = [r["id"] for r in db.execute("SELECT id FROM containers WHERE image = ?", (image_id,))]
            if users:
                raise ImageInUse(f"image {image_id[:SHORT_ID]} is used by a container (remove it first, "
                                 "or rmi -f)", users)
            layers = json.loads(db.execute("SELECT layers FROM images WHERE id = ?", (image_id,)).fetchone()[0])
            db.execute("DELETE FROM names WHERE image = ?", (image_id,))
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            for diff_id in layers:
                db.execute("UPDATE layers SET refs = refs - 1 WHERE diff_id = ?", (diff_id,))
            unused = [r["diff_id"] for r in db.execute("SELECT diff_id FROM layers WHERE refs <= 0")]
            db.execute("DELETE FROM layers WHERE refs <= 0")
        with _locked(self.layers_dir, blocking=True):  # no command is adding layers meanwhile
            for diff_id in unused:
                if not self.db.row("SELECT 1 FROM layers WHERE diff_id = ?", diff_id):
                    shutil.rmtree(self._layer_dir(diff_id), ignore_errors=True)
        return image_id, names

    def has_image(self, image_id: str) -> bool:
        return self.db.row("SELECT 1 FROM images WHERE id = ?", image_id) is not None

    # ---- containers ----

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.containers_dir, container_id)

    def container_layer_dirs(self, container_id: str) -> tuple[str, str]:
        """The container's upper and work directories."""
        directory = self.container_dir(container_id)
        return os.path.join(directory, "upper"), os.path.join(directory, "work")

    def add_container(self, name: str | None, image_id: str, config: dict) -> str:
        """Record a container of IMAGE_ID in state created, with its directory (its upper and work
        directories inside); its ID."""
        container_id = secrets.token_hex(32)
        name = name or _generated_name({r["name"] for r in self.db.rows("SELECT name FROM containers")})
        if not NAME.fullmatch(name):
            raise ConfigError(f"container names are letters, digits and _.- (starting with a letter or "
                              f"digit): {name}")
        directory = self.container_dir(container_id)
        upper, work = self.container_layer_dirs(container_id)
        for path in (upper, work):
            os.makedirs(path, mode=0o700)
        # The union's root is the upper's: as the image's, so its users can reach their files.
        image_root = os.stat(self.layer_paths(image_id)[0])
        os.chown(upper, image_root.st_uid, image_root.st_gid)
        os.chmod(upper, stat.S_IMODE(image_root.st_mode))
        try:
            with self.db.change() as db:
                if db.execute("SELECT 1 FROM containers WHERE name = ?", (name,)).fetchone():
                    raise ConfigError(f"the container name {name} is in use")
                db.execute("INSERT INTO containers (id, name, image, config, state, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (container_id, name, image_id, json.dumps(config), "created", now()))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return container_id

    def resolve_container(self, reference: str) -> str:
        """The ID of the container REFERENCE names: its name, its ID, or a unique prefix of it."""
        row = self.db.row("SELECT id FROM containers WHERE name = ?", reference)
        if row:
            return row["id"]
        ids = [r["id"] for r in self.db.rows("SELECT id FROM containers WHERE id LIKE ?", reference + "%")]
        if len(ids) == 1 and reference:
            return ids[0]
        if len(ids) > 1:
            raise ConfigError(f"more than one container matches {reference}: give more of it")
        raise ConfigError(f"no such container: {reference}")

    def container(self, container_id: str) -> dict:
        row = self.db.row("SELECT * FROM containers WHERE id = ?", container_id)
        if row is None:
            raise ConfigError(f"no such container: {container_id}")
        return {**dict(row), "config": json.loads(row["config"])}

    def containers(self) -> list[dict]:
        return [self.container(r["id"]) for r in self.db.rows("SELECT id FROM containers ORDER BY created DESC")]

    def set_running(self, container_id: str, pid: int, pid_start: int) -> None:
        with self.db.change() as db:
            db.execute("UPDATE containers SET state = 'running', pid = ?, pid_start = ?, started = ?, "
                       "exit_code = NULL, finished = NULL WHERE id = ?", (pid, pid_start, now(), container_id))

    def set_exited(self, container_id: str, code: int) -> None:
        with self.db.change() as db:
            db.execute("UPDATE containers SET state = 'exited', pid = NULL, pid_start = NULL, exit_code = ?, "
                       "finished = ? WHERE id = ?", (code, now(), container_id))

    def remove_container(self, container_id: str) -> None:
        with self.db.change() as db:
            db.execute("DELETE FROM containers WHERE id = ?", (container_id,))
        shutil.rmtree(self.container_dir(container_id), ignore_errors=True)


# Generated container names, as podman's adjective_noun ones.
ADJECTIVES = ("brave", "calm", "eager", "fond", "gentle", "happy", "keen", "lucid", "merry", "nimble", "proud",
              "quiet", "swift", "tender", "vivid", "witty", "zen", "bold", "clever", "sharp")
NOUNS = ("turing", "hopper", "lovelace", "knuth", "ritchie", "thompson", "torvalds", "liskov", "dijkstra",
         "hamilton", "kay", "lamport", "backus", "mccarthy", "perlman", "allen", "wirth", "hoare", "shannon", "curie")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _generated_name(taken: set[str]) -> str:
    for _ in range(100):
        name = f"{secrets.choice(ADJECTIVES)}_{secrets.choice(NOUNS)}"
        if name not in taken:
            return name
    return f"{name}_{secrets.token_hex(3)}"


@contextlib.contextmanager
def _locked(path: str, blocking: bool, shared: bool = False) -> Iterator[None]:
    """A flock on directory PATH, exclusive unless SHARED (BlockingIOError when not BLOCKING and
    taken)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)
