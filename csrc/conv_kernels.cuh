// Blind-spot tap convolutions (see conv_api.h for the maths): implicit-GEMM kernels for the
// forward (also used for the input gradient), the weight gradient, and the ReLU/bias part of
// the backward. Plain CUDA C++ on raw pointers: no ATen/c10.
//
// Every kernel is written as a *block program*: a struct whose member functions are the
// pieces one thread (or one warp) executes between two barriers. The CUDA driver runs them
// with __syncthreads() in between; the host driver (used by the emulation build, g++ only)
// runs the same functions for every thread of a block in turn, one phase after the other, so
// that the index arithmetic, tiling, tails, layouts and epilogues of the real kernels are
// exercised on a CPU. Warp-collective tensor-core operations (WMMA) are replaced on the host
// by their documented meaning (load/store with ldm and layout, D = A*B + C in fp32).
//
// GEMM view: M = pixels (N*H*W), N = output channels, K = taps x input channels.
//   forward : A[m, k=(t, ci)] = x[pixel m shifted by tap t, ci],   B[k, n] = w[t, ci, n]
//   dgrad   : the forward with x := dz, negated tap offsets and w[t, co, ci]
//   wgrad   : per tap, A[m=ci, k=pixel] = x[pixel + tap, ci],  B[k=pixel, n=co] = dz[pixel, co],
//             the pixels split into ranges, partial sums reduced in a fixed order.
// Tiles are 128 x 128 (M x N) per 256-thread block; K steps of 16 (FMA) or 32 (WMMA; 16 for
// the NCHW weight gradient), register-staged double buffering in shared memory (one barrier
// per K step).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__CUDACC__)
#include <mma.h>
#else
#include <cmath>
#include <memory>
#include <vector>
#endif

#include "conv_api.h"

#define SSBSN_HD __host__ __device__ __forceinline__

#if defined(__CUDA_ARCH__)  // device pass only: host compilers warn on unknown pragmas
#define SSBSN_UNROLL _Pragma("unroll")
#define SSBSN_UNROLL4 _Pragma("unroll 4")
#define SSBSN_NO_UNROLL _Pragma("unroll 1")
#else
#define SSBSN_UNROLL
#define SSBSN_UNROLL4
#define SSBSN_NO_UNROLL
#endif

// Tensor-core code is compiled for sm_80+ only (bf16 WMMA needs it); older archs get a trap,
// and the dispatcher never selects WMMA there.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define SSBSN_WMMA_DEVICE 1
#else
#define SSBSN_WMMA_DEVICE 0
#endif

namespace ssbsn_conv {
namespace impl {

// ------------------------------------------------------------------------------------------
// Scalars
// ------------------------------------------------------------------------------------------
SSBSN_HD float to_f(float v) { return v; }
SSBSN_HD float to_f(__half v) { return __half2float(v); }
SSBSN_HD float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> SSBSN_HD T from_f(float v);
template <> SSBSN_HD float from_f<float>(float v) { return v; }
template <> SSBSN_HD __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> SSBSN_HD __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element conversion between storage types (identity when equal, through fp32 otherwise).
template <typename D, typename S> SSBSN_HD D cvt(S v) {
  if constexpr (std::is_same<D, S>::value) return v;
  else return from_f<D>(to_f(v));
}

#if !defined(__CUDA_ARCH__)
// Host emulation: a device access whose alignment the hardware requires (16-byte vectors,
// 32-byte WMMA fragment pointers) is checked and counted here; the launch then fails.
inline int& host_alignment_faults() {
  static thread_local int faults = 0;
  return faults;
}
inline void host_check_aligned(const void* p, std::uintptr_t bytes) {
  if ((reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) != 0) ++host_alignment_faults();
}
#endif

// 16-byte copy between 16-byte aligned addresses.
SSBSN_HD void copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  host_check_aligned(dst, 16);
  host_check_aligned(src, 16);
  std::memcpy(dst, src, 16);
#endif
}

SSBSN_HD long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// Bit patterns of the element types (16-bit types in the low half of a 32-bit word).
SSBSN_HD uint32_t to_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}
SSBSN_HD uint32_t to_bits(__half v) { return static_cast<__half_raw>(v).x; }
SSBSN_HD uint32_t to_bits(__nv_bfloat16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
template <typename T> SSBSN_HD T from_bits(uint32_t u);
template <> SSBSN_HD float from_bits<float>(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}
template <> SSBSN_HD __half from_bits<__half>(uint32_t u) {
  __half_raw r;
  r.x = static_cast<unsigned short>(u);
  return __half(r);
}
template <> SSBSN_HD __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t u) {
  __nv_bfloat16_raw r;
  r.x = static_cast<unsigned short>(u);
  return __nv_bfloat16(r);
}

// N staged elements of type T in registers between a global load and a shared-memory store,
// two 16-bit elements per 32-bit word (scalar 16-bit loads would otherwise take a register
// each). Elements are written in pairs (set2) or runs of 16 bytes (load_run, vec; i a
// multiple of 16 / sizeof(T)).
template <typename T, int N>
struct Stage {
  static constexpr bool k16 = sizeof(T) == 2;
  static_assert(N % 2 == 0, "elements are staged in pairs");
  static constexpr int kWords = k16 ? N / 2 : N;
  alignas(16) uint32_t w[kWords];
  SSBSN_HD T get(int i) const {
    if (k16) return from_bits<T>(w[i >> 1] >> ((i & 1) * 16));
    return from_bits<T>(w[i]);
  }
  SSBSN_HD void set2(int i, T a, T b) {  // elements i (even) and i + 1
    if (k16) {
      w[i >> 1] = to_bits(a) | (to_bits(b) << 16);
    } else {
      w[i] = to_bits(a);
      w[i + 1] = to_bits(b);
    }
  }
  SSBSN_HD void* vec(int i) { return &w[k16 ? i >> 1 : i]; }
  SSBSN_HD const void* vec(int i) const { return &w[k16 ? i >> 1 : i]; }
  // Elements [i, i + V) from the run s[0, V), V = 16 / sizeof(T): the first `valid` are real,
  // the rest zeros (s is not read when valid <= 0). One 16-byte load when use_vec, which the
  // caller grants only when a valid run is whole and 16-byte aligned.
  SSBSN_HD void load_run(int i, const T* s, int valid, bool use_vec) {
    constexpr int V = static_cast<int>(16 / sizeof(T));
    if (valid > 0 && use_vec) {
      copy16(vec(i), s);
      return;
    }
    const T zero = from_f<T>(0.f);
SSBSN_UNROLL
    for (int e = 0; e < V; e += 2) set2(i + e, e < valid ? s[e] : zero, e + 1 < valid ? s[e + 1] : zero);
  }
};

// ------------------------------------------------------------------------------------------
// Geometry: pixels p = (n*H + y)*W + x, p in [0, P); rem = y*W + x.
// ------------------------------------------------------------------------------------------
// The dispatcher guarantees P < 2^31 (pixel indices and their divisions are 32-bit; element
// offsets are 64-bit).
struct Geom {
  int H, W, HW;
  long long P;
};

SSBSN_HD Geom make_geom(int N, int H, int W) {
  Geom g;
  g.H = H;
  g.W = W;
  g.HW = H * W;
  g.P = static_cast<long long>(N) * g.HW;
  return g;
}

SSBSN_HD void split_pixel(const Geom& g, long long p, int& n, int& rem) {
  const int pi = static_cast<int>(p);
  n = pi / g.HW;
  rem = pi - n * g.HW;
}

// Pixel p (valid when p < p_end) shifted by (dy, dx): false when outside the range or the
// image, else its image n and in-image index rem.
SSBSN_HD bool locate(const Geom& g, long long p, long long p_end, int dy, int dx, int& n,
                     int& rem) {
  if (p >= p_end) return false;
  int r;
  split_pixel(g, p, n, r);
  const int y0 = r / g.W;
  const int y = y0 + dy;
  const int x = r - y0 * g.W + dx;
  if (static_cast<unsigned>(y) >= static_cast<unsigned>(g.H) ||
      static_cast<unsigned>(x) >= static_cast<unsigned>(g.W))
    return false;
  rem = y * g.W + x;
  return true;
}

// Offset of element (n, c, rem) of a dense [N, C, H, W] tensor in either layout.
template <bool NHWC>
SSBSN_HD long long elem_off(int n, int rem, int c, int C, int HW) {
  if (NHWC) return (static_cast<long long>(n) * HW + rem) * C + c;
  return (static_cast<long long>(n) * C + c) * HW + rem;
}

// ------------------------------------------------------------------------------------------
// Tile loaders: global -> registers (load) and registers -> shared memory (store).
// A tile is logically S[k][j], k < BK (the GEMM K dimension), j < BJ (M or N); it is stored
// either k-major (S[k*LD + j], STORE_KJ) or j-major (S[j*LD + k]). Out-of-range elements
// are loaded as zeros, so the compute never needs a bounds check.
// ------------------------------------------------------------------------------------------

// Tile of an activation tensor [N, C, H, W]. PIX_ALONG_J: j = pixel, k = channel (forward A);
// else k = pixel, j = channel (weight-gradient A and B). The thread index runs fastest along
// the tensor's contiguous dimension: pixels for NCHW (scalar loads), channels for NHWC
// (16-byte vectors when `vec`, i.e. C % V == 0 and the base address is 16-byte aligned).
template <typename T, typename ST, bool NHWC, bool PIX_ALONG_J, bool STORE_KJ, int BK, int BJ,
          int LD, int NT>
struct PixTileLoader {
  static constexpr int V = NHWC ? static_cast<int>(16 / sizeof(T)) : 1;
  static constexpr int PIX_EXT = PIX_ALONG_J ? BJ : BK;
  static constexpr int CH_EXT = PIX_ALONG_J ? BK : BJ;
  static constexpr int FAST = NHWC ? CH_EXT / V : PIX_EXT;
  static constexpr int SLOW_EXT = NHWC ? PIX_EXT : CH_EXT;
  static_assert(CH_EXT % V == 0, "channel extent must hold whole vectors");
  static_assert(NT % FAST == 0, "threads must cover the fast dimension");
  static constexpr int SSTEP = NT / FAST;
  static_assert(SLOW_EXT % SSTEP == 0, "threads must tile the slow dimension");
  static constexpr int ITERS = SLOW_EXT / SSTEP;
  static constexpr int ELEMS = ITERS * V;
  // 16-byte stores when the channel dimension is also contiguous in shared memory.
  static constexpr bool VEC_STORE =
      NHWC && std::is_same<ST, T>::value && (PIX_ALONG_J ? !STORE_KJ : STORE_KJ);
  static_assert(!VEC_STORE || (LD % V == 0), "vector stores need LD % V == 0");

  using Regs = Stage<T, ELEMS>;

  // Local (pixel, channel) of element e of iteration i.
  static SSBSN_HD void coords(int tid, int i, int e, int& pl, int& cl) {
    if (NHWC) {
      cl = (tid % FAST) * V + e;
      pl = tid / FAST + SSTEP * i;
    } else {
      pl = tid % FAST;
      cl = tid / FAST + SSTEP * i;
    }
  }

  static SSBSN_HD int sidx(int pl, int cl) {
    const int k = PIX_ALONG_J ? cl : pl;
    const int j = PIX_ALONG_J ? pl : cl;
    return STORE_KJ ? k * LD + j : j * LD + k;
  }

  // Pixels pix0 + local (valid below pix_end), shifted by (dy, dx); channels ch0 + local.
  static SSBSN_HD void load(int tid, const T* __restrict__ src, int C, const Geom& g,
                            long long pix0, long long pix_end, int ch0, int dy, int dx,
                            bool vec, Regs& r) {
    if constexpr (!NHWC) {
      static_assert(ITERS % 2 == 0, "NCHW tiles are staged in pairs of channels");
      const T zero = from_f<T>(0.f);
      int pl, cl0;
      coords(tid, 0, 0, pl, cl0);
      int n = 0, rem = 0;
      const bool ok = locate(g, pix0 + pl, pix_end, dy, dx, n, rem);
      const T* base = ok ? src + elem_off<false>(n, rem, 0, C, g.HW) : src;
SSBSN_UNROLL
      for (int i = 0; i < ITERS; i += 2) {
        const int c = ch0 + cl0 + SSTEP * i;
        const T a = (ok && c < C) ? base[static_cast<long long>(c) * g.HW] : zero;
        const T b = (ok && c + SSTEP < C) ? base[static_cast<long long>(c + SSTEP) * g.HW] : zero;
        r.set2(i, a, b);
      }
    } else {
SSBSN_UNROLL
      for (int i = 0; i < ITERS; ++i) {
        int pl, cl;
        coords(tid, i, 0, pl, cl);
        const int c = ch0 + cl;
        int n = 0, rem = 0;
        const bool ok = locate(g, pix0 + pl, pix_end, dy, dx, n, rem) && c < C;
        // vec: C % V == 0 and c % V == 0, so a run that starts in range is whole
        r.load_run(i * V, ok ? src + elem_off<true>(n, rem, c, C, g.HW) : nullptr, ok ? C - c : 0, vec);
      }
    }
  }

  static SSBSN_HD void store(int tid, const Regs& r, ST* __restrict__ S) {
SSBSN_UNROLL
    for (int i = 0; i < ITERS; ++i) {
      if (VEC_STORE) {
        int pl, cl;
        coords(tid, i, 0, pl, cl);
        copy16(&S[sidx(pl, cl)], r.vec(i * V));
      } else {
SSBSN_UNROLL
        for (int e = 0; e < V; ++e) {
          int pl, cl;
          coords(tid, i, e, pl, cl);
          S[sidx(pl, cl)] = cvt<ST>(r.get(i * V + e));
        }
      }
    }
  }
};

// Tile S[k][n] of a dense row-major matrix (the packed forward weights): rows row0 + k
// (valid below nrows), columns col0 + n (valid below ncols), leading dimension ld.
template <typename T, typename ST, bool STORE_KJ, int BK, int BN, int LD, int NT>
struct DenseTileLoader {
  static constexpr int V = static_cast<int>(16 / sizeof(T));
  static constexpr int NB = BN / V;
  static_assert(BN % V == 0 && NT % NB == 0, "threads must cover a row in vectors");
  static constexpr int RSTEP = NT / NB;
  static_assert(BK % RSTEP == 0, "threads must tile the rows");
  static constexpr int ITERS = BK / RSTEP;
  static constexpr int ELEMS = ITERS * V;
  static constexpr bool VEC_STORE = std::is_same<ST, T>::value && STORE_KJ;
  static_assert(!VEC_STORE || (LD % V == 0), "vector stores need LD % V == 0");

  using Regs = Stage<T, ELEMS>;

  static SSBSN_HD int sidx(int k, int n) { return STORE_KJ ? k * LD + n : n * LD + k; }

  static SSBSN_HD void load(int tid, const T* __restrict__ m, long long row0, int nrows,
                            long long ld, int col0, int ncols, bool vec, Regs& r) {
    const int c = col0 + (tid % NB) * V;
SSBSN_UNROLL
    for (int i = 0; i < ITERS; ++i) {
      const int k = tid / NB + RSTEP * i;
      const bool ok = k < nrows && c < ncols;
      // vec: ncols % V == 0 and c % V == 0, so a run that starts in range is whole
      r.load_run(i * V, ok ? m + (row0 + k) * ld + c : nullptr, ok ? ncols - c : 0, vec);
    }
  }

  static SSBSN_HD void store(int tid, const Regs& r, ST* __restrict__ S) {
    const int nl = (tid % NB) * V;
SSBSN_UNROLL
    for (int i = 0; i < ITERS; ++i) {
      const int k = tid / NB + RSTEP * i;
      if (VEC_STORE) {
        copy16(&S[sidx(k, nl)], r.vec(i * V));
      } else {
SSBSN_UNROLL
        for (int e = 0; e < V; ++e) S[sidx(k, nl + e)] = cvt<ST>(r.get(i * V + e));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------
// Compute cores: a 128 x 128 output tile per block of 256 threads, from shared-memory tiles
// A (BM x BK) and B (BK x BN). A_MK: A stored [m][k] (else [k][m]); B_KN: B stored [k][n]
// (else [n][k]). Epilogues hand each output element to a Writer (row(m), put(row, n, v)).
// ------------------------------------------------------------------------------------------

// CUDA-core FMA core (any dtype; tiles converted to fp32 in shared memory). Thread (tm, tn)
// owns rows {tm*4 + i, 64 + tm*4 + i} and columns {tn*4 + j, 64 + tn*4 + j}, i, j < 4.
template <typename T>
struct FmaCore {
  using ST = float;
  static constexpr int BM = 128, BN = 128, BK = 16, NT = 256, MIN_BLOCKS = 2;
  static constexpr bool A_MK = false, B_KN = true;
  static constexpr int LDA = BM + 4, LDB = BN + 4;
  static constexpr int A_SIZE = BK * LDA, B_SIZE = BK * LDB;
  static constexpr int SCRATCH_FLOATS = 0;
  static constexpr int kUnits = NT;  // one compute unit per thread
  static SSBSN_HD int unit(int tid) { return tid; }

  struct Acc {
    float c[8][8];
  };
  static SSBSN_HD void zero(Acc& acc) {
SSBSN_UNROLL
    for (int i = 0; i < 8; ++i)
SSBSN_UNROLL
      for (int j = 0; j < 8; ++j) acc.c[i][j] = 0.f;
  }
  static SSBSN_HD int row_of(int tid, int i) { return (i >> 2) * 64 + (tid % 16) * 4 + (i & 3); }
  static SSBSN_HD int col_of(int tid, int j) { return (j >> 2) * 64 + (tid / 16) * 4 + (j & 3); }

  static SSBSN_HD void load4(const float* p, float* out) {
#if defined(__CUDA_ARCH__)
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
#else
    host_check_aligned(p, 16);
    for (int i = 0; i < 4; ++i) out[i] = p[i];
#endif
  }

  static SSBSN_HD void compute(int tid, const float* __restrict__ As,
                               const float* __restrict__ Bs, Acc& acc) {
    const int tm4 = (tid % 16) * 4, tn4 = (tid / 16) * 4;
SSBSN_UNROLL4
    for (int k = 0; k < BK; ++k) {
      float a[8], b[8];
      load4(As + k * LDA + tm4, a);
      load4(As + k * LDA + 64 + tm4, a + 4);
      load4(Bs + k * LDB + tn4, b);
      load4(Bs + k * LDB + 64 + tn4, b + 4);
SSBSN_UNROLL
      for (int i = 0; i < 8; ++i)
SSBSN_UNROLL
        for (int j = 0; j < 8; ++j) acc.c[i][j] = fmaf(a[i], b[j], acc.c[i][j]);
    }
  }

  template <class Writer>
  static SSBSN_HD void epilogue(int tid, const Acc& acc, float* /*scratch*/, const Writer& w) {
SSBSN_UNROLL
    for (int i = 0; i < 8; ++i) {
      const typename Writer::Row row = w.row(row_of(tid, i));
SSBSN_UNROLL
      for (int j = 0; j < 8; ++j) w.put(row, col_of(tid, j), acc.c[i][j]);
    }
  }
};

// Tensor-core core (fp16/bf16 in, fp32 accumulate) through the WMMA API, m16n16k16.
// 8 warps as 4 (m) x 2 (n); warp (wm, wn) owns rows wm*32 + [0, 32) and columns
// wn*64 + [0, 64): 2 x 4 accumulator fragments. Shared-memory rows are padded by 8 elements
// (16 bytes): fragment pointers stay 32-byte aligned and ldm a multiple of 8.
template <typename T, bool A_MK_, bool B_KN_, int BK_ = 32>
struct WmmaCore {
  using ST = T;
  static constexpr int BM = 128, BN = 128, BK = BK_, NT = 256, MIN_BLOCKS = 2;
  static_assert(BK % 16 == 0, "K steps hold whole 16-deep fragments");
  static constexpr bool A_MK = A_MK_, B_KN = B_KN_;
  static constexpr int LDA = A_MK ? BK + 8 : BM + 8;
  static constexpr int LDB = B_KN ? BN + 8 : BK + 8;
  static constexpr int A_SIZE = A_MK ? BM * LDA : BK * LDA;
  static constexpr int B_SIZE = B_KN ? BK * LDB : BN * LDB;
  static constexpr int SCRATCH_FLOATS = (NT / 32) * 256;  // one 16x16 fp32 tile per warp
  static constexpr int kUnits = NT / 32;                   // one compute unit per warp
  static SSBSN_HD int unit(int tid) { return tid / 32; }
  static_assert((16 * LDA * sizeof(T)) % 32 == 0 && (16 * LDB * sizeof(T)) % 32 == 0,
                "fragment pointers must stay 32-byte aligned");

  static SSBSN_HD const T* a_ptr(const T* As, int m, int k) {
    return A_MK ? As + m * LDA + k : As + k * LDA + m;
  }
  static SSBSN_HD const T* b_ptr(const T* Bs, int k, int n) {
    return B_KN ? Bs + k * LDB + n : Bs + n * LDB + k;
  }

#if SSBSN_WMMA_DEVICE
  using ALayout = typename std::conditional<A_MK, nvcuda::wmma::row_major,
                                            nvcuda::wmma::col_major>::type;
  using BLayout = typename std::conditional<B_KN, nvcuda::wmma::row_major,
                                            nvcuda::wmma::col_major>::type;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct Acc {
    FragC c[2][4];
  };
#else
  // Host emulation (and archs without the needed tensor cores, where it is never run).
  struct Acc {
    float c[2][4][256];  // [m * 16 + n]
  };
#endif

  static SSBSN_HD void zero(Acc& acc) {
#if SSBSN_WMMA_DEVICE
SSBSN_UNROLL
    for (int i = 0; i < 2; ++i)
SSBSN_UNROLL
      for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(acc.c[i][j], 0.f);
#else
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 256; ++e) acc.c[i][j][e] = 0.f;
#endif
  }

  static SSBSN_HD void compute(int warp, const T* __restrict__ As, const T* __restrict__ Bs,
                               Acc& acc) {
    const int m0 = (warp % 4) * 32, n0 = (warp / 4) * 64;
#if SSBSN_WMMA_DEVICE
    // Not unrolled: hoisting the fragment loads of both k-halves costs registers (spills).
    SSBSN_NO_UNROLL
    for (int kk = 0; kk < BK; kk += 16) {
      FragA a[2];
SSBSN_UNROLL
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(a[i], a_ptr(As, m0 + 16 * i, kk), LDA);
SSBSN_UNROLL
      for (int j = 0; j < 4; ++j) {
        FragB b;
        nvcuda::wmma::load_matrix_sync(b, b_ptr(Bs, kk, n0 + 16 * j), LDB);
SSBSN_UNROLL
        for (int i = 0; i < 2; ++i) nvcuda::wmma::mma_sync(acc.c[i][j], a[i], b, acc.c[i][j]);
      }
    }
#elif defined(__CUDA_ARCH__)
    (void)warp; (void)As; (void)Bs; (void)acc; (void)m0; (void)n0;
    __trap();
#else
    // load_matrix_sync: matrix_a element (m, k) is p[m*ldm + k] (row_major) or p[k*ldm + m]
    // (col_major); matrix_b element (k, n) is p[k*ldm + n] (row_major) or p[n*ldm + k].
    // a_ptr/b_ptr with the in-fragment offsets give exactly those addresses.
    for (int kk = 0; kk < BK; kk += 16) {
      float a[2][256], b[256];
      for (int i = 0; i < 2; ++i) host_check_aligned(a_ptr(As, m0 + 16 * i, kk), 32);
      for (int j = 0; j < 4; ++j) host_check_aligned(b_ptr(Bs, kk, n0 + 16 * j), 32);
      for (int i = 0; i < 2; ++i)
        for (int m = 0; m < 16; ++m)
          for (int k = 0; k < 16; ++k)
            a[i][m * 16 + k] = to_f(*a_ptr(As, m0 + 16 * i + m, kk + k));
      for (int j = 0; j < 4; ++j) {
        for (int k = 0; k < 16; ++k)
          for (int n = 0; n < 16; ++n) b[k * 16 + n] = to_f(*b_ptr(Bs, kk + k, n0 + 16 * j + n));
        for (int i = 0; i < 2; ++i)
          for (int m = 0; m < 16; ++m)
            for (int n = 0; n < 16; ++n) {
              float s = acc.c[i][j][m * 16 + n];
              for (int k = 0; k < 16; ++k) s += a[i][m * 16 + k] * b[k * 16 + n];
              acc.c[i][j][m * 16 + n] = s;
            }
      }
    }
#endif
  }

  // Fragment (i, j) goes through the warp's 16x16 fp32 scratch tile, stored column-major
  // when the output is contiguous along m (lanes then walk m) and row-major otherwise.
  template <class Writer>
  static SSBSN_HD void write_fragment(int lane, const float* s, int m0, int n0, const Writer& w) {
    if (Writer::kMFast) {  // scratch (m, n) at s[n*16 + m]
      const int m = lane % 16;
      const typename Writer::Row row = w.row(m0 + m);
SSBSN_UNROLL
      for (int r = 0; r < 8; ++r) {
        const int n = lane / 16 + 2 * r;
        w.put(row, n0 + n, s[n * 16 + m]);
      }
    } else {  // scratch (m, n) at s[m*16 + n]
      const int n = lane % 16;
SSBSN_UNROLL
      for (int r = 0; r < 8; ++r) {
        const int m = lane / 16 + 2 * r;
        w.put(w.row(m0 + m), n0 + n, s[m * 16 + n]);
      }
    }
  }

  // Device: called by every thread with its tid. Host: called once per warp (id = warp).
  template <class Writer>
  static SSBSN_HD void epilogue(int id, Acc& acc, float* scratch, const Writer& w) {
#if SSBSN_WMMA_DEVICE
    const int warp = id / 32, lane = id % 32;
    float* s = scratch + warp * 256;
    const int m0 = (warp % 4) * 32, n0 = (warp / 4) * 64;
SSBSN_UNROLL
    for (int i = 0; i < 2; ++i)
SSBSN_UNROLL
      for (int j = 0; j < 4; ++j) {
        nvcuda::wmma::store_matrix_sync(
            s, acc.c[i][j], 16, Writer::kMFast ? nvcuda::wmma::mem_col_major : nvcuda::wmma::mem_row_major);
        __syncwarp();
        write_fragment(lane, s, m0 + 16 * i, n0 + 16 * j, w);
        __syncwarp();
      }
#elif defined(__CUDA_ARCH__)
    (void)id; (void)acc; (void)scratch; (void)w;
    __trap();
#else
    const int warp = id;
    float* s = scratch + warp * 256;
    host_check_aligned(s, 32);
    const int m0 = (warp % 4) * 32, n0 = (warp / 4) * 64;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        // store_matrix_sync: element (m, n) to s[m*16 + n] (row) or s[n*16 + m] (col major).
        for (int m = 0; m < 16; ++m)
          for (int n = 0; n < 16; ++n)
            s[Writer::kMFast ? n * 16 + m : m * 16 + n] = acc.c[i][j][m * 16 + n];
        for (int lane = 0; lane < 32; ++lane) write_fragment(lane, s, m0 + 16 * i, n0 + 16 * j, w);
      }
#endif
  }
};

// Shared memory of a GEMM block: two A and two B stage buffers; the epilogue scratch
// aliases them (a barrier separates the last compute from the epilogue).
template <class Core>
struct GemmSmem {
  using ST = typename Core::ST;
  static constexpr std::size_t kA = Core::A_SIZE * sizeof(ST);
  static constexpr std::size_t kB = Core::B_SIZE * sizeof(ST);
  static_assert(kA % 128 == 0 && kB % 128 == 0, "stage buffers must keep 128-byte alignment");
  static constexpr std::size_t kStages = 2 * (kA + kB);
  static constexpr std::size_t kScratch = Core::SCRATCH_FLOATS * sizeof(float);
  static constexpr std::size_t kBytes = kStages > kScratch ? kStages : kScratch;
  alignas(128) unsigned char raw[kBytes];
  SSBSN_HD ST* a(int buf) { return reinterpret_cast<ST*>(raw + buf * kA); }
  SSBSN_HD ST* b(int buf) { return reinterpret_cast<ST*>(raw + 2 * kA + buf * kB); }
  SSBSN_HD float* scratch() { return reinterpret_cast<float*>(raw); }
};

// ------------------------------------------------------------------------------------------
// Epilogue writers
// ------------------------------------------------------------------------------------------

// Forward / input-gradient output: m = pixel, n = output channel; fused bias and ReLU.
template <typename T, bool NHWC>
struct ConvOutWriter {
  static constexpr bool kMFast = !NHWC;  // NCHW is contiguous along pixels
  struct Row {
    long long base;
    bool ok;
  };
  T* y;
  const float* bias;
  Geom g;
  long long pix0;
  int Co, co0, relu;

  SSBSN_HD Row row(int m) const {
    Row r;
    const long long p = pix0 + m;
    r.ok = p < g.P;
    r.base = 0;
    if (r.ok) {
      if (NHWC) {
        r.base = p * Co;
      } else {
        int n, rem;
        split_pixel(g, p, n, rem);
        r.base = static_cast<long long>(n) * Co * g.HW + rem;
      }
    }
    return r;
  }
  SSBSN_HD void put(const Row& r, int nl, float v) const {
    const int co = co0 + nl;
    if (!r.ok || co >= Co) return;
    if (bias != nullptr) v += bias[co];
    if (relu && v < 0.f) v = 0.f;  // NaN stays NaN, as in torch.relu
    y[r.base + (NHWC ? static_cast<long long>(co) : static_cast<long long>(co) * g.HW)] = from_f<T>(v);
  }
};

// Weight-gradient partial: m = input channel, n = output channel, into out[rows0 + ci][co].
struct WgradWriter {
  static constexpr bool kMFast = false;
  struct Row {
    long long base;
    bool ok;
  };
  float* out;
  long long rows0;
  int Ci, Co, ci0, co0;
  SSBSN_HD Row row(int m) const {
    Row r;
    const int ci = ci0 + m;
    r.ok = ci < Ci;
    r.base = (rows0 + ci) * Co;
    return r;
  }
  SSBSN_HD void put(const Row& r, int nl, float v) const {
    const int co = co0 + nl;
    if (r.ok && co < Co) out[r.base + co] = v;
  }
};

// ------------------------------------------------------------------------------------------
// Block programs
// ------------------------------------------------------------------------------------------

// Forward (and input gradient): block (bx, by) computes pixels bx*BM + [0, BM) and output
// channels by*BN + [0, BN); K steps run over taps (outer) and input-channel chunks (inner).
template <typename T, class CoreT, bool NHWC>
struct ConvFwdProgram {
  using Elem = T;
  using Core = CoreT;
  using ST = typename Core::ST;
  static constexpr int kThreads = Core::NT, kMinBlocks = Core::MIN_BLOCKS;
  static constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
  using ALoader = PixTileLoader<T, ST, NHWC, true, !Core::A_MK, BK, BM, Core::LDA, Core::NT>;
  using BLoader = DenseTileLoader<T, ST, Core::B_KN, BK, BN, Core::LDB, Core::NT>;
  static_assert(Core::B_KN, "forward weights are loaded k-major");
  using Smem = GemmSmem<Core>;

  struct Params {
    const T* x;       // [N, Ci, H, W]
    const T* w;       // [taps, Ci, Co]
    const float* bias;  // [Co] or null
    T* y;             // [N, Co, H, W]
    int N, H, W, Ci, Co;
    Taps taps;
    int relu, vec_x, vec_w;
  };
  struct Regs {
    typename ALoader::Regs a;
    typename BLoader::Regs b;
  };

  const Params& p;
  Geom g;
  long long pix0;
  int co0, nchunks;

  SSBSN_HD ConvFwdProgram(const Params& params, unsigned bx, unsigned by)
      : p(params),
        g(make_geom(params.N, params.H, params.W)),
        pix0(static_cast<long long>(bx) * BM),
        co0(static_cast<int>(by) * BN),
        nchunks(static_cast<int>(ceil_div(params.Ci, BK))) {}

  SSBSN_HD int num_steps() const { return p.taps.count * nchunks; }

  SSBSN_HD void load(int tid, int s, Regs& r) const {
    const int t = s / nchunks;
    const int ci0 = (s - t * nchunks) * BK;
    ALoader::load(tid, p.x, p.Ci, g, pix0, g.P, ci0, p.taps.dy[t], p.taps.dx[t], p.vec_x != 0, r.a);
    BLoader::load(tid, p.w, static_cast<long long>(t) * p.Ci + ci0, p.Ci - ci0, p.Co, co0, p.Co,
                  p.vec_w != 0, r.b);
  }
  SSBSN_HD void store(int tid, const Regs& r, Smem& sm, int buf) const {
    ALoader::store(tid, r.a, sm.a(buf));
    BLoader::store(tid, r.b, sm.b(buf));
  }
  SSBSN_HD void compute(int unit, Smem& sm, int buf, typename Core::Acc& acc) const {
    Core::compute(unit, sm.a(buf), sm.b(buf), acc);
  }
  SSBSN_HD void epilogue(int id, Smem& sm, typename Core::Acc& acc) const {
    ConvOutWriter<T, NHWC> w{p.y, p.bias, g, pix0, p.Co, co0, p.relu};
    Core::epilogue(id, acc, sm.scratch(), w);
  }
#if defined(__CUDACC__)
  __device__ void device_main() const;
#endif
};

// Weight gradient: block x = (tap t, input-channel tile, output-channel tile), block y =
// pixel split; K steps of BK pixels over the split's pixel range.
template <typename T, class CoreT, bool NHWC>
struct ConvWgradProgram {
  using Elem = T;
  using Core = CoreT;
  using ST = typename Core::ST;
  static constexpr int kThreads = Core::NT, kMinBlocks = Core::MIN_BLOCKS;
  static constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
  using ALoader = PixTileLoader<T, ST, NHWC, false, !Core::A_MK, BK, BM, Core::LDA, Core::NT>;
  using BLoader = PixTileLoader<T, ST, NHWC, false, Core::B_KN, BK, BN, Core::LDB, Core::NT>;
  using Smem = GemmSmem<Core>;

  struct Params {
    const T* x;   // [N, Ci, H, W]
    const T* dz;  // [N, Co, H, W]
    float* out;   // [splits, taps, Ci, Co] (splits == 1: the weight gradient itself)
    int N, H, W, Ci, Co;
    Taps taps;
    long long chunk;  // pixels per split, a multiple of BK
    int mtiles, ntiles, vec_x, vec_dz;
  };
  struct Regs {
    typename ALoader::Regs a;
    typename BLoader::Regs b;
  };

  const Params& p;
  Geom g;
  int t, ci0, co0, split, dy, dx;
  long long pbeg, pend;

  SSBSN_HD ConvWgradProgram(const Params& params, unsigned bx, unsigned by)
      : p(params), g(make_geom(params.N, params.H, params.W)) {
    const int tiles = params.mtiles * params.ntiles;
    t = static_cast<int>(bx) / tiles;
    const int r = static_cast<int>(bx) - t * tiles;
    ci0 = (r / params.ntiles) * BM;
    co0 = (r % params.ntiles) * BN;
    split = static_cast<int>(by);
    dy = params.taps.dy[t];
    dx = params.taps.dx[t];
    pbeg = static_cast<long long>(split) * params.chunk;
    pend = pbeg + params.chunk < g.P ? pbeg + params.chunk : g.P;
  }

  SSBSN_HD int num_steps() const {
    return pend > pbeg ? static_cast<int>(ceil_div(pend - pbeg, BK)) : 0;
  }
  SSBSN_HD void load(int tid, int s, Regs& r) const {
    const long long pix0 = pbeg + static_cast<long long>(s) * BK;
    ALoader::load(tid, p.x, p.Ci, g, pix0, pend, ci0, dy, dx, p.vec_x != 0, r.a);
    BLoader::load(tid, p.dz, p.Co, g, pix0, pend, co0, 0, 0, p.vec_dz != 0, r.b);
  }
  SSBSN_HD void store(int tid, const Regs& r, Smem& sm, int buf) const {
    ALoader::store(tid, r.a, sm.a(buf));
    BLoader::store(tid, r.b, sm.b(buf));
  }
  SSBSN_HD void compute(int unit, Smem& sm, int buf, typename Core::Acc& acc) const {
    Core::compute(unit, sm.a(buf), sm.b(buf), acc);
  }
  SSBSN_HD void epilogue(int id, Smem& sm, typename Core::Acc& acc) const {
    const long long rows0 = (static_cast<long long>(split) * p.taps.count + t) * p.Ci;
    WgradWriter w{p.out, rows0, p.Ci, p.Co, ci0, co0};
    Core::epilogue(id, acc, sm.scratch(), w);
  }
#if defined(__CUDACC__)
  __device__ void device_main() const;
#endif
};

// ReLU mask and per-channel partial sums: block x = (image n, chunk of hw_chunk pixels),
// block y = group of CG channels. Thread (channel cl, pixel lane pl) walks its pixels, then
// the PL lanes of each channel are added in a fixed order.
template <typename T, bool NHWC>
struct ReluGradBiasProgram {
  static constexpr int kThreads = 256, kMinBlocks = 1;
  static constexpr int CG = NHWC ? 32 : 8;  // channels per block
  static constexpr int PL = kThreads / CG;  // pixel lanes per channel
  struct Params {
    const T* grad;
    const T* out;  // null: no ReLU
    T* dz;         // written when out is given
    float* ws;     // [N * nchunks, C] partial sums, or null
    int N, HW, C, hw_chunk, nchunks;
  };
  struct Smem {
    float red[kThreads];
  };
  const Params& p;
  int n, hc, cg;
  SSBSN_HD ReluGradBiasProgram(const Params& params, unsigned bx, unsigned by)
      : p(params),
        n(static_cast<int>(bx) / params.nchunks),
        hc(static_cast<int>(bx) % params.nchunks),
        cg(static_cast<int>(by)) {}

  SSBSN_HD void phase1(int tid, Smem& sm) const {
    const int cl = NHWC ? tid % CG : tid / PL;
    const int pl = NHWC ? tid / CG : tid % PL;
    const int c = cg * CG + cl;
    const int r0 = hc * p.hw_chunk;
    const int r1 = r0 + p.hw_chunk < p.HW ? r0 + p.hw_chunk : p.HW;
    float sum = 0.f;
    if (c < p.C) {
      for (int r = r0 + pl; r < r1; r += PL) {
        const long long off = elem_off<NHWC>(n, r, c, p.C, p.HW);
        float v = to_f(p.grad[off]);
        if (p.out != nullptr) {
          v = to_f(p.out[off]) > 0.f ? v : 0.f;
          p.dz[off] = from_f<T>(v);
        }
        sum += v;
      }
    }
    sm.red[tid] = sum;
  }
  SSBSN_HD void phase2(int tid, Smem& sm) const {
    if (p.ws == nullptr || tid >= CG) return;
    const int c = cg * CG + tid;
    if (c >= p.C) return;
    float s = 0.f;
    for (int l = 0; l < PL; ++l) s += sm.red[NHWC ? l * CG + tid : tid * PL + l];
    p.ws[(static_cast<long long>(n) * p.nchunks + hc) * p.C + c] = s;
  }
#if defined(__CUDACC__)
  __device__ void device_main() const;
#endif
};

// out[i] = sum_{s < parts} ws[s * len + i], s ascending.
struct ReduceProgram {
  static constexpr int kThreads = 256, kMinBlocks = 1;
  struct Params {
    const float* ws;
    float* out;
    long long len;
    int parts;
  };
  const Params& p;
  long long i0;
  SSBSN_HD ReduceProgram(const Params& params, unsigned bx, unsigned /*by*/)
      : p(params), i0(static_cast<long long>(bx) * kThreads) {}
  SSBSN_HD void body(int tid) const {
    const long long i = i0 + tid;
    if (i >= p.len) return;
    float s = 0.f;
    for (int k = 0; k < p.parts; ++k) s += p.ws[static_cast<long long>(k) * p.len + i];
    p.out[i] = s;
  }
#if defined(__CUDACC__)
  __device__ void device_main() const;
#endif
};

// ------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

// One barrier per K step: in step s the block computes on stage s&1 while each thread holds
// the tiles of step s+1 in registers, then writes them to stage (s+1)&1 -- the stage last
// read in step s-1, which every warp left before the barrier that ended step s-1.
template <class Prog>
__device__ __forceinline__ void gemm_device_main(const Prog& prog) {
  using Core = typename Prog::Core;
  __shared__ typename Prog::Smem sm;
  const int tid = static_cast<int>(threadIdx.x);
  typename Prog::Regs regs;
  typename Core::Acc acc;
  Core::zero(acc);
  const int steps = prog.num_steps();
  if (steps > 0) {
    prog.load(tid, 0, regs);
    prog.store(tid, regs, sm, 0);
  }
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const bool next = s + 1 < steps;
    if (next) prog.load(tid, s + 1, regs);
    prog.compute(Core::unit(tid), sm, s & 1, acc);
    if (next) prog.store(tid, regs, sm, (s + 1) & 1);
    __syncthreads();
  }
  prog.epilogue(tid, sm, acc);
}

template <typename T, class CoreT, bool NHWC>
__device__ void ConvFwdProgram<T, CoreT, NHWC>::device_main() const { gemm_device_main(*this); }
template <typename T, class CoreT, bool NHWC>
__device__ void ConvWgradProgram<T, CoreT, NHWC>::device_main() const { gemm_device_main(*this); }

template <typename T, bool NHWC>
__device__ void ReluGradBiasProgram<T, NHWC>::device_main() const {
  __shared__ Smem sm;
  const int tid = static_cast<int>(threadIdx.x);
  phase1(tid, sm);
  __syncthreads();
  phase2(tid, sm);
}

__device__ inline void ReduceProgram::device_main() const { body(static_cast<int>(threadIdx.x)); }

template <class Prog>
__global__ void __launch_bounds__(Prog::kThreads, Prog::kMinBlocks)
    ssbsn_block_kernel(const typename Prog::Params params) {
  const Prog prog(params, blockIdx.x, blockIdx.y);
  prog.device_main();
}

#else  // host emulation

// The same schedule, thread by thread: every phase of every thread (or warp) of the block
// runs before the next phase starts, which is what the barriers guarantee on the device.
// Shared memory starts as NaN so that a read of a never-written element cannot go unseen.
template <class Prog>
void gemm_host_main(const Prog& prog) {
  using Core = typename Prog::Core;
  std::unique_ptr<typename Prog::Smem> sm(new typename Prog::Smem);
  std::memset(sm->raw, 0xFF, sizeof(sm->raw));
  std::vector<typename Prog::Regs> regs(Core::NT);
  std::vector<typename Core::Acc> acc(Core::kUnits);
  for (auto& a : acc) Core::zero(a);
  const int steps = prog.num_steps();
  if (steps > 0) {
    for (int tid = 0; tid < Core::NT; ++tid) prog.load(tid, 0, regs[tid]);
    for (int tid = 0; tid < Core::NT; ++tid) prog.store(tid, regs[tid], *sm, 0);
  }
  for (int s = 0; s < steps; ++s) {
    const bool next = s + 1 < steps;
    if (next)
      for (int tid = 0; tid < Core::NT; ++tid) prog.load(tid, s + 1, regs[tid]);
    for (int u = 0; u < Core::kUnits; ++u) prog.compute(u, *sm, s & 1, acc[u]);
    if (next)
      for (int tid = 0; tid < Core::NT; ++tid) prog.store(tid, regs[tid], *sm, (s + 1) & 1);
  }
  for (int u = 0; u < Core::kUnits; ++u) prog.epilogue(u, *sm, acc[u]);
}

template <typename T, class CoreT, bool NHWC>
void host_main(const ConvFwdProgram<T, CoreT, NHWC>& prog) { gemm_host_main(prog); }
template <typename T, class CoreT, bool NHWC>
void host_main(const ConvWgradProgram<T, CoreT, NHWC>& prog) { gemm_host_main(prog); }
template <typename T, bool NHWC>
void host_main(const ReluGradBiasProgram<T, NHWC>& prog) {
  using Prog = ReluGradBiasProgram<T, NHWC>;
  typename Prog::Smem sm;
  for (int tid = 0; tid < Prog::kThreads; ++tid) sm.red[tid] = std::nanf("");
  for (int tid = 0; tid < Prog::kThreads; ++tid) prog.phase1(tid, sm);
  for (int tid = 0; tid < Prog::kThreads; ++tid) prog.phase2(tid, sm);
}
inline void host_main(const ReduceProgram& prog) {
  for (int tid = 0; tid < ReduceProgram::kThreads; ++tid) prog.body(tid);
}

#endif

struct LaunchGrid {
  long long x, y;
};

#if defined(__CUDACC__)
struct CudaExec {
  cudaStream_t stream;
  int cc_major;
  bool tensor_cores() const { return cc_major >= 8; }
  template <class Prog>
  const char* launch(LaunchGrid grid, const typename Prog::Params& params) {
    if (grid.x <= 0 || grid.y <= 0) return nullptr;
    if (grid.x > 0x7fffffffLL || grid.y > 65535) return "ssbsn conv: problem too large for one launch";
    ssbsn_block_kernel<Prog><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)),
                               Prog::kThreads, 0, stream>>>(params);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
};
#else
struct HostExec {
  bool tensor_cores() const { return true; }  // emulated
  template <class Prog>
  const char* launch(LaunchGrid grid, const typename Prog::Params& params) {
    host_alignment_faults() = 0;
    for (long long by = 0; by < grid.y; ++by)
      for (long long bx = 0; bx < grid.x; ++bx)
        host_main(Prog(params, static_cast<unsigned>(bx), static_cast<unsigned>(by)));
    return host_alignment_faults() == 0 ? nullptr : "ssbsn conv (host emulation): misaligned vector or fragment access";
  }
};
#endif

// ------------------------------------------------------------------------------------------
// Validation, planning and dispatch (shared by the CUDA and the host-emulation builds)
// ------------------------------------------------------------------------------------------
constexpr int kTile = 128;  // BM = BN of every GEMM core

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0;
}
inline int vec_len(int dtype) { return dtype == kFloat32 ? 4 : 8; }

inline const char* check_problem(int dtype, int N, int H, int W) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    return "ssbsn conv: dtype must be float32, float16 or bfloat16";
  if (N < 1 || H < 1 || W < 1) return "ssbsn conv: N, H and W must be positive";
  if (static_cast<long long>(N) * H * W > 0x7fffffffLL) return "ssbsn conv: N*H*W must be below 2^31";
  return nullptr;
}
inline const char* check_taps(const Taps& taps) {
  if (taps.count < 1 || taps.count > kMaxTaps) return "ssbsn conv: between 1 and 25 taps";
  for (int t = 0; t < taps.count; ++t)
    if (taps.dy[t] < -kMaxTapOffset || taps.dy[t] > kMaxTapOffset || taps.dx[t] < -kMaxTapOffset ||
        taps.dx[t] > kMaxTapOffset)
      return "ssbsn conv: tap offset out of range";
  return nullptr;
}
inline const char* resolve_algo(int requested, int dtype, bool tensor_cores, int* algo) {
  if (requested == kAlgoAuto) {
    *algo = (dtype != kFloat32 && tensor_cores) ? kAlgoWmma : kAlgoFma;
    return nullptr;
  }
  if (requested == kAlgoFma) {
    *algo = kAlgoFma;
    return nullptr;
  }
  if (requested == kAlgoWmma) {
    if (dtype == kFloat32) return "ssbsn conv: the wmma algorithm needs float16 or bfloat16";
    if (!tensor_cores) return "ssbsn conv: the wmma algorithm needs an sm_80+ GPU";
    *algo = kAlgoWmma;
    return nullptr;
  }
  return "ssbsn conv: unknown algorithm";
}

inline int plan_wgrad_splits(const ConvWgradArgs& a, int num_sms) {
  const long long P = static_cast<long long>(a.N) * a.H * a.W;
  const long long tiles = static_cast<long long>(a.taps.count) * ceil_div(a.Ci, kTile) * ceil_div(a.Co, kTile);
  const long long target = 4LL * (num_sms > 0 ? num_sms : 1);  // about two waves of 2 blocks/SM
  long long s = ceil_div(target, tiles > 0 ? tiles : 1);
  const long long by_work = P / 512 > 1 ? P / 512 : 1;  // at least 512 pixels per split
  if (s > by_work) s = by_work;
  if (s > 1024) s = 1024;
  return static_cast<int>(s < 1 ? 1 : s);
}
inline std::size_t wgrad_workspace_floats(const ConvWgradArgs& a) {
  if (a.splits <= 1) return 0;
  return static_cast<std::size_t>(a.splits) * a.taps.count * a.Ci * a.Co;
}
inline int plan_hw_chunk(int H, int W) {
  const long long hw = static_cast<long long>(H) * W;
  return static_cast<int>(hw < 2048 ? (hw > 0 ? hw : 1) : 2048);
}
inline long long relu_bias_parts(const ReluGradBiasArgs& a) {
  const int chunk = a.hw_chunk > 0 ? a.hw_chunk : plan_hw_chunk(a.H, a.W);
  return static_cast<long long>(a.N) * ceil_div(static_cast<long long>(a.H) * a.W, chunk);
}

template <class Prog, class Exec>
const char* launch_fwd(const ConvFwdArgs& a, Exec& ex) {
  using T = typename Prog::Elem;
  typename Prog::Params p;
  p.x = static_cast<const T*>(a.x);
  p.w = static_cast<const T*>(a.w);
  p.bias = a.bias;
  p.y = static_cast<T*>(a.y);
  p.N = a.N;
  p.H = a.H;
  p.W = a.W;
  p.Ci = a.Ci;
  p.Co = a.Co;
  p.taps = a.taps;
  p.relu = a.relu != 0;
  const int V = vec_len(a.dtype);
  p.vec_x = a.Ci % V == 0 && aligned16(a.x);
  p.vec_w = a.Co % V == 0 && aligned16(a.w);
  const long long P = static_cast<long long>(a.N) * a.H * a.W;
  return ex.template launch<Prog>(LaunchGrid{ceil_div(P, Prog::BM), ceil_div(a.Co, Prog::BN)}, p);
}

template <typename T, class Exec>
const char* conv_fwd_typed(const ConvFwdArgs& a, int algo, Exec& ex) {
  if constexpr (!std::is_same<T, float>::value) {
    if (algo == kAlgoWmma)
      return a.nhwc ? launch_fwd<ConvFwdProgram<T, WmmaCore<T, true, true>, true>>(a, ex)
                    : launch_fwd<ConvFwdProgram<T, WmmaCore<T, false, true>, false>>(a, ex);
  }
  return a.nhwc ? launch_fwd<ConvFwdProgram<T, FmaCore<T>, true>>(a, ex)
                : launch_fwd<ConvFwdProgram<T, FmaCore<T>, false>>(a, ex);
}

template <class Exec>
const char* run_conv_fwd(const ConvFwdArgs& a, Exec& ex) {
  if (const char* e = check_problem(a.dtype, a.N, a.H, a.W)) return e;
  if (const char* e = check_taps(a.taps)) return e;
  if (a.Ci < 1 || a.Co < 1) return "ssbsn conv: channel counts must be positive";
  if (a.x == nullptr || a.w == nullptr || a.y == nullptr) return "ssbsn conv: null tensor";
  int algo = kAlgoFma;
  if (const char* e = resolve_algo(a.algo, a.dtype, ex.tensor_cores(), &algo)) return e;
  switch (a.dtype) {
    case kFloat32: return conv_fwd_typed<float>(a, algo, ex);
    case kFloat16: return conv_fwd_typed<__half>(a, algo, ex);
    default: return conv_fwd_typed<__nv_bfloat16>(a, algo, ex);
  }
}

template <class Prog, class Exec>
const char* launch_wgrad(const ConvWgradArgs& a, Exec& ex) {
  using T = typename Prog::Elem;
  typename Prog::Params p;
  p.x = static_cast<const T*>(a.x);
  p.dz = static_cast<const T*>(a.dz);
  p.out = a.splits > 1 ? a.workspace : a.dw;
  p.N = a.N;
  p.H = a.H;
  p.W = a.W;
  p.Ci = a.Ci;
  p.Co = a.Co;
  p.taps = a.taps;
  const long long P = static_cast<long long>(a.N) * a.H * a.W;
  p.chunk = ceil_div(ceil_div(P, a.splits), Prog::BK) * Prog::BK;
  p.mtiles = static_cast<int>(ceil_div(a.Ci, Prog::BM));
  p.ntiles = static_cast<int>(ceil_div(a.Co, Prog::BN));
  const int V = vec_len(a.dtype);
  p.vec_x = a.Ci % V == 0 && aligned16(a.x);
  p.vec_dz = a.Co % V == 0 && aligned16(a.dz);
  const long long blocks = static_cast<long long>(a.taps.count) * p.mtiles * p.ntiles;
  if (const char* e = ex.template launch<Prog>(LaunchGrid{blocks, a.splits}, p)) return e;
  if (a.splits <= 1) return nullptr;
  ReduceProgram::Params r;
  r.ws = a.workspace;
  r.out = a.dw;
  r.len = static_cast<long long>(a.taps.count) * a.Ci * a.Co;
  r.parts = a.splits;
  return ex.template launch<ReduceProgram>(LaunchGrid{ceil_div(r.len, ReduceProgram::kThreads), 1}, r);
}

template <typename T, class Exec>
const char* conv_wgrad_typed(const ConvWgradArgs& a, int algo, Exec& ex) {
  if constexpr (!std::is_same<T, float>::value) {
    // NCHW tiles are contiguous along pixels (= k), NHWC tiles along channels (= m, n).
    // NCHW takes 16 scalar loads per thread and operand at BK = 32 (register spills), so it
    // steps by 16 pixels.
    if (algo == kAlgoWmma)
      return a.nhwc ? launch_wgrad<ConvWgradProgram<T, WmmaCore<T, false, true>, true>>(a, ex)
                    : launch_wgrad<ConvWgradProgram<T, WmmaCore<T, true, false, 16>, false>>(a, ex);
  }
  return a.nhwc ? launch_wgrad<ConvWgradProgram<T, FmaCore<T>, true>>(a, ex)
                : launch_wgrad<ConvWgradProgram<T, FmaCore<T>, false>>(a, ex);
}

template <class Exec>
const char* run_conv_wgrad(const ConvWgradArgs& a, Exec& ex) {
  if (const char* e = check_problem(a.dtype, a.N, a.H, a.W)) return e;
  if (const char* e = check_taps(a.taps)) return e;
  if (a.Ci < 1 || a.Co < 1) return "ssbsn conv: channel counts must be positive";
  if (a.x == nullptr || a.dz == nullptr || a.dw == nullptr) return "ssbsn conv: null tensor";
  if (a.splits < 1 || a.splits > 65535) return "ssbsn conv: splits must be in [1, 65535]";
  if (a.splits > 1 && a.workspace == nullptr) return "ssbsn conv: splits > 1 needs a workspace";
  int algo = kAlgoFma;
  if (const char* e = resolve_algo(a.algo, a.dtype, ex.tensor_cores(), &algo)) return e;
  switch (a.dtype) {
    case kFloat32: return conv_wgrad_typed<float>(a, algo, ex);
    case kFloat16: return conv_wgrad_typed<__half>(a, algo, ex);
    default: return conv_wgrad_typed<__nv_bfloat16>(a, algo, ex);
  }
}

template <typename T, bool NHWC, class Exec>
const char* relu_grad_bias_typed(const ReluGradBiasArgs& a, Exec& ex) {
  using Prog = ReluGradBiasProgram<T, NHWC>;
  typename Prog::Params p;
  p.grad = static_cast<const T*>(a.grad);
  p.out = static_cast<const T*>(a.out);
  p.dz = static_cast<T*>(a.dz);
  p.ws = a.db != nullptr ? a.workspace : nullptr;
  p.N = a.N;
  p.HW = a.H * a.W;
  p.C = a.C;
  p.hw_chunk = a.hw_chunk > 0 ? a.hw_chunk : plan_hw_chunk(a.H, a.W);
  p.nchunks = static_cast<int>(ceil_div(p.HW, p.hw_chunk));
  const LaunchGrid grid{static_cast<long long>(a.N) * p.nchunks, ceil_div(a.C, Prog::CG)};
  if (const char* e = ex.template launch<Prog>(grid, p)) return e;
  if (a.db == nullptr) return nullptr;
  ReduceProgram::Params r;
  r.ws = a.workspace;
  r.out = a.db;
  r.len = a.C;
  r.parts = a.N * p.nchunks;
  return ex.template launch<ReduceProgram>(LaunchGrid{ceil_div(r.len, ReduceProgram::kThreads), 1}, r);
}

template <class Exec>
const char* run_relu_grad_bias(const ReluGradBiasArgs& a, Exec& ex) {
  if (const char* e = check_problem(a.dtype, a.N, a.H, a.W)) return e;
  if (a.C < 1) return "ssbsn conv: channel count must be positive";
  if (a.grad == nullptr) return "ssbsn conv: null gradient";
  if ((a.out == nullptr) != (a.dz == nullptr)) return "ssbsn conv: out and dz go together";
  if (a.db != nullptr && a.workspace == nullptr) return "ssbsn conv: the bias gradient needs a workspace";
  if (a.hw_chunk < 0) return "ssbsn conv: hw_chunk must be >= 0";
  if (relu_bias_parts(a) > 0x7fffffffLL) return "ssbsn conv: too many pixel chunks";
  switch (a.dtype) {
    case kFloat32: return a.nhwc ? relu_grad_bias_typed<float, true>(a, ex) : relu_grad_bias_typed<float, false>(a, ex);
    case kFloat16: return a.nhwc ? relu_grad_bias_typed<__half, true>(a, ex) : relu_grad_bias_typed<__half, false>(a, ex);
    default: return a.nhwc ? relu_grad_bias_typed<__nv_bfloat16, true>(a, ex) : relu_grad_bias_typed<__nv_bfloat16, false>(a, ex);
  }
}

}  // namespace impl

// Planning helpers of conv_api.h: identical in every build, defined once per build.
#define SSBSN_CONV_DEFINE_PLANNING_API                                                    \
  int conv_wgrad_default_splits(const ConvWgradArgs& a, int num_sms) {                    \
    return impl::plan_wgrad_splits(a, num_sms);                                           \
  }                                                                                       \
  std::size_t conv_wgrad_workspace_floats(const ConvWgradArgs& a) {                       \
    return impl::wgrad_workspace_floats(a);                                               \
  }                                                                                       \
  int relu_grad_bias_default_hw_chunk(int H, int W) { return impl::plan_hw_chunk(H, W); } \
  std::size_t relu_grad_bias_workspace_floats(const ReluGradBiasArgs& a) {                \
    return a.db == nullptr ? 0 : static_cast<std::size_t>(impl::relu_bias_parts(a)) * a.C; \
  }

}  // namespace ssbsn_conv
