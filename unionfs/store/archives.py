"""Images in and out of the store as the tools users have write and read them: a root
filesystem tarball (`podman import`), docker-archive and oci-archive files and OCI image layout
directories (`podman save`, `skopeo copy`)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import zstandard

from unionfs import present
from unionfs.errors import ConfigError
from unionfs.fs import syscalls
from unionfs.store import changes
from unionfs.store.store import Store, now
from unionfs.store.unpack import CHUNK, LayerError, decompressed

# The OCI names of architectures, by what platform.machine() says.
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "s390x": "s390x",
                 "ppc64le": "ppc64le"}


def config_json(config: dict) -> bytes:
    """An image config as stored and hashed: compact, keys sorted, as podman writes one."""
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


def import_tarball(store: Store, path: str, name: str | None, instructions: list[str] = ()) -> str:
    """A root filesystem tarball (plain, gzip or zstd) as a one-layer image, as `podman import`,
    with INSTRUCTIONS (Dockerfile ones) in its config; its ID."""
    image_config: dict = {}
    for instruction in instructions:  # checked before anything is stored
        changes.apply(image_config, instruction)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with raw, store.adding():
        try:
            layer = store.add_layer(raw)
        except LayerError as exc:
            raise LayerError(f"{path}: {exc}") from None
        created = now()
        config = {"created": created, "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()),
                  "os": "linux", "config": image_config,
                  "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                  "history": [{"created": created, "created_by": f"pyunionfs import {path}"}]}
        return store.add_image(config_json(config), {layer.diff_id: layer.size}, [name] if name else [])


# ---- load: docker-archive, oci-archive, OCI layout directories ----

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
MAX_METADATA = 16 << 20  # a manifest, index or config bigger than this is not one
MAX_INDIRECTION = 8  # nested indexes, or symlinks between an archive's members
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
DOCKER_CONFIG_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")
BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")


class ArchiveError(LayerError):
    """An image archive that cannot be loaded: one line, nothing stored."""


class _TarSource:
    """The members of an image archive (a tar, plain or compressed: then decompressed into a
    temporary file first, since its members are read out of order). A symlink between members
    (docker-archive has them) is followed within the archive only."""

    def __init__(self, path: str, scratch_dir: str):
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        self.file = raw
        try:
            stream = decompressed(raw)
            if stream is not raw:
                self.file = tempfile.TemporaryFile(dir=scratch_dir)
                with raw:
                    shutil.copyfileobj(stream, self.file, CHUNK)
                self.file.seek(0)
            self.tar = tarfile.open(fileobj=self.file, mode="r:")
            # By normalized name; one that leads outside is never asked for (_normal refuses it).
            self.members = {posixpath.normpath(m.name.lstrip("/")): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError) as exc:
            raw.close()
            self.file.close()
            raise ArchiveError(f"{path} is not an image archive: {exc}") from None

    def close(self) -> None:
        self.tar.close()
        self.file.close()

    def has(self, name: str) -> bool:
        return _normal(name) in self.members

    def _member(self, name: str) -> tarfile.TarInfo:
        for _ in range(MAX_INDIRECTION):
            member = self.members.get(_normal(name))
            if member is None:
                raise ArchiveError(f"the archive has no {name}")
            if member.isreg():
                return member
            if not (member.issym() or member.islnk()):
                raise ArchiveError(f"the archive's {name} is not a file")
            base = posixpath.dirname(_normal(name)) if member.issym() else ""
            name = posixpath.join(base, member.linkname)
        raise ArchiveError(f"the archive's {name} is a loop of links")

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> BinaryIO:
        return self.tar.extractfile(self._member(name))


class _DirectorySource:
    """The files of an OCI image layout directory, opened below it without following symlinks."""

    def __init__(self, path: str):
        self.fd = syscalls.open_root(path)

    def close(self) -> None:
        os.close(self.fd)

    def has(self, name: str) -> bool:
        return syscalls.lstat_or_none(self.fd, name.encode()) is not None

    def size(self, name: str) -> int:
        with self.open(name) as f:
            return os.fstat(f.fileno()).st_size

    def open(self, name: str) -> BinaryIO:
        try:
            return open(syscalls.open_beneath(self.fd, name.encode(), os.O_RDONLY), "rb")
        except OSError as exc:
            raise ArchiveError(f"the image layout has no {name}: {exc.strerror}") from None


def _normal(name: str) -> str:
    """An archive member's name, normalized; one that leads outside the archive is refused."""
    normal = posixpath.normpath(name.lstrip("/")) if name else "."
    if normal == ".." or normal.startswith("../"):
        raise ArchiveError(f"the archive names something outside it: {name}")
    return "" if normal == "." else normal


class _Blob(io.RawIOBase):
    """A blob read as a stream: its bytes counted (for the progress bar) and hashed, so that
    check(), once it is read, can refuse one whose digest is not the one it is known by."""

    def __init__(self, raw: BinaryIO, digest: str | None, advance: Callable[[int], None]):
        super().__init__()
        self.raw, self.digest, self.advance = raw, digest, advance
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        if self.digest is not None:
            self.hash.update(data)
        self.advance(len(data))
        return len(data)

    def check(self) -> None:
        while self.read(CHUNK):
            pass
        if self.digest is not None and "sha256:" + self.hash.hexdigest() != self.digest:
            raise ArchiveError(f"a blob does not match its digest {self.digest} (it is sha256:{self.hash.hexdigest()})")


def _read_metadata(source, name: str, digest: str | None = None) -> tuple[bytes, object]:
    """The bytes of a manifest, index or config, checked against DIGEST, and their JSON."""
    with source.open(name) as f:
        data = f.read(MAX_METADATA + 1)
    if len(data) > MAX_METADATA:
        raise ArchiveError(f"the archive's {name} is too big to be image metadata")
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ArchiveError(f"the archive's {name} does not match its digest {digest}")
    try:
        return data, json.loads(data)
    except ValueError:
        raise ArchiveError(f"the archive's {name} is not JSON") from None


def _field(value: object, key: str, kind: type, where: str) -> Any:
    found = value.get(key) if isinstance(value, dict) else None
    if not isinstance(found, kind):
        raise ArchiveError(f"{where} has no valid {key}")
    return found


def _blob_name(digest: object) -> str:
    match = DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ArchiveError(f"not a sha256 digest: {digest!r}")
    return f"blobs/sha256/{match.group(1)}"


@dataclass
class _LayerBlob:
    name: str  # in the source
    digest: str | None  # the blob's, when the format names one


@dataclass
class _Image:
    config: bytes
    layers: list[_LayerBlob]
    names: list[str]


def _docker_archive_images(source) -> Iterator[_Image]:
    _, manifest = _read_metadata(source, "manifest.json")
    if not isinstance(manifest, list):
        raise ArchiveError("manifest.json is not a list of images")
    for entry in manifest:
        config_name = _field(entry, "Config", str, "an image in manifest.json")
        named = DOCKER_CONFIG_NAME.fullmatch(config_name)
        config, _ = _read_metadata(source, config_name, f"sha256:{named.group(1)}" if named else None)
        layers = []
        for name in _field(entry, "Layers", list, "an image in manifest.json"):
            blob = BLOB_NAME.fullmatch(name) if isinstance(name, str) else None
            layers.append(_LayerBlob(str(name), f"sha256:{blob.group(1)}" if blob else None))
        names = entry.get("RepoTags") or []
        yield _Image(config, layers, [name for name in names if isinstance(name, str)])


def _oci_images(source) -> Iterator[_Image]:
    _, index = _read_metadata(source, "index.json")
    for descriptor in _field(index, "manifests", list, "index.json"):
        name = (descriptor.get("annotations") or {}).get(REF_NAME) if isinstance(descriptor, dict) else None
        # A reference name may be a whole name or a tag alone (skopeo's oci:DIR:TAG): a tag names nothing here.
        names = [name] if isinstance(name, str) and ("/" in name or ":" in name) else []
        yield _oci_image(source, descriptor, names, 0)


def _oci_image(source, descriptor: object, names: list[str], depth: int) -> _Image:
    if depth > MAX_INDIRECTION:
        raise ArchiveError("the image index nests too deep")
    digest = _field(descriptor, "digest", str, "a descriptor")
    _, manifest = _read_metadata(source, _blob_name(digest), digest)
    if isinstance(manifest, dict) and "manifests" in manifest:  # an index: the manifest for this machine
        candidates = _field(manifest, "manifests", list, "an image index")
        machine = ARCHITECTURES.get(platform.machine(), platform.machine())
        chosen = next((c for c in candidates if isinstance(c, dict) and (c.get("platform") or {}).get(
                       "architecture") == machine and (c.get("platform") or {}).get("os", "linux") == "linux"),
                      None)
        if chosen is None:
            raise ArchiveError(f"the image index has no manifest for linux/{machine}")
        return _oci_image(source, chosen, names, depth + 1)
    config_digest = _field(_field(manifest, "config", dict, "a manifest"), "digest", str, "a manifest's config")
    config, _ = _read_metadata(source, _blob_name(config_digest), config_digest)
    layers = [_LayerBlob(_blob_name(_field(layer, "digest", str, "a layer")), layer["digest"])
              for layer in _field(manifest, "layers", list, "a manifest")]
    return _Image(config, layers, names)


def load(store: Store, path: str, progress: present.Progress) -> list[tuple[str, list[str]]]:
    """The images in PATH (a docker-archive or oci-archive file, or an OCI image layout
    directory) into the store, every blob and layer checked against its digest; each one's ID
    and names."""
    source = _DirectorySource(path) if os.path.isdir(path) else _TarSource(path, store.staging_dir)
    try:
        if source.has("manifest.json"):
            images = list(_docker_archive_images(source))
        elif source.has("index.json"):
            images = list(_oci_images(source))
        else:
            raise ArchiveError(f"{path} is not a docker-archive, an oci-archive or an OCI image layout")
        return [(_store_image(store, source, image, progress), image.names) for image in images]
    finally:
        source.close()


def _store_image(store: Store, source, image: _Image, progress: present.Progress) -> str:
    try:
        config = json.loads(image.config)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise ArchiveError("an image config has no rootfs.diff_ids") from None
    try:
        changes.check(config)
    except ConfigError as exc:
        raise ArchiveError(str(exc)) from None
    if not (isinstance(diff_ids, list) and len(diff_ids) == len(image.layers)
            and all(isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids)):
        raise ArchiveError("an image config's rootfs.diff_ids do not match its layers")
    with store.adding():
        sizes = {}
        for diff_id, layer in zip(diff_ids, image.layers):
            known = store.layer_size(diff_id)
            if known is not None:  # stored already: unpacked once, shared
                sizes[diff_id] = known
                continue
            advance = progress.task(diff_id.removeprefix("sha256:")[:12], source.size(layer.name))
            with source.open(layer.name) as raw:
                blob = _Blob(raw, layer.digest, advance)
                sizes[diff_id] = store.add_layer(io.BufferedReader(blob, CHUNK), diff_id, blob.check).size
        return store.add_image(image.config, sizes, image.names)


# ---- save: docker-archive and oci-archive ----

FORMATS = ("docker-archive", "oci-archive")


def save(store: Store, references: list[str], image_format: str, out: BinaryIO) -> None:
    """The images REFERENCES name, as a docker-archive or oci-archive that podman and docker
    load: their layers the very archives they were stored from, so their IDs stay."""
    images = [store.image(store.resolve_image(reference)) for reference in references]
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()

        def add(name: str, data: bytes) -> None:
            if name not in written:
                written.add(name)
                tar.addfile(_archive_entry(name, len(data)), io.BytesIO(data))

        def add_layer(name: str, diff_id: str) -> None:
            if name in written:
                return
            written.add(name)
            with store.layer_archive(diff_id) as archive:
                reader = io.BufferedReader(archive, CHUNK)
                tar.addfile(_archive_entry(name, archive.size), reader)
                reader.read()  # to its end, where its digest is checked

        if image_format == "docker-archive":
            manifest = []
            for image in images:
                config = image["config_bytes"]
                add(f"{image['id']}.json", config)
                for diff_id in image["layers"]:
                    add_layer(f"{diff_id.removeprefix('sha256:')}.tar", diff_id)
                manifest.append({"Config": f"{image['id']}.json", "RepoTags": image["names"],
                                 "Layers": [f"{d.removeprefix('sha256:')}.tar" for d in image["layers"]]})
            add("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
            return
        descriptors = []
        for image in images:
            config = image["config_bytes"]
            add(_blob_name(f"sha256:{image['id']}"), config)
            layers = []
            for diff_id in image["layers"]:
                add_layer(_blob_name(diff_id), diff_id)
                layers.append({"mediaType": OCI_LAYER, "digest": diff_id, "size": store.layer_size(diff_id)})
            manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{image['id']}",
                                              "size": len(config)},
                                   "layers": layers}, separators=(",", ":")).encode()
            manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            add(_blob_name(manifest_digest), manifest)
            for name in image["names"] or [None]:
                descriptors.append({"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                                    **({"annotations": {REF_NAME: name}} if name else {})})
        add("index.json", json.dumps({"schemaVersion": 2, "manifests": descriptors}, separators=(",", ":")).encode())
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')


def _archive_entry(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o444
    return info
