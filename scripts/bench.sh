#!/usr/bin/env bash
# Set up, then run the benchmark (as root): pyunionfs next to native, kernel overlayfs and
# fuse-overlayfs. Arguments go to `python -m bench`, e.g. --quick, --rounds 5, --workloads ...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m bench "$@"
