// Plain C++ interface between the torch binding (conv_binding.cpp) and the kernels
// (conv_kernels.cu, or the host emulation in emulation/conv_host_api.cpp): raw pointers and
// ints only, no torch and no CUDA headers, so that either side compiles without the other.
//
// A "tap" convolution with `same` output size. For taps t with offsets (dy[t], dx[t]):
//
//   y[n, co, p] = act(bias[co] + sum_t sum_ci w[t, ci, co] * x[n, ci, p + (dy[t], dx[t])])
//
// with zero outside the image. The blind-spot masked k×k convolution is the k*k-1 taps
// (dy, dx) in [-k/2, k/2]^2 without (0, 0) -- the centre is absent, not multiplied by zero --
// and the dilated 3×3 convolution is the 9 taps d*(-1..1)^2. Tensors are dense, either NCHW
// or NHWC (torch.channels_last) as `nhwc` says, all in one dtype; accumulation is fp32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ssbsn_conv {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// kAlgoAuto: tensor cores (WMMA) for fp16/bf16 on sm_80+, FMA otherwise.
// kAlgoFma: CUDA-core FMA implicit GEMM (any dtype). kAlgoWmma: fp16/bf16 only.
enum Algo : int { kAlgoAuto = 0, kAlgoFma = 1, kAlgoWmma = 2 };

constexpr int kMaxTaps = 25;
constexpr int kMaxTapOffset = 1 << 16;

struct Taps {
  int count = 0;
  int dy[kMaxTaps] = {};
  int dx[kMaxTaps] = {};
};

// y = act(bias + conv(x, w)); x [N, Ci, H, W], w [taps.count, Ci, Co], y [N, Co, H, W].
struct ConvFwdArgs {
  int dtype = kFloat32;
  int nhwc = 0;
  int algo = kAlgoAuto;
  int N = 0, H = 0, W = 0, Ci = 0, Co = 0;
  Taps taps;
  const void* x = nullptr;
  const void* w = nullptr;
  const float* bias = nullptr;  // [Co] fp32, or null
  void* y = nullptr;
  int relu = 0;
};

// dw[t, ci, co] = sum_{n, p} x[n, ci, p + (dy[t], dx[t])] * dz[n, co, p]   (fp32 out)
// x [N, Ci, H, W], dz [N, Co, H, W], dw [taps.count, Ci, Co] fp32. The pixels are split into
// `splits` ranges; with splits > 1 each range writes its partial sums to `workspace`
// (splits * taps.count * Ci * Co floats) and a second kernel adds them in a fixed order:
// deterministic, no atomics.
struct ConvWgradArgs {
  int dtype = kFloat32;
  int nhwc = 0;
  int algo = kAlgoAuto;
  int N = 0, H = 0, W = 0, Ci = 0, Co = 0;
  Taps taps;
  const void* x = nullptr;
  const void* dz = nullptr;
  float* dw = nullptr;
  float* workspace = nullptr;
  int splits = 1;
};

// The ReLU and bias part of the backward, one pass over grad [N, C, H, W]:
//   dz = out ? grad * (out > 0) : grad      (dz written only when out is given)
//   db[c] = sum_{n, p} dz[n, c, p]         (fp32; only when db is given)
// Pixels are split into N * ceil(H*W / hw_chunk) chunks whose partial sums go to `workspace`
// (that many * C floats) and are added in a fixed order.
struct ReluGradBiasArgs {
  int dtype = kFloat32;
  int nhwc = 0;
  int N = 0, H = 0, W = 0, C = 0;
  const void* grad = nullptr;
  const void* out = nullptr;
  void* dz = nullptr;
  float* db = nullptr;
  float* workspace = nullptr;
  int hw_chunk = 0;
};

// Planning helpers (pure arithmetic, identical in every build).
int conv_wgrad_default_splits(const ConvWgradArgs& a, int num_sms);
std::size_t conv_wgrad_workspace_floats(const ConvWgradArgs& a);  // for a.splits
int relu_grad_bias_default_hw_chunk(int H, int W);
std::size_t relu_grad_bias_workspace_floats(const ReluGradBiasArgs& a);  // for a.hw_chunk

// Launches. CUDA build: asynchronous on `stream` (a cudaStream_t) on device `device`.
// Host emulation: runs the same kernel code on the CPU, synchronously; stream/device ignored.
// Each returns nullptr on success, otherwise a one-line error message (a static string).
const char* conv_fwd(const ConvFwdArgs& a, void* stream, int device);
const char* conv_wgrad(const ConvWgradArgs& a, void* stream, int device);
const char* relu_grad_bias(const ReluGradBiasArgs& a, void* stream, int device);

// "cuda" or "host-emulation".
const char* implementation();

}  // namespace ssbsn_conv
