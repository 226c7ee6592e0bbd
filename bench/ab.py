"""`python -m bench --ab A,B`: two commits of pyunionfs measured alternately in one run, each from
a git worktree of its own with its C parts built in place, as systems `pyunionfs@A` and
`pyunionfs@B` (with every command pyunionfs's system has: mount, run, podman's mount program,
engine)."""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from bench.systems import BUILTIN, BenchError, System

REPOSITORY = Path(__file__).resolve().parent.parent


def systems(revisions: list[str], scratch: Path) -> list[System]:
    """A pyunionfs system per revision, checked out and built below SCRATCH."""
    if len(revisions) != 2 or len(set(revisions)) != 2:
        raise BenchError("--ab takes two different commits: A,B")
    return [_system(revision, scratch / f"ab-{index}") for index, revision in enumerate(revisions)]


def remove(scratch: Path) -> None:
    """Forget the worktrees (their directories go with SCRATCH)."""
    for tree in scratch.glob("ab-*"):
        subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "prune"], capture_output=True)


def _system(revision: str, tree: Path) -> System:
    added = subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", str(tree), revision],
                           capture_output=True, text=True)
    if added.returncode != 0:
        raise BenchError(f"cannot check out {revision}: {added.stderr.strip().splitlines()[-1:]}")
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "build_scripts"], cwd=tree,
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise BenchError(f"cannot build {revision}: {(built.stderr.strip().splitlines() or ['?'])[-1]}")
    subprocess.run([sys.executable, "-m", "compileall", "-q", "unionfs"], cwd=tree, capture_output=True)
    # The revision's own command, as a program (podman takes a mount program's path): what its
    # build_scripts made (the C command, or a Python script for this interpreter in revisions
    # before it), else its command line's module (-P: not the working directory's); its code
    # first on the path.
    scripts = sorted(tree.glob("build/scripts-*/pyunionfs"))
    entry = [str(scripts[0])] if scripts else [sys.executable, "-P", "-m", "unionfs.cli"]
    command = tree / "bench-pyunionfs"
    command.write_text("#!/bin/sh\n" + shlex.join(["exec", "env", f"PYTHONPATH={tree}", *entry]) + ' "$@"\n')
    command.chmod(0o755)
    label = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip() or revision

    def at_revision(template: str | None) -> str | None:
        return template.replace("{pyunionfs}", shlex.quote(str(command))) if template else template

    base = BUILTIN["pyunionfs"]
    return dataclasses.replace(base, name=f"pyunionfs@{label}", mount=at_revision(base.mount),
                               run=at_revision(base.run), podman=at_revision(base.podman),
                               engine=at_revision(base.engine))
