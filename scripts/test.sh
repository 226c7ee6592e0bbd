#!/usr/bin/env bash
# Set up, then run the test suite (real FUSE mounts; needs root). Extra arguments go to pytest,
# e.g. scripts/test.sh -m slow for the slow tier.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
