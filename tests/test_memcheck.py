"""tests/memcheck.py, the interpreter's memory check that tests/test_kernels.py runs every kernel
test under: it must report an access outside a launch's tensors (and not perform it), accept
every access inside them, and hand out NaN-filled memory from torch.empty and kin; its
program_order must really reorder a launch's programs."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
import ssbsn.kernels as kernels  # noqa: E402,F401  (selects the interpreter first, as the suite does)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from memcheck import memory_checked, program_order  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.INTERPRET,
                                reason="the memory check wraps Triton's interpreter")


@triton.jit
def _copy_add(X, Y, n, PAST: tl.constexpr, BEFORE: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = X[i] + 1 for i < n, then Y[i] += 1 by atomics; PAST lanes read and add one element
    past the end, BEFORE reads one element before X's start."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs - BEFORE, mask=offs < n + PAST)
    tl.store(Y + offs, x + 1.0, mask=offs < n)
    tl.atomic_add(Y + offs, 1.0, mask=offs < n + PAST)


def _guarded(n, fill):
    """A length-n view into a buffer with one guard element on each side."""
    buf = torch.full((n + 2,), fill)
    return buf, buf[1:n + 1]


def _checked_copy_add(past=0, before=0):
    """_copy_add of x = 0..9 into y, both views with guard elements (5 around x, -7 around y),
    under the check: (violations, y's buffer, y)."""
    xb, x = _guarded(10, 5.0)
    x.copy_(torch.arange(10.0))
    yb, y = _guarded(10, -7.0)
    with memory_checked() as violations:
        _copy_add[(1,)](x, y, 10, PAST=past, BEFORE=before, BLOCK=16)
    return violations, yb, y


def test_accesses_inside_the_arguments_pass():
    violations, yb, y = _checked_copy_add()
    assert violations == []
    assert torch.equal(y, torch.arange(10.0) + 2) and yb[0] == yb[-1] == -7.0


def test_an_access_past_the_end_is_reported_and_not_performed():
    violations, yb, y = _checked_copy_add(past=1)
    assert [(v.kernel, v.op, v.count) for v in violations] == [("_copy_add", "load", 1),
                                                                ("_copy_add", "atomic", 1)]
    assert "byte 40 of X, which spans 40 B" in str(violations[0])
    assert "byte 40 of Y, which spans 40 B" in str(violations[1])
    assert yb[-1] == -7.0, "the atomic past the end was performed"
    assert torch.equal(y, torch.arange(10.0) + 2)


def test_the_bounds_are_the_view_not_its_storage():
    """Reading the element before a view's first one is outside the argument even though the
    storage holds it."""
    violations, _, _ = _checked_copy_add(before=1)
    assert [(v.op, v.count) for v in violations] == [("load", 1)]
    assert "byte -4 of X" in str(violations[0])


def test_a_transposed_view_spans_its_extent():
    """A non-contiguous view (channels_last, transposed) spans from its first to its last
    element: a copy over every element of it passes."""
    x = torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2)
    y = torch.empty(24)
    with memory_checked() as violations:
        _copy_add[(1,)](x, y, 24, PAST=0, BEFORE=0, BLOCK=32)
    assert violations == []


def test_uninitialised_memory_is_nan_inside_and_restored_after():
    from triton.runtime import interpreter as I
    before = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty, np.empty,
              I.InterpreterBuilder.create_masked_load, I.GridExecutor._init_args_hst)
    with memory_checked():
        assert torch.isnan(torch.empty(3)).all()
        assert torch.isnan(torch.empty_like(torch.ones(2, 2))).all()
        assert torch.isnan(torch.ones(1).new_empty(4)).all()
        assert torch.isnan(torch.empty_strided((2, 2), (1, 2))).all()
        assert (torch.empty(3, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
        assert np.isnan(np.empty(3)).all() and np.isnan(np.empty_like(np.ones((2, 2)))).all()
        assert (np.empty(2, dtype=np.uint8) == 255).all()
        y = torch.empty(10)
        _copy_add[(1,)](torch.empty(10), y, 10, PAST=0, BEFORE=0, BLOCK=16)
        assert torch.isnan(y).all()  # a kernel that reads unwritten memory gives NaN
    after = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty, np.empty,
             I.InterpreterBuilder.create_masked_load, I.GridExecutor._init_args_hst)
    assert all(a is b for a, b in zip(before, after))


@triton.jit
def _arrival(COUNTER, ORDER):
    """ORDER[k] = the program that arrived k-th."""
    ticket = tl.atomic_add(COUNTER, 1)
    tl.store(ORDER + ticket, tl.program_id(0) * 6 + tl.program_id(1) * 3 + tl.program_id(2))


@pytest.mark.parametrize("order", [None, "reversed", "shuffled"])
def test_program_order(order):
    """The interpreter runs a launch's programs in order; program_order reverses or shuffles
    them over a 3-D grid, every program still once, with their own ids."""
    counter, arrived = torch.zeros(1, dtype=torch.int32), torch.full((24,), -1, dtype=torch.int32)
    with program_order(order) if order else contextlib.nullcontext():
        _arrival[(4, 2, 3)](counter, arrived)
    ids = arrived.tolist()
    assert sorted(ids) == list(range(24))
    if order is None:
        assert ids == list(range(24))
    elif order == "reversed":
        assert ids == list(range(23, -1, -1))
    else:
        assert ids not in (list(range(24)), list(range(23, -1, -1)))
        for seed in (None, 5):  # seed None: one order per grid shape, in every block
            runs = []
            for _ in range(2):
                with program_order(order, seed=seed):
                    for _ in range(2):
                        again = torch.full((24,), -1, dtype=torch.int32)
                        _arrival[(4, 2, 3)](torch.zeros(1, dtype=torch.int32), again)
                        runs.append(again.tolist())
            assert sorted(runs[0]) == list(range(24))
            # a seed: another order for each launch, the same sequence of orders in each block
            assert (runs[0] == runs[1]) is (seed is None) and runs[:2] == runs[2:], runs
