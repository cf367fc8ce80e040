"""Build the C++ CPU kernel (csrc/) into manu_fast._C and map kernels/ to manu_fast.kernels.

The extension binds raw buffers through pybind11 (no torch C++ API), so it builds against any torch
version in seconds and needs only a C++17 compiler. If it cannot be built the package still installs
and the pure-PyTorch reference runs instead (with a warning).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("MANU_FAST_NO_EXT") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    class OptionalBuildExt(build_ext):
        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing etc.: install without the extension
                print(f"WARNING: manu_fast._C not built ({e}); the PyTorch reference will be used", file=sys.stderr)

    # -fno-trapping-math: lets GCC if-convert (vectorise) the branch-free selects in csrc; values are unchanged (IEEE).
    flags = ["-O3", "-fno-trapping-math", "-fopenmp", "-std=c++17"]
    if os.environ.get("MANU_FAST_NATIVE", "0") == "1":
        flags.append("-march=native")
    ext_modules = [Pybind11Extension("manu_fast._C", sources, depends=sorted(glob.glob("csrc/*.h")), extra_compile_args=flags,
                                     extra_link_args=["-fopenmp"], cxx_std=17)]
    cmdclass = {"build_ext": OptionalBuildExt}

setup(
    packages=find_packages(include=["manu_fast", "manu_fast.*"]) + ["manu_fast.kernels"],
    package_dir={"manu_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
