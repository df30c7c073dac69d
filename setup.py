"""Builds the C++ extension fedmoe_kernels._assign (pybind11, C++17, no libtorch)."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fedmoe_kernels._assign",
        ["csrc/assign.cpp"],
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/*.hpp")),  # a changed header rebuilds the extension
        cxx_std=17,
        extra_compile_args=["-O3", "-fno-math-errno", "-pthread"],
        extra_link_args=["-pthread"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
