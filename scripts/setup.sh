#!/usr/bin/env bash
# Set up everything pyunionfs needs on Debian 12, as root: the system packages, then a virtualenv
# in .venv with pyunionfs (its C core compiled by pip) and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc libc6-dev uidmap
          python3-dev python3-venv  # Debian's python: other users can run it (rootless tier)
          fuse-overlayfs busybox-static attr bubblewrap  # test oracles, fixtures, bench peers
          podman runc  # the podman tier: pyunionfs as containers/storage's mount program
          debootstrap  # the bench's image-load image (made once, through the Debian mirror)
          libseccomp2)  # the containers' seccomp filter
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true

# The venv is built on Debian's /usr/bin/python3, not a python under /root, so that an
# unprivileged user can run pyunionfs from it.
if ! grep -qx 'home = /usr/bin' .venv/pyvenv.cfg 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test,bench]'
# Bytecode now, where PYTHONDONTWRITEBYTECODE would otherwise have every start compile the code again.
.venv/bin/python -m compileall -q unionfs >/dev/null
# mount(8) runs helpers with a fixed PATH, so `mount -t fuse.pyunionfs` finds the command only
# in a system directory: link this checkout's command there.
ln -sfn "$PWD/.venv/bin/pyunionfs" /usr/local/bin/pyunionfs
echo "setup: ready (.venv/bin/pyunionfs, linked from /usr/local/bin/pyunionfs)"
