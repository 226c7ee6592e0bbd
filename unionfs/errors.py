"""The error every part reports to the user: bad input, one line, a non-zero exit."""
from __future__ import annotations


class ConfigError(Exception):
    """Bad input from the user: reported as one line, with a non-zero exit."""
