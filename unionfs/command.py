"""The pyunionfs command. A mount that daemonizes and a container run go to the fork server
(unionfs/forkserver) before anything else is imported; everything else to the command line's
front, unionfs/cli.py."""
from __future__ import annotations

import os
import sys

from unionfs.forkserver import client


def main() -> int:
    argv = sys.argv[1:]
    code = client.run_container(argv) if client.is_container_run(argv) else client.mount(argv)
    if code is not None:
        sys.stderr.flush()
        os._exit(code)  # nothing else to tear down; an interpreter's shutdown costs a millisecond or two
    from unionfs import cli

    return cli.main()
