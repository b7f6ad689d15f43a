"""The CUDA extension's tap convolution as ``torch.library`` custom ops (``ssbsn::tap_conv*``).

A *tap convolution* is y = act(bias + Σ_t w[:, :, t]ᵀ · x shifted by (dy_t, dx_t)): the masked
k×k conv is the k²−1 offsets around the centre, the dilated 3×3 conv the 9 offsets d·(−1..1)²
(see :mod:`ssbsn.nn.conv`). The taps are given as three int lists: ``dy``, ``dx`` and
``window``, the taps' positions in the weight's flattened k×k window.

Ops (all functional; each has a fake kernel, so ``torch.compile(fullgraph=True)`` traces
through them without a graph break):

* ``ssbsn::tap_conv(x, weight, bias?, dy, dx, window, relu, algo) -> y`` -- the forward, with
  autograd (the backward calls the ops below);
* ``ssbsn::tap_conv_input_grad(dz, weight, dy, dx, window, algo) -> dx``;
* ``ssbsn::tap_conv_weight_grad(x, dz, weight, dy, dx, window, algo) -> dw`` (deterministic,
  accumulated in fp32, returned in the weight's dtype and (Co, Ci, k, k) layout, centre or
  unused window positions 0);
* ``ssbsn::tap_conv_relu_grad(grad, out) -> dz = grad·(out > 0)``;
* ``ssbsn::tap_conv_bias_grad(dz) -> db`` (fp32, Σ over N, H, W);
* ``ssbsn::tap_conv_relu_bias_grad(grad, out) -> (dz, db)`` (both in one pass).

Tensors are NCHW-contiguous or channels_last (``y`` takes ``x``'s layout). The kernels run on
the build :func:`ssbsn.nn._cuda_ext.require_ops` returns for the tensors' device: the CUDA
extension, or (CPU tensors) the host emulation when a test has made it the active build.

The kernels take the weight packed as [taps, Ci, Co] (forward) or [taps, Co, Ci] (input
gradient); the packed copy is cached per weight tensor and reused while the weight's storage
and version counter (``_version``, bumped by every in-place update such as an optimizer step)
are unchanged, so inference packs each weight once.
"""
from __future__ import annotations

import weakref

import torch

from . import _cuda_ext

_PACK_CACHE_MAX = 512
_pack_cache: dict[tuple, tuple] = {}


def _forget(key):
    def callback(_ref):
        _pack_cache.pop(key, None)
    return callback


def packed_weight(weight: torch.Tensor, window: list[int], transposed: bool) -> torch.Tensor:
    """``weight`` (Co, Ci, k, k) at the ``window`` positions as [taps, Ci, Co] (or [taps, Co, Ci]
    with ``transposed``), contiguous; cached while the weight's data and version are unchanged
    (an inference tensor has no version counter: it is packed every time)."""
    key = (id(weight), tuple(window), transposed)
    try:
        stamp = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
                 tuple(weight.shape), tuple(weight.stride()))
    except RuntimeError:  # an inference-mode tensor
        stamp = None
    hit = _pack_cache.get(key)
    if stamp is not None and hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    co, ci = weight.shape[:2]
    idx = torch.tensor(window, dtype=torch.long, device=weight.device)
    taps = weight.detach().reshape(co, ci, -1).index_select(2, idx)
    packed = taps.permute(2, 0, 1).contiguous() if transposed else taps.permute(2, 1, 0).contiguous()
    if stamp is None:
        return packed
    if len(_pack_cache) >= _PACK_CACHE_MAX:
        _pack_cache.clear()
    _pack_cache[key] = (weakref.ref(weight, _forget(key)), stamp, packed)
    return packed


def _is_nhwc(x: torch.Tensor) -> bool:
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return x.stride(1) == 1 and x.shape[1] > 1


def _fmt(nhwc: bool):
    return torch.channels_last if nhwc else torch.contiguous_format


def _new_output(t: torch.Tensor, channels: int, nhwc: bool) -> torch.Tensor:
    """An empty (N, channels, H, W) tensor in t's dtype and device, NHWC or NCHW."""
    n, _, h, w = t.shape
    return torch.empty((n, channels, h, w), dtype=t.dtype, device=t.device,
                       memory_format=_fmt(nhwc))


def _forward(t: torch.Tensor, weight: torch.Tensor, transposed: bool, bias, channels: int,
             dy: list[int], dx: list[int], window: list[int], relu: bool, algo: int
             ) -> torch.Tensor:
    """The extension's forward tap-conv of t into a new tensor of ``channels`` channels in t's
    layout (the op itself, and its input gradient with transposed weights)."""
    ops = _cuda_ext.require_ops(t)
    nhwc = _is_nhwc(t)
    t = t.contiguous(memory_format=_fmt(nhwc))
    out = _new_output(t, channels, nhwc)
    if out.numel():
        ops.conv_fwd(t, packed_weight(weight, window, transposed), bias, out, dy, dx, relu,
                     nhwc, algo)
    return out


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("ssbsn::tap_conv", mutates_args=())
def tap_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dy: list[int],
             dx: list[int], window: list[int], relu: bool, algo: int) -> torch.Tensor:
    """y = act(bias + tap-conv(x, weight)), in x's layout; bias is applied in fp32."""
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return _forward(x, weight, False, b, weight.shape[0], dy, dx, window, relu, algo)


@tap_conv.register_fake
def _(x, weight, bias, dy, dx, window, relu, algo):
    return _new_output(x, weight.shape[0], _is_nhwc(x))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("ssbsn::tap_conv_input_grad", mutates_args=())
def tap_conv_input_grad(dz: torch.Tensor, weight: torch.Tensor, dy: list[int], dx: list[int],
                        window: list[int], algo: int) -> torch.Tensor:
    """∂L/∂x: the forward on dz with the negated taps and w[t, co, ci]."""
    return _forward(dz, weight, True, None, weight.shape[1], [-d for d in dy],
                    [-d for d in dx], window, False, algo)


@tap_conv_input_grad.register_fake
def _(dz, weight, dy, dx, window, algo):
    return _new_output(dz, weight.shape[1], _is_nhwc(dz))


@torch.library.custom_op("ssbsn::tap_conv_weight_grad", mutates_args=())
def tap_conv_weight_grad(x: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor, dy: list[int],
                         dx: list[int], window: list[int], algo: int) -> torch.Tensor:
    """∂L/∂weight (weight's dtype and shape): Σ_pixels x(shifted by tap t)[ci] · dz[co] in fp32."""
    ops = _cuda_ext.require_ops(x)
    nhwc = _is_nhwc(x)
    x = x.contiguous(memory_format=_fmt(nhwc))
    dz = dz.to(x.dtype).contiguous(memory_format=_fmt(nhwc))
    co, ci, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    full = torch.zeros((co, ci, k * k), dtype=torch.float32, device=x.device)
    if x.shape[0] * x.shape[2] * x.shape[3]:
        dwp = torch.empty((len(dy), ci, co), dtype=torch.float32, device=x.device)
        ops.conv_wgrad(x, dz, dwp, dy, dx, nhwc, algo)
        idx = torch.tensor(window, dtype=torch.long, device=x.device)
        full.index_copy_(2, idx, dwp.permute(2, 1, 0))
    return full.view(co, ci, k, k).to(weight.dtype)


@tap_conv_weight_grad.register_fake
def _(x, dz, weight, dy, dx, window, algo):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.custom_op("ssbsn::tap_conv_relu_grad", mutates_args=())
def tap_conv_relu_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grad · (out > 0), in grad's layout (grad and out share dtype and layout)."""
    ops = _cuda_ext.require_ops(grad)
    nhwc = _is_nhwc(grad)
    dz = torch.empty_like(grad, memory_format=_fmt(nhwc))
    if dz.numel():
        ops.relu_grad_bias(grad, out, dz, None, nhwc)
    return dz


@tap_conv_relu_grad.register_fake
def _(grad, out):
    return torch.empty_like(grad, memory_format=_fmt(_is_nhwc(grad)))


@torch.library.custom_op("ssbsn::tap_conv_bias_grad", mutates_args=())
def tap_conv_bias_grad(dz: torch.Tensor) -> torch.Tensor:
    """Σ dz over N, H, W, fp32 (C,)."""
    ops = _cuda_ext.require_ops(dz)
    db = torch.zeros(dz.shape[1], dtype=torch.float32, device=dz.device)
    if dz.numel():
        ops.relu_grad_bias(dz, None, None, db, _is_nhwc(dz))
    return db


@tap_conv_bias_grad.register_fake
def _(dz):
    return dz.new_empty((dz.shape[1],), dtype=torch.float32)


@torch.library.custom_op("ssbsn::tap_conv_relu_bias_grad", mutates_args=())
def tap_conv_relu_bias_grad(grad: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad · (out > 0), its fp32 sum over N, H, W) in one pass."""
    ops = _cuda_ext.require_ops(grad)
    nhwc = _is_nhwc(grad)
    dz = torch.empty_like(grad, memory_format=_fmt(nhwc))
    db = torch.zeros(grad.shape[1], dtype=torch.float32, device=grad.device)
    if dz.numel():
        ops.relu_grad_bias(grad, out, dz, db, nhwc)
    return dz, db


@tap_conv_relu_bias_grad.register_fake
def _(grad, out):
    return (torch.empty_like(grad, memory_format=_fmt(_is_nhwc(grad))),
            grad.new_empty((grad.shape[1],), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# autograd of ssbsn::tap_conv
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, dy, dx, window, relu, algo = inputs
    nhwc = _is_nhwc(x)
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conf = (dy, dx, window, relu, algo, nhwc, None if bias is None else bias.dtype)


def _backward(ctx, gy):
    x, weight, y = ctx.saved_tensors
    dy, dx, window, relu, algo, nhwc, bias_dtype = ctx.conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    x = x.contiguous(memory_format=_fmt(nhwc))
    g = gy.to(x.dtype).contiguous(memory_format=_fmt(nhwc))
    dz, db = g, None
    if relu and need_b:
        dz, db = torch.ops.ssbsn.tap_conv_relu_bias_grad(g, y)
    elif relu:
        dz = torch.ops.ssbsn.tap_conv_relu_grad(g, y)
    elif need_b:
        db = torch.ops.ssbsn.tap_conv_bias_grad(g)
    grad_x = torch.ops.ssbsn.tap_conv_input_grad(dz, weight, dy, dx, window, algo) if need_x else None
    grad_w = torch.ops.ssbsn.tap_conv_weight_grad(x, dz, weight, dy, dx, window, algo) if need_w else None
    grad_b = db.to(bias_dtype) if need_b else None
    return grad_x, grad_w, grad_b, None, None, None, None, None


torch.library.register_autograd("ssbsn::tap_conv", _backward, setup_context=_setup_context)
