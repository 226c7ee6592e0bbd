# cffi's build hook (cffi_modules), the shim and the command are only reachable through setup();
# all metadata is in pyproject.toml.
import os
import subprocess
import sys

from setuptools import Extension, setup
# setuptools' own distutils (imported after setuptools, which puts it in place)
from distutils.ccompiler import new_compiler  # noqa: E402
from distutils.command.build_scripts import build_scripts  # noqa: E402
from distutils.sysconfig import customize_compiler  # noqa: E402


def fuse3_cflags() -> list[str]:
    return subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True,
                          check=True).stdout.split()


def c_string(text: str) -> str:
    """TEXT as a C string literal, every byte escaped (a path may hold anything)."""
    return '"' + "".join(f"\\{byte:03o}" for byte in os.fsencode(text)) + '"'


class BuildCommand(build_scripts):
    """The pyunionfs command is a C program (csrc/front.c, the project's one script-file) that
    hands mounts and container runs to the fork server and runs everything else with the
    Python that builds it: pip builds with the interpreter it installs for."""

    def run(self) -> None:
        self.mkpath(self.build_dir)
        compiler = new_compiler()
        customize_compiler(compiler)
        build_temp = self.get_finalized_command("build").build_temp
        objects = compiler.compile(["csrc/front.c"], output_dir=build_temp, extra_postargs=["-O2", "-Wall", "-Wextra"],
                                   macros=[("PYUNIONFS_PYTHON", c_string(sys.executable)),
                                           ("PYUNIONFS_PREFIX", c_string(sys.prefix))])
        compiler.link_executable(objects, "pyunionfs", output_dir=self.build_dir)


setup(
    cffi_modules=["csrc/build_core.py:ffibuilder", "csrc/build_sys.py:ffibuilder", "csrc/build_seccomp.py:ffibuilder"],
    # Not a Python module: a shared object the daemon loads with RTLD_GLOBAL (see csrc/fuse_shim.c).
    ext_modules=[Extension("unionfs.fs._fuse_shim", sources=["csrc/fuse_shim.c"], libraries=["dl"],
                           extra_compile_args=fuse3_cflags() + ["-O2", "-Wall", "-Wextra"])],
    cmdclass={"build_scripts": BuildCommand},
)
