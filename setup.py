"""The one C extension: addons._fastscore, the detector's per-request scoring in one call. Optional: without
a C compiler the install still succeeds and addons.detector uses its numpy path (the same scores)."""

from setuptools import Extension
from setuptools import setup

setup(ext_modules=[Extension("addons._fastscore", ["addons/_fastscore.c"], extra_compile_args=["-O2"], optional=True)])
