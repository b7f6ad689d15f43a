// Host-only stand-in for <cuda_fp16.h> (see cuda_runtime.h here): IEEE binary16 storage with
// the conversions the kernels use, rounding to nearest even like the CUDA intrinsics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half_raw {
  unsigned short x;
};

struct __half {
  __half() = default;
  __half(const __half_raw& r) : x(r.x) {}  // NOLINT: implicit, as in CUDA
  operator __half_raw() const {           // NOLINT
    __half_raw r;
    r.x = x;
    return r;
  }
  unsigned short x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  uint32_t bits;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    const float v = std::ldexp(static_cast<float>(m), -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (e == 31) {  // inf, or nan (canonical, as the CUDA host code returns it)
    bits = m ? 0x7fffffffu : sign | 0x7f800000u;
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  uint32_t h;
  if (a >= 0x7f800000u) {
    h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan (quiet) / inf
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // >= 65520 rounds to inf
  } else if (a < 0x38800000u) {  // below 2^-14: subnormal (or the smallest normal by rounding)
    float v;
    std::memcpy(&v, &a, 4);
    h = static_cast<uint32_t>(std::nearbyint(v * 16777216.0f));  // v * 2^24, ties to even
  } else {
    h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves the exponent
  }
  __half_raw r;
  r.x = static_cast<unsigned short>(sign | h);
  return __half(r);
}
