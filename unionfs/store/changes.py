"""The runtime part of an image's config (the OCI config's "config"): what shape it must have to
be used, and Dockerfile instructions applied to it, as `podman import --change` and `podman
commit --change` take them: CMD, ENTRYPOINT, ENV, USER, WORKDIR, STOPSIGNAL, LABEL."""
from __future__ import annotations

import json
import shlex
from typing import Iterable

from unionfs.errors import ConfigError

INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "USER", "WORKDIR", "STOPSIGNAL", "LABEL")
LISTS_OF_STRINGS = ("Entrypoint", "Cmd", "Env")
STRINGS = ("User", "WorkingDir", "StopSignal")


def check(image_config: object) -> None:
    """Refuse an image config (the whole OCI config) whose runtime part a container could not use."""
    if not isinstance(image_config, dict):
        raise ConfigError("an image config is not a JSON object")
    config = image_config.get("config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise ConfigError("an image config's config is not a JSON object")
    for key in LISTS_OF_STRINGS:
        value = config.get(key)
        if value is not None and not _is_string_list(value):
            raise ConfigError(f"an image config's {key} is not a list of strings")
    for key in STRINGS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ConfigError(f"an image config's {key} is not a string")
    if not isinstance(image_config.get("history", []), list):
        raise ConfigError("an image config's history is not a list")


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(part, str) for part in value)


def string_list(text: str) -> list[str] | None:
    """TEXT as a JSON list of strings (a Dockerfile's exec form), or None when it is not one."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if _is_string_list(parsed) else None


def _command(value: str) -> list[str]:
    """The exec form (a JSON list) as given; the shell form run by /bin/sh -c, as Dockerfiles do."""
    exec_form = string_list(value)
    return exec_form if exec_form is not None else ["/bin/sh", "-c", value]


def _pairs(value: str, instruction: str) -> list[tuple[str, str]]:
    """KEY=VALUE ... (quotes as in a shell), or the old single `KEY VALUE` form."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        key, _, rest = value.partition(" ")
        return [(key, rest.strip())]
    pairs = []
    for word in words:
        key, equals, item = word.partition("=")
        if not equals or not key:
            raise ConfigError(f"{instruction} wants KEY=VALUE: {word}")
        pairs.append((key, item))
    return pairs


def apply(config: dict, change: str) -> None:
    """Apply one instruction (e.g. `CMD ["sh"]`, `ENV A=1`) to CONFIG, an OCI image config's
    "config" part."""
    instruction, _, value = change.strip().partition(" ")
    instruction, value = instruction.upper(), value.strip()
    if instruction not in INSTRUCTIONS:
        raise ConfigError(f"--change takes {', '.join(INSTRUCTIONS)}: {change}")
    if not value:
        raise ConfigError(f"{instruction} needs a value: {change}")
    if instruction in ("CMD", "ENTRYPOINT"):
        config["Cmd" if instruction == "CMD" else "Entrypoint"] = _command(value)
    elif instruction == "ENV":
        add_env(config, _pairs(value, instruction))
    elif instruction == "LABEL":
        config.setdefault("Labels", {}).update(_pairs(value, instruction))
    else:
        config[{"USER": "User", "WORKDIR": "WorkingDir", "STOPSIGNAL": "StopSignal"}[instruction]] = value


def add_env(config: dict, pairs: Iterable[tuple[str, str]]) -> None:
    """Set the (KEY, VALUE) PAIRS in CONFIG's Env, in place of what it had for those keys."""
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    env.update(pairs)
    config["Env"] = [f"{key}={value}" for key, value in env.items()]
