"""The error every part reports to the user (bad input: one line, a non-zero exit), and what
`run` owes its caller: exit statuses (it keeps 0-124 and 126-255 for the command, as podman
does) and the signals it passes on to the command (csrc/front.c, the command, has the same
list for a run the fork server serves)."""
from __future__ import annotations

import signal


class ConfigError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""


# Exit statuses of `pyunionfs run` that are not the command's own, as in podman.
EXIT_LAUNCHER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127
# Signals the launcher passes on to the container's command (as podman's --sig-proxy).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH)
