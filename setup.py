"""The one C extension: addons._fastscore, the field model's n-gram sums of all windows in one call. Optional:
without a C compiler the install still succeeds and addons.fieldmodel uses its numpy path (the same sums)."""

from setuptools import Extension
from setuptools import setup

setup(ext_modules=[Extension("addons._fastscore", ["addons/_fastscore.c"], extra_compile_args=["-O2"], optional=True)])
