"""Loader of the CUDA extension behind ``backend="cuda"`` of :mod:`ssbsn.nn.conv`.

Where it comes from, first match wins:

1. ``ssbsn._C_conv``, built by ``pip install`` when torch has CUDA and nvcc is found
   (setup.py ``cuda_extensions()``);
2. with ``SSBSN_CONV_JIT=1`` in the environment, a JIT build of ``csrc/`` through
   :func:`torch.utils.cpp_extension.load` (ninja), cached by torch -- see :func:`build_jit`;
3. none: :func:`conv_backend_info` says why, and ``backend="cuda"`` raises a one-line error.

:func:`build_host_emulation` builds the same binding around a CPU emulation of the kernels
(the real kernel code run thread by thread); the tests use it where no GPU exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch


def _csrc() -> Path:
    """The kernel sources: ssbsn/csrc/ in an installed package, csrc/ in a source checkout."""
    here = Path(__file__).resolve().parents[1]
    installed = here / "csrc"
    return installed if (installed / "conv_binding.cpp").is_file() else here.parent / "csrc"


CSRC = _csrc()
ALGOS = {"auto": 0, "fma": 1, "wmma": 2}
_BUILD_FLAGS = ["-O3"]  # the C++ standard is torch's choice (its headers need it)
# Every build keeps its symbols to itself: the CUDA build and the host emulation compile the same
# binding and the same ssbsn_conv:: entry points, and both may be loaded in one process (the
# tests); with default visibility the second module's calls could bind to the first's.
_HIDDEN = "-fvisibility=hidden"


class ConvOps:
    """Tensor-level calls into one build of the extension (see csrc/conv_binding.cpp).

    ``device_type`` is the kind of tensor the build takes: ``"cuda"``, or ``"cpu"`` for the host
    emulation. Kernels run on torch's current stream of the tensors' device.
    """

    def __init__(self, module, origin: str, device_type: str = "cuda", emulated_sms: int = 4):
        self.module = module
        self.origin = origin
        self.device_type = device_type
        self.emulated_sms = emulated_sms
        self._sms: dict[int, int] = {}

    def _where(self, t: torch.Tensor) -> tuple[int, int]:
        if self.device_type != "cuda":
            return 0, -1
        return torch.cuda.current_stream(t.device).cuda_stream, t.device.index

    def _num_sms(self, t: torch.Tensor) -> int:
        if self.device_type != "cuda":
            return self.emulated_sms
        idx = t.device.index
        if idx not in self._sms:
            self._sms[idx] = torch.cuda.get_device_properties(t.device).multi_processor_count
        return self._sms[idx]

    # The binding returns its errors ("" = none) instead of throwing them (csrc/conv_binding.cpp
    # says why); they are raised here.
    def conv_fwd(self, x, w, bias, y, dys, dxs, relu: bool, nhwc: bool, algo: int) -> None:
        """y = act(bias + Σ_t w[t]ᵀ·x(shifted by tap t)); w [taps, Ci, Co], bias fp32 or None."""
        _raise(self.module.conv_fwd(x, w, bias, y, list(dys), list(dxs), relu, nhwc, algo,
                                    *self._where(x)))

    def conv_wgrad(self, x, dz, dw, dys, dxs, nhwc: bool, algo: int, splits: int = 0) -> None:
        """dw[t, ci, co] (fp32) = Σ_pixels x(shifted by tap t)[ci] · dz[co]; splits 0 = auto."""
        _raise(self.module.conv_wgrad(x, dz, dw, list(dys), list(dxs), nhwc, algo, splits,
                                      self._num_sms(x), *self._where(x)))

    def relu_grad_bias(self, grad, out, dz, db, nhwc: bool, hw_chunk: int = 0) -> None:
        """dz = grad·(out > 0) when out is given; db (fp32) = Σ dz over N, H, W when given."""
        _raise(self.module.relu_grad_bias(grad, out, dz, db, nhwc, hw_chunk, *self._where(grad)))

    def implementation(self) -> str:
        return self.module.implementation()


def _raise(error) -> None:
    """The binding's error message as a RuntimeError (an empty message: no error)."""
    if error:
        raise RuntimeError(error)


_ops: ConvOps | None = None
_reason: str | None = None
_loaded = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _load() -> tuple[ConvOps | None, str | None]:
    if torch.version.cuda is None:
        return None, "CUDA extension not built: torch is a CPU build"
    if importlib.util.find_spec("ssbsn._C_conv") is not None:
        try:
            return ConvOps(importlib.import_module("ssbsn._C_conv"), "built extension ssbsn._C_conv"), None
        except ImportError as e:
            return None, f"CUDA extension ssbsn._C_conv does not import ({_first_line(e)})"
    if os.environ.get("SSBSN_CONV_JIT") == "1":
        try:
            return _jit_ops(verbose=False), None
        except Exception as e:  # noqa: BLE001 -- any build failure becomes the reason
            return None, f"JIT build of csrc/ failed ({_first_line(e)})"
    return None, ("CUDA extension not built: reinstall (pip install -e .) with nvcc present, "
                  "or set SSBSN_CONV_JIT=1")


def get_ops() -> ConvOps | None:
    """The extension's operations, or None (then :func:`unavailable_reason` says why)."""
    global _ops, _reason, _loaded
    if not _loaded:
        _ops, _reason = _load()
        _loaded = True
    return _ops


def unavailable_reason() -> str | None:
    get_ops()
    return _reason


def require_ops(x: torch.Tensor) -> ConvOps:
    """The operations for tensors like ``x``, or a one-line RuntimeError."""
    ops = get_ops()
    if ops is None:
        raise RuntimeError(f"conv backend 'cuda' is unavailable: {_reason}; use backend='torch'")
    if x.device.type != ops.device_type:
        raise RuntimeError(f"conv backend 'cuda' needs {ops.device_type} tensors, got a tensor on {x.device}")
    return ops


def conv_backend_info() -> str:
    """Which implementation ``backend="cuda"`` gets here, and why: ``"cuda (...)"`` when the
    extension is loaded and a GPU is visible, else ``"torch (<reason>)"``."""
    ops = get_ops()
    if ops is None:
        return f"torch ({_reason})"
    if ops.device_type == "cuda" and not torch.cuda.is_available():
        return f"torch (CUDA extension loaded from {ops.origin}, but no CUDA device is visible)"
    where = torch.cuda.get_device_name() if ops.device_type == "cuda" else "CPU"
    return f"cuda ({ops.origin}, {ops.implementation()} on {where})"


def _ninja_on_path() -> None:
    """torch's JIT builds look ninja up on PATH; a virtual environment used without activation
    has it next to the interpreter only."""
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def _jit_ops(verbose: bool) -> ConvOps:
    if torch.version.cuda is None:
        raise RuntimeError("the CUDA extension needs a CUDA build of torch (this one is a CPU build)")
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    module = load(name="ssbsn_conv_jit",
                  sources=[str(CSRC / "conv_binding.cpp"), str(CSRC / "conv_kernels.cu")],
                  extra_cflags=_BUILD_FLAGS + [_HIDDEN],
                  extra_cuda_cflags=_BUILD_FLAGS + ["-lineinfo", "-Xcompiler", _HIDDEN],
                  verbose=verbose)
    return ConvOps(module, "JIT build of csrc/")


def build_jit(verbose: bool = False) -> ConvOps:
    """Compile csrc/ now with torch.utils.cpp_extension (ninja; for development from a source
    checkout) and make it the active build. Architectures: ``TORCH_CUDA_ARCH_LIST`` or the
    visible GPUs'."""
    global _ops, _reason, _loaded
    ops = _jit_ops(verbose)
    _ops, _reason, _loaded = ops, None, True
    return ops


def cuda_include_dir() -> str | None:
    """A CUDA toolkit include directory (with cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return str(Path(c) / "include")
    return None


def build_host_emulation(verbose: bool = False, use_shim: bool | None = None) -> ConvOps:
    """Build the binding around the host emulation of the kernels (testing only: slow; takes
    CPU tensors). It is not made the active build: pass it where ops are expected.

    The emulation needs the CUDA headers for ``__half`` and ``__nv_bfloat16``; without a CUDA
    toolkit (``use_shim=None``) or on request (``True``) it uses csrc/emulation/shim instead, a
    host-only stand-in whose conversions match the headers' bit for bit."""
    inc = None if use_shim else cuda_include_dir()
    if inc is None and use_shim is False:
        raise RuntimeError("the host emulation with use_shim=False needs the CUDA headers (cuda_fp16.h); "
                           "set CUDA_HOME")
    name, headers = "ssbsn_conv_host_emulation", "CUDA headers"
    if inc is None:
        inc, name, headers = str(CSRC / "emulation" / "shim"), name + "_shim", "CUDA type shim"
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    module = load(name=name,
                  sources=[str(CSRC / "conv_binding.cpp"), str(CSRC / "emulation" / "conv_host_api.cpp")],
                  extra_cflags=["-O2", _HIDDEN, "-DSSBSN_CONV_HOST_EMULATION", f"-I{inc}"],
                  verbose=verbose)
    return ConvOps(module, f"host emulation of csrc/ kernels ({headers})", device_type="cpu")
