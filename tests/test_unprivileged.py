"""A plain user mounts without a user namespace, as with fuse-overlayfs: through the setuid
fusermount3, writing the kernel's unprivileged format (user.overlay.* xattrs, char 0:0 whiteouts,
which the kernel lets any user make), which kernel overlayfs mounted with userxattr in a user
namespace reads.

These hosts have /dev/fuse mode 0600 (no udev; Debian's udev makes it 0666, and libfuse opens it
before it falls back to fusermount3), so the user runs in a private mount namespace where a mode
0666 node of the FUSE device is bound over /dev/fuse."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from mounts import PYUNIONFS, daemons_for
from launchers import ROOTLESS_USER as ROOTLESS_USER_VARIABLE

USER_STEPS = r'''
import hashlib, json, os, stat, sys
m = sys.argv[1]
with open(f"{m}/f", "a") as f:
    f.write("appended\n")
os.unlink(f"{m}/d/x")
os.rmdir(f"{m}/d")
os.mkdir(f"{m}/d")
open(f"{m}/d/y", "w").write("new\n")
os.rename(f"{m}/gone-soon", f"{m}/moved")
os.symlink("f", f"{m}/link")
os.chmod(f"{m}/moved", 0o600)
view = {}
for top, dirs, files in os.walk(m):
    for name in dirs + files:
        path = os.path.join(top, name)
        st = os.lstat(path)
        body = os.readlink(path) if stat.S_ISLNK(st.st_mode) else \
            hashlib.sha256(open(path, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        view[os.path.relpath(path, m)] = [stat.filemode(st.st_mode), body]
print(json.dumps(view, sort_keys=True))
'''

LIST_ONLY = USER_STEPS[USER_STEPS.index("view = {}"):].replace("view = {}", "import hashlib, json, os, stat, sys\n"
                                                                  "m = sys.argv[1]\nview = {}")


@pytest.fixture
def user() -> str:
    name = os.environ.get(ROOTLESS_USER_VARIABLE)
    if not name:
        pytest.skip(f"the unprivileged tier needs an unprivileged user in ${ROOTLESS_USER_VARIABLE} "
                    "(scripts/test.sh creates one)")
    return name


def as_user_with_fuse(user: str, base: Path, script: str) -> subprocess.CompletedProcess:
    """SCRIPT (sh) as USER, in a private mount namespace where /dev/fuse is usable by anyone."""
    fuse = base / "fuse-device"
    if not fuse.exists():
        os.mknod(fuse, 0o666 | stat.S_IFCHR, os.makedev(10, 229))
        os.chmod(fuse, 0o666)
    wrapper = (f'mount --bind "{fuse}" /dev/fuse && exec setpriv --reuid="{user}" --regid="{user}" '
               f'--clear-groups sh -c "$0"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, script],
                          capture_output=True, text=True, timeout=120, cwd=base)


def build(base: Path, user: str) -> None:
    for name in ("lower/d", "upper", "work", "mnt", "kwork", "kmnt"):
        (base / name).mkdir(parents=True)
    (base / "lower" / "f").write_text("lower\n")
    (base / "lower" / "d" / "x").write_text("x\n")
    (base / "lower" / "gone-soon").write_text("moves\n")
    (base / "steps.py").write_text(USER_STEPS)
    (base / "list.py").write_text(LIST_ONLY)
    subprocess.run(["chown", "-R", f"{user}:", str(base)], check=True)


@pytest.mark.parametrize("program", [PYUNIONFS, "fuse-overlayfs"])
def test_plain_user_mounts_through_fusermount3(program, user, shared_tmp):
    base = shared_tmp
    build(base, user)
    mount = f'{program} -o lowerdir=lower,upperdir=upper,workdir=work mnt'
    script = (f'{mount} || exit 1; trap "fusermount3 -u mnt" EXIT; '
              f'/usr/bin/python3 steps.py mnt > view.json')
    try:
        result = as_user_with_fuse(user, base, script)
    finally:
        for pid in daemons_for(base / "mnt", program):
            os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    seen = json.loads((base / "view.json").read_text())
    assert seen["f"][1] != seen["moved"][1] and "gone-soon" not in seen and seen["d/y"][0] == "-rw-r--r--"
    assert sorted(seen) == ["d", "d/y", "f", "link", "moved"]
    if program != PYUNIONFS:
        return  # fuse-overlayfs's run shows the same steps work there; its upper is its own format
    upper = base / "upper"
    whiteout = os.lstat(upper / "gone-soon")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0 and whiteout.st_uid != 0
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    assert not [name for path in upper.rglob("*") for name in os.listxattr(path, follow_symlinks=False)
                if name.startswith("trusted.")]
    # The kernel, mounted with userxattr by the same user in a user namespace, reads the upper.
    kernel = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "unshare", "-Urm", "sh", "-c",
         "mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=kwork,userxattr kmnt && "
         "/usr/bin/python3 list.py kmnt"], capture_output=True, text=True, timeout=60, cwd=base)
    assert kernel.returncode == 0, kernel.stderr
    assert json.loads(kernel.stdout) == seen
