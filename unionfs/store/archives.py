"""Images in and out of the store as the tools users have write and read them: a root
filesystem tarball (`podman import`), docker-archive and oci-archive files and OCI image layout
directories (`podman save`, `skopeo copy`)."""
from __future__ import annotations

import json
import platform

from unionfs.errors import ConfigError
from unionfs.store.store import Store, now
from unionfs.store.unpack import LayerError

# The OCI names of architectures, by what platform.machine() says.
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "s390x": "s390x",
                 "ppc64le": "ppc64le"}


def config_json(config: dict) -> bytes:
    """An image config as stored and hashed: compact, keys sorted, as podman writes one."""
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


def import_tarball(store: Store, path: str, name: str | None) -> str:
    """A root filesystem tarball (plain, gzip or zstd) as a one-layer image, as `podman import`;
    its ID."""
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
                  "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                  "history": [{"created": created, "created_by": f"pyunionfs import {path}"}]}
        return store.add_image(config_json(config), {layer.diff_id: layer.size}, [name] if name else [])
