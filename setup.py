"""Packaging shim: all metadata lives in pyproject.toml.

The C++ kernels are deliberately not compiled here. A wheel built in pip's
isolated build environment would be compiled against whatever torch that
environment holds, which need not match the torch that runs it. fedcomp
compiles csrc/ just in time against the running torch instead (cached per
torch version; `python -m fedcomp.build` prebuilds).
"""

from setuptools import setup

setup()
