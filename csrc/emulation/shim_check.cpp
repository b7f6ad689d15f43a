// Conversion check of csrc/emulation/shim against the CUDA headers: prints a hash of the
// fp16/bf16 conversions over every 16-bit pattern and ~1M floats (ties and specials included).
// Built once with each set of headers, the two outputs must match (tests/test_conv_ext.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {
uint64_t hash_state = 1469598103934665603ull;
void mix(uint32_t v) { hash_state = (hash_state ^ v) * 1099511628211ull; }
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
void mix_float(float f) { mix(std::isnan(f) ? 0x7fc00000u : bits_of(f)); }
void mix_half(__half h) {
  const unsigned short x = static_cast<__half_raw>(h).x;
  mix(((x & 0x7c00u) == 0x7c00u && (x & 0x3ffu)) ? 0x7e00u : x);  // any nan counts as one
}
void mix_bf16(__nv_bfloat16 h) {
  const unsigned short x = static_cast<__nv_bfloat16_raw>(h).x;
  mix(((x & 0x7f80u) == 0x7f80u && (x & 0x7fu)) ? 0x7fc0u : x);
}
void convert(float f) {
  mix_half(__float2half_rn(f));
  mix_bf16(__float2bfloat16_rn(f));
}
}  // namespace

int main() {
  for (uint32_t u = 0; u < 65536; ++u) {
    __half_raw hr;
    hr.x = static_cast<unsigned short>(u);
    mix_float(__half2float(__half(hr)));
    __nv_bfloat16_raw br;
    br.x = static_cast<unsigned short>(u);
    mix_float(__bfloat162float(__nv_bfloat16(br)));
    // every half and bf16 value, and the midpoints next to it (ties), converted back
    const float h = __half2float(__half(hr)), b = __bfloat162float(__nv_bfloat16(br));
    convert(h);
    convert(b);
    convert(float_of(bits_of(h) + (1u << 12)));
    convert(float_of(bits_of(h) + (1u << 12) + 1u));
    convert(float_of(bits_of(b) + (1u << 15)));
    convert(float_of(bits_of(b) + (1u << 15) - 1u));
  }
  uint32_t x = 12345u;
  for (int i = 0; i < 1000000; ++i) {
    x = x * 1664525u + 1013904223u;
    convert(float_of(x));
  }
  const float specials[] = {0.f, -0.f, 65504.f, 65519.f, 65520.f, 1e-8f, 5.96e-8f, 2.98e-8f, 6.1e-5f, 3e38f,
                            INFINITY, -INFINITY, NAN};
  for (float f : specials) convert(f);
  std::printf("%016llx\n", static_cast<unsigned long long>(hash_state));
  return 0;
}
