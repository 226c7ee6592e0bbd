"""The error every part reports to the user (bad input: one line, a non-zero exit), and the exit
statuses of `run`, which keeps 0-124 and 126-255 for the command, as podman does."""
from __future__ import annotations


class ConfigError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""


# Exit statuses of `pyunionfs run` that are not the command's own, as in podman.
EXIT_LAUNCHER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127
