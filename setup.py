# cffi's build hook (cffi_modules) and the shim are only reachable through setup();
# all metadata is in pyproject.toml.
import subprocess

from setuptools import Extension, setup


def fuse3_cflags() -> list[str]:
    return subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True,
                          check=True).stdout.split()


setup(
    cffi_modules=["csrc/build_core.py:ffibuilder", "csrc/build_sys.py:ffibuilder", "csrc/build_seccomp.py:ffibuilder"],
    # Not a Python module: a shared object the daemon loads with RTLD_GLOBAL (see csrc/fuse_shim.c).
    ext_modules=[Extension("unionfs.fs._fuse_shim", sources=["csrc/fuse_shim.c"], libraries=["dl"],
                           extra_compile_args=fuse3_cflags() + ["-O2", "-Wall", "-Wextra"])],
)
