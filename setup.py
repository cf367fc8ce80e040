"""Build the C++ CPU kernel (csrc/) into manu_fast._C and map kernels/ to manu_fast.kernels.

The extension binds raw buffers through pybind11 (no torch C++ API), so it builds against any torch
version in seconds and needs only a C++17 compiler and pybind11. If it cannot be built (either missing) the
package still installs and the pure-PyTorch reference runs instead on CPU (with a warning).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cpp"))
build_extension = bool(sources) and os.environ.get("MANU_FAST_NO_EXT") != "1"
if build_extension:
    try:  # missing when installed with --no-build-isolation into an environment without it (e.g. offline)
        from pybind11.setup_helpers import Pybind11Extension, build_ext
    except ImportError:
        print("WARNING: pybind11 is not installed, manu_fast._C not built; the PyTorch reference will be used on CPU "
              "(pip install pybind11 and reinstall to build it)", file=sys.stderr)
        build_extension = False
if build_extension:
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
