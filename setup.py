"""Build script: maps the top-level ``kernels/`` folder to ``ssbsn.kernels`` and, where a CUDA
build of torch and nvcc are present, builds the blind-spot convolution extension from ``csrc/``.
"""
from setuptools import find_packages, setup

PACKAGES = ["ssbsn." + p for p in find_packages("ssbsn")] + ["ssbsn", "ssbsn.kernels", "ssbsn.csrc"]
PACKAGE_DIR = {"ssbsn": "ssbsn", "ssbsn.kernels": "kernels", "ssbsn.csrc": "csrc"}
# csrc/ travels with the package (ssbsn/csrc/), so an installed copy can JIT-build the extension
PACKAGE_DATA = {"ssbsn.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp", "*.sh", "*.md", "emulation/*.cpp",
                               "emulation/shim/*.h"]}


def cuda_extensions():
    """The CUDA extension in csrc/ (empty list where it cannot be built)."""
    import os
    import shutil
    import sys

    def skip(why):
        print(f"ssbsn: building without the CUDA extension ssbsn._C_conv ({why})", file=sys.stderr)
        return [], {}

    if os.environ.get("SSBSN_NO_CUDA_EXT") == "1":
        return skip("SSBSN_NO_CUDA_EXT=1")
    try:  # torch is importable only in a build without isolation (pip --no-build-isolation)
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 -- no usable torch: a pure-Python build
        return skip(f"torch not importable in the build: {type(e).__name__}")
    if not torch.version.cuda:
        return skip("torch is a CPU build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not CUDA_HOME or not nvcc or not os.path.exists(nvcc):
        return skip("nvcc / CUDA_HOME not found")
    flags = ["-O3"]
    ext = CUDAExtension("ssbsn._C_conv", sources=["csrc/conv_binding.cpp", "csrc/conv_kernels.cu"],
                        extra_compile_args={"cxx": flags, "nvcc": flags + ["-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
