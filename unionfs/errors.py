"""The error every part reports to the user (bad input: one line, a non-zero exit), and what
`run` owes its caller: exit statuses (it keeps 0-124 and 126-255 for the command, as podman
does) and the signals it passes on to the command. Builtin modules only: the fork server's
client (unionfs/forkserver/client.py) imports this."""
from __future__ import annotations

import _signal


class ConfigError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""


# Exit statuses of `pyunionfs run` that are not the command's own, as in podman.
EXIT_LAUNCHER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127
# Signals the launcher passes on to the container's command (as podman's --sig-proxy).
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
                     _signal.SIGUSR2, _signal.SIGWINCH)
