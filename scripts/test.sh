#!/usr/bin/env bash
# Set up, then run the test suite (real FUSE mounts; needs root). Extra arguments go to pytest,
# e.g. scripts/test.sh -m slow for the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# The rootless tier runs the launcher as this unprivileged user, with subordinate id ranges.
rootless_user=pyunionfs-rootless
id -u "$rootless_user" >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$rootless_user"
for file in /etc/subuid /etc/subgid; do
    grep -q "^$rootless_user:" "$file" 2>/dev/null || echo "$rootless_user:400000:65536" >> "$file"
done
export PYUNIONFS_ROOTLESS_USER=$rootless_user
exec .venv/bin/python -m pytest "$@"
