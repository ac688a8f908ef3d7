"""Builds the optional C merge kernel (rslora_tools/compute/_kernel.c); everything else is in pyproject.toml.

Without a C compiler the build skips the kernel and rslora-tools computes every merge with torch
(same results, slower).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "unix":  # gcc / clang: never fuse a*b+c (exactness), no errno
            for ext in self.extensions:
                ext.extra_compile_args += ["-O2", "-ffp-contract=off", "-fno-math-errno"]
                ext.libraries += ["m"]
        super().build_extensions()


setup(
    ext_modules=[Extension("rslora_tools.compute._kernel", ["rslora_tools/compute/_kernel.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
