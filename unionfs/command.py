"""The pyunionfs command. A mount that daemonizes goes to the fork server (unionfs/forkserver)
before anything else is imported; everything else to the command line's front, unionfs/cli.py."""
from __future__ import annotations

import os
import sys

from unionfs.forkserver import client


def main() -> int:
    code = client.mount(sys.argv[1:])
    if code is not None:
        sys.stderr.flush()
        os._exit(code)  # nothing else to tear down; an interpreter's shutdown costs a millisecond or two
    from unionfs import cli

    return cli.main()
