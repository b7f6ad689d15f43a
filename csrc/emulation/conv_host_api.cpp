// Host emulation of the conv_api.h entry points, for testing without a GPU: the very block
// programs of conv_kernels.cuh, run thread by thread on the CPU (see the driver there).
// Compiled by a plain C++ compiler with the CUDA headers on the include path (for __half and
// __nv_bfloat16); tensors are host memory. Slow by design: small problems only.
#include "../conv_kernels.cuh"

namespace ssbsn_conv {

SSBSN_CONV_DEFINE_PLANNING_API

const char* conv_fwd(const ConvFwdArgs& a, void* /*stream*/, int /*device*/) {
  impl::HostExec ex;
  return impl::run_conv_fwd(a, ex);
}

const char* conv_wgrad(const ConvWgradArgs& a, void* /*stream*/, int /*device*/) {
  impl::HostExec ex;
  return impl::run_conv_wgrad(a, ex);
}

const char* relu_grad_bias(const ReluGradBiasArgs& a, void* /*stream*/, int /*device*/) {
  impl::HostExec ex;
  return impl::run_relu_grad_bias(a, ex);
}

const char* implementation() { return "host-emulation"; }

}  // namespace ssbsn_conv
