# cffi's build hook (cffi_modules) is only reachable through setup(); all metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffibuilder"])
