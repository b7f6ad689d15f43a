"""Checks of Triton kernels under the interpreter, the CPU's stand-in for compute-sanitizer:
every load, store and atomic of a launch must touch only the elements of that
launch's tensor arguments, and no result may depend on memory nobody wrote.

* Bounds: the interpreter's memory operations are wrapped so that each address a lane actually
  accesses (its mask on) is looked up in the extents of the launch's tensor arguments (first to
  last element, by the view's sizes and strides). An access outside all of them is recorded with
  the kernel, the operation and the nearest argument. On a GPU such an access faults or reads
  another tensor's data; under the interpreter it reads whatever the process has there.
* Uninitialised memory: every ``torch.empty`` (and ``empty_like``, ``empty_strided``,
  ``Tensor.new_empty``) comes filled with NaN (integers: their largest value), so a result built
  on memory no kernel wrote comes out NaN or different. On a CPU a fresh allocation is often
  zeroed pages, which can hide such a read; the GPU's caching allocator hands back stale data.
  (torch's own ``fill_uninitialized_memory`` needs ``torch.use_deterministic_algorithms``, which
  switches the op to its deterministic mode, so it cannot check the default mode.) Also numpy's
  ``empty`` and ``empty_like``; :func:`nan_filled_allocations` alone needs no Triton.
* Program order (:func:`program_order`): a launch's programs run reversed or shuffled instead
  of one by one in order, as a GPU may run them.

Usage: ``with memory_checked() as violations: ...; assert not violations``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Violation:
    kernel: str
    op: str
    count: int          # lanes outside every argument (not executed)
    first: int          # the first such address
    nearest: str        # where it lies against the nearest argument

    def __str__(self) -> str:
        return (f"{self.kernel}: {self.op} of {self.count} element(s) outside the arguments, "
                f"the first at {self.nearest}")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] a view spans (strides may be zero or negative)."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return t.data_ptr(), t.data_ptr()
        span = (size - 1) * stride
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    base = t.data_ptr()
    return base + lo * t.element_size(), base + (hi + 1) * t.element_size()


class _Launch:
    """The tensor arguments of the launch in progress: names and byte extents."""
    def __init__(self):
        self.kernel = "?"
        self.names: list[str] = []
        self.spans: list[tuple[int, int]] = []

    def set(self, kernel: str, named: list[tuple[str, torch.Tensor]]):
        self.kernel = kernel
        self.names = [n for n, _ in named]
        self.spans = [_extent(t) for _, t in named]

    def inside(self, addr: np.ndarray, nbytes: int) -> np.ndarray:
        """Per address (uint64): whether its ``nbytes`` lie in some argument's extent."""
        ok = np.zeros(addr.shape, bool)
        end = addr + np.uint64(nbytes)
        for lo, hi in self.spans:
            ok |= (addr >= np.uint64(lo)) & (end <= np.uint64(hi))
        return ok

    def nearest(self, addr: int) -> str:
        if not self.names:
            return "the launch has no tensor arguments"
        dist = [max(lo - addr, addr - hi + 1) for lo, hi in self.spans]
        i = int(np.argmin(dist))
        lo, hi = self.spans[i]
        return f"byte {addr - lo} of {self.names[i]}, which spans {hi - lo} B"


def _bytes(ptrs) -> int:
    ty = ptrs.get_element_ty()
    return max(ty.primitive_bitwidth // 8, 1)


@contextlib.contextmanager
def memory_checked(fill_uninitialized: bool = True):
    """Check every interpreted launch inside the block (see the module's docstring); yields the
    list the violations are appended to."""
    import triton.language as tl
    from triton.runtime import interpreter as I

    violations: list[Violation] = []
    launch = _Launch()
    builder = I.InterpreterBuilder
    saved = {name: getattr(builder, name) for name in (
        "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_init = I.GridExecutor._init_args_hst

    def check(op, ptrs, mask):
        """Records the lanes outside the arguments and returns the mask without them, so that
        the interpreter neither reads nor corrupts memory on their behalf."""
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        on = np.ones(addr.shape, bool) if mask is None else np.asarray(mask.data, dtype=bool)
        active = addr[on]
        if active.size == 0:
            return mask
        lo, hi = int(active.min()), int(active.max()) + _bytes(ptrs)
        if any(a <= lo and hi <= b for a, b in launch.spans):  # all in one argument: done
            return mask
        bad = on & ~launch.inside(addr, _bytes(ptrs))
        if bad.any():
            first = int(addr[bad].reshape(-1)[0])
            violations.append(Violation(launch.kernel, op, int(bad.sum()), first,
                                        launch.nearest(first)))
            on = on & ~bad
            if mask is None:
                mask = I.TensorHandle(on, tl.int1)
            else:
                mask = I.TensorHandle(on, mask.dtype)
        return mask

    def masked_load(self, ptrs, mask, other, *args):
        return saved["create_masked_load"](self, ptrs, check("load", ptrs, mask), other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        return saved["create_masked_store"](self, ptrs, value, check("store", ptrs, mask), *args)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *args):
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, check("atomic", ptr, mask),
                                          *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        if check("atomic_cas", ptr, None) is not None:  # no mask to drop lanes by: do not run it
            raise AssertionError(f"atomic_cas outside the arguments: {violations[-1]}")
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        names = list(self.arg_names)
        named = [(n, a) for n, a in zip(names, args_hst) if isinstance(a, torch.Tensor)]
        named += [(k, v) for k, v in kwargs_hst.items() if isinstance(v, torch.Tensor)]
        launch.set(getattr(self.fn, "__name__", "?"), named)
        return args_hst, kwargs_hst

    for name, fn in (("create_masked_load", masked_load), ("create_masked_store", masked_store),
                     ("create_atomic_rmw", atomic_rmw), ("create_atomic_cas", atomic_cas)):
        setattr(builder, name, fn)
    I.GridExecutor._init_args_hst = init_args
    try:
        with (nan_filled_allocations() if fill_uninitialized else contextlib.nullcontext()):
            yield violations
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        I.GridExecutor._init_args_hst = saved_init


@contextlib.contextmanager
def nan_filled_allocations():
    """Inside the block, ``torch.empty``, ``empty_like``, ``empty_strided``,
    ``Tensor.new_empty``, ``numpy.empty`` and ``numpy.empty_like`` return memory filled with NaN
    (floating point), the largest value (integers) or True (bool): what nothing should read
    before writing it. Allocations inside torch's and numpy's compiled code are not affected."""
    saved = [(torch, name, getattr(torch, name)) for name in ("empty", "empty_like",
                                                              "empty_strided")]
    saved += [(torch.Tensor, "new_empty", torch.Tensor.new_empty)]
    saved += [(np, name, getattr(np, name)) for name in ("empty", "empty_like")]
    for owner, name, fn in saved:
        setattr(owner, name, _filled(fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _filled(alloc):
    """``alloc`` returning its memory filled (see :func:`nan_filled_allocations`)."""
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if isinstance(t, np.ndarray):
            if t.dtype.kind in "fc":
                t.fill(np.nan)
            elif t.dtype.kind == "b":
                t.fill(True)
            elif t.dtype.kind in "iu":
                t.fill(np.iinfo(t.dtype).max)
        elif t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.numel():
            t.fill_(torch.iinfo(t.dtype).max)
        return t
    return wrapper


@contextlib.contextmanager
def program_order(order: str = "shuffled", seed: int | None = None):
    """Inside the block, the interpreter runs each launch's programs in another order:
    ``"reversed"`` (the last program first) or ``"shuffled"``: a random permutation drawn from
    ``seed``, another for each launch, or with ``seed=None`` one fixed per grid shape, so that
    running the same launches again repeats the same orders (and bits). A GPU runs the programs
    in any order and at once; a kernel whose result depends on the order (a program that
    assumes another ran first, a reduction by whoever arrives last) shows it here."""
    from triton.runtime import interpreter as I

    if order not in ("reversed", "shuffled"):
        raise ValueError(f"order must be 'reversed' or 'shuffled', not {order!r}")
    builder = I.InterpreterBuilder
    saved_dim, saved_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = np.random.default_rng(seed)
    perm: list = []

    def set_grid_dim(self, nx, ny, nz):
        saved_dim(self, nx, ny, nz)
        n = nx * ny * nz
        if order == "reversed":
            p = np.arange(n)[::-1]
        else:
            p = (rng if seed is not None else np.random.default_rng((nx, ny, nz))).permutation(n)
        perm[:] = [p]

    def set_grid_idx(self, x, y, z):
        _, ny, nz = self.grid_dim
        k = int(perm[0][(x * ny + y) * nz + z])
        saved_idx(self, k // (ny * nz), (k // nz) % ny, k % nz)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = saved_dim, saved_idx
