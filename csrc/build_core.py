"""cffi builder for the C core (out-of-line API mode): `pip install .` compiles `unionfs.fs._core`.

The declarations come from csrc/unionfs_core.h itself, so the header stays the one contract.
"""
import re
from pathlib import Path

import cffi

CSRC = Path(__file__).resolve().parent
HEADER = CSRC / "unionfs_core.h"


def header_declarations() -> str:
    """The header without its include guard and #include lines, which cdef() cannot read."""
    text = HEADER.read_text()
    text = re.sub(r"^#(ifndef|endif|include).*$", "", text, flags=re.M)
    return re.sub(r"^#define UNIONFS_CORE_H$", "", text, flags=re.M)


ffibuilder = cffi.FFI()
ffibuilder.cdef(header_declarations())
ffibuilder.set_source(
    "unionfs.fs._core",
    '#include "unionfs_core.h"',
    sources=[str((CSRC / name).relative_to(CSRC.parent)) for name in ("unionfs_core.c", "copy_up.c", "readahead.c")],
    include_dirs=[str(CSRC.relative_to(CSRC.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
