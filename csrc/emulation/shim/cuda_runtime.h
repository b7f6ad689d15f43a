// Host-only stand-in for <cuda_runtime.h>, for building the host emulation of the kernels
// where no CUDA toolkit is installed (csrc/emulation; never used by the CUDA build). Provides
// only what conv_kernels.cuh needs outside __CUDACC__: the function-space qualifiers.
#pragma once

#ifdef __CUDACC__
#error "csrc/emulation/shim is for host-only builds; use the real CUDA headers with nvcc"
#endif

#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
