"""The SDPA path (the CPU memory-efficient backend of SS-Attention) against the reference."""
from __future__ import annotations

import pytest
import torch

from ssbsn.attention import SSAttention, ss_attention
from ssbsn.attention.reference import ss_attention_reference
from ssbsn.attention.sdpa import ss_attention_sdpa

from helpers import attention_inputs, run_grads


@pytest.mark.parametrize("grid", [4, 6])
@pytest.mark.parametrize("group_stats", [False, True])
def test_sdpa_matches_reference(grid, group_stats):
    """1×32×70×66: ragged for g = 4 (70 = 17·4 + 2) and g = 6 (70 = 11·6 + 4, 66 = 11·6)."""
    x64, w64 = attention_inputs((1, 32, 70, 66))
    go = torch.randn_like(x64)
    def reference(a, b):
        return ss_attention_reference(a, b, grid, group_stats=group_stats)
    ref = run_grads(reference, x64, w64, go)
    ref32 = run_grads(reference, x64.float(), w64.float(), go.float())
    ours = run_grads(lambda a, b: ss_attention_sdpa(a, b, grid, group_stats), x64.float(),
                     w64.float(), go.float())
    for name, a, r32, r in zip(("out", "dx", "dw"), ours, ref32, ref):
        err = (a.double() - r).abs().max().item()
        base = (r32.double() - r).abs().max().item()
        assert err <= 2 * base + 2e-6 * r.abs().max().item(), f"{name}: {err:.3e} vs {base:.3e}"


def test_sdpa_float64_is_exact_math():
    x, w = attention_inputs((2, 16, 13, 11))
    go = torch.randn_like(x)
    for a, r in zip(run_grads(lambda a, b: ss_attention_sdpa(a, b, 4), x, w, go),
                    run_grads(lambda a, b: ss_attention_reference(a, b, 4), x, w, go)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_half_precision_ragged(dtype):
    """fp16/bf16 on a ragged shape: finite (the plain reference's q/(‖q‖+1e-8) is 0/0 = NaN at
    padded tokens in fp16) and close to the fp64 reference."""
    x64, w64 = attention_inputs((1, 16, 13, 11))
    go = torch.randn_like(x64)
    ref = run_grads(lambda a, b: ss_attention_reference(a, b, 4), x64, w64, go)
    ours = run_grads(lambda a, b: ss_attention_sdpa(a, b, 4), x64.to(dtype), w64.to(dtype),
                     go.to(dtype))
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for name, a, r in zip(("out", "dx", "dw"), ours, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = (a.double() - r).abs().max().item()
        assert err <= tol * r.abs().max().item(), f"{name}: {err:.3e}"


def test_sdpa_uses_flash_kernel_without_nxn():
    """Forward and backward go through SDPA's CPU flash kernel; no softmax over an N×N matrix."""
    x, w = attention_inputs((1, 32, 70, 66), dtype=torch.float32)
    x.requires_grad_()
    with torch.profiler.profile() as prof:
        ss_attention_sdpa(x, w, 4).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert not names & {"aten::_softmax", "aten::softmax", "aten::bmm", "aten::baddbmm"}


def test_functional_backends_agree():
    x, w = attention_inputs((2, 16, 9, 10), dtype=torch.float32)
    ref = ss_attention(x, w, 4, backend="reference")
    torch.testing.assert_close(ss_attention(x, w, 4, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ss_attention(x, w, 4, backend="fused"), ref, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_fused_module_cpu():
    """torch.compile(fullgraph=True) of SSAttention(fused=True) on CPU (the SDPA path). aot_eager
    traces forward and backward as inductor does, so a graph break fails it, without paying for
    code generation."""
    torch.manual_seed(0)
    m = SSAttention(16, 4, fused=True, group_stats=True)
    x = torch.randn(1, 16, 13, 11) + 1.0
    xe = x.clone().requires_grad_()
    eager = m(xe)
    eager.sum().backward()
    gw_eager = m.wqk.grad.clone()
    m.wqk.grad = None
    xc = x.clone().requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(xc)  # fullgraph is the point
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.wqk.grad, gw_eager, rtol=1e-5, atol=1e-5)


def test_fused_takes_sdpa_only_inside_compile_at_small_groups():
    """backend "fused" on CUDA: the SDPA formulation inside torch.compile for groups of at most
    COMPILED_SDPA_MAX_TOKENS tokens (measured faster there on an H200), the kernels otherwise."""
    from ssbsn.attention.functional import COMPILED_SDPA_MAX_TOKENS, compiled_prefers_sdpa
    train, sidd = torch.empty(4, 8, 140, 140), torch.empty(1, 8, 264, 264)  # N = 1225, 4356 at g = 4
    assert compiled_prefers_sdpa(train, 4, False, compiling=True)
    assert compiled_prefers_sdpa(train, 6, False, compiling=True)  # N = 576
    assert not compiled_prefers_sdpa(sidd, 4, False, compiling=True)
    assert not compiled_prefers_sdpa(train, 4, False, compiling=False)
    assert not compiled_prefers_sdpa(train, 4, True, compiling=True)  # deterministic keeps kernels
    edge = torch.empty(1, 8, 4 * 32, 4 * 64)  # exactly the limit at g = 4
    assert 32 * 64 == COMPILED_SDPA_MAX_TOKENS
    assert compiled_prefers_sdpa(edge, 4, False, compiling=True)
    assert not compiled_prefers_sdpa(torch.empty(1, 8, 4 * 32, 4 * 64 + 1), 4, False, compiling=True)
    assert not compiled_prefers_sdpa(train, 4, False)  # eager: torch.compiler.is_compiling() is False
