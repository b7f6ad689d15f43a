// Host-only stand-in for <cuda_bf16.h> (see cuda_runtime.h here): bfloat16 storage with the
// conversions the kernels use, rounding to nearest even like the CUDA intrinsics.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __nv_bfloat16 {
  __nv_bfloat16() = default;
  __nv_bfloat16(const __nv_bfloat16_raw& r) : x(r.x) {}  // NOLINT: implicit, as in CUDA
  operator __nv_bfloat16_raw() const {                  // NOLINT
    __nv_bfloat16_raw r;
    r.x = x;
    return r;
  }
  unsigned short x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  __nv_bfloat16_raw r;
  if ((b & 0x7fffffffu) > 0x7f800000u) {
    r.x = 0x7fffu;  // nan
  } else {
    r.x = static_cast<unsigned short>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
  return __nv_bfloat16(r);
}
