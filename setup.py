"""Build script: maps the top-level ``kernels/`` folder to ``ssbsn.kernels`` and, where a CUDA
build of torch and nvcc are present, builds the blind-spot convolution extension from ``csrc/``.
"""
from setuptools import find_packages, setup

# csrc/ travels with the package (ssbsn/csrc/), so an installed copy can JIT-build the extension;
# its folders are listed as (data-only) packages so that setuptools ships them without warnings
CSRC = ["ssbsn.csrc", "ssbsn.csrc.emulation", "ssbsn.csrc.emulation.shim"]
PACKAGES = ["ssbsn." + p for p in find_packages("ssbsn")] + ["ssbsn", "ssbsn.kernels"] + CSRC
PACKAGE_DIR = {"ssbsn": "ssbsn", "ssbsn.kernels": "kernels", "ssbsn.csrc": "csrc",
               "ssbsn.csrc.emulation": "csrc/emulation",
               "ssbsn.csrc.emulation.shim": "csrc/emulation/shim"}
PACKAGE_DATA = {"ssbsn": ["py.typed"],  # PEP 561: the package's type hints are for users
                "ssbsn.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp", "*.sh", "*.md"],
                "ssbsn.csrc.emulation": ["*.cpp"], "ssbsn.csrc.emulation.shim": ["*.h"]}


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
    except Exception as e:  # noqa: BLE001 -- no usable torch: a pure-Python build
        return skip(f"torch not importable in the build: {type(e).__name__}")
    if not torch.version.cuda:
        return skip("torch is a CPU build")
    # CUDA_HOME of the real toolkit (an nvcc wrapper outside it makes torch guess wrong) and an
    # architecture when no GPU is visible -- set before torch.utils.cpp_extension reads them
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    from cuda_env import build_env  # csrc/cuda_env.py
    gpu = torch.cuda.is_available()
    for key, value in build_env(gpu, torch.cuda.get_device_capability() if gpu else None).items():
        if os.environ.get(key) != value:
            print(f"ssbsn: {key}={value}", file=sys.stderr)
        os.environ[key] = value
    try:
        import torch.utils.cpp_extension as cpp
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001
        return skip(f"torch.utils.cpp_extension not importable: {type(e).__name__}")
    if os.environ.get("CUDA_HOME"):
        cpp.CUDA_HOME = os.environ["CUDA_HOME"]  # in case it was imported before
    CUDA_HOME = cpp.CUDA_HOME
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not CUDA_HOME or not nvcc or not os.path.exists(nvcc):
        return skip("nvcc / CUDA_HOME not found")
    # hidden symbols: the host emulation (tests) compiles the same binding into another module;
    # with default visibility one module's calls could bind to the other's functions
    flags = ["-O3"]
    ext = CUDAExtension("ssbsn._C_conv", sources=["csrc/conv_binding.cpp", "csrc/conv_kernels.cu"],
                        extra_compile_args={"cxx": flags + ["-fvisibility=hidden"],
                                            "nvcc": flags + ["-lineinfo", "-Xcompiler",
                                                             "-fvisibility=hidden"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
