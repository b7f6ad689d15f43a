// CUDA build of the blind-spot convolution kernels: the conv_api.h entry points, launching
// the block programs of conv_kernels.cuh on a stream. No ATen/c10: compiles with nvcc alone.
#include "conv_kernels.cuh"

namespace ssbsn_conv {
namespace {

// Makes `device` current for the duration of a launch (torch's current device may differ
// from the tensors' device), then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      error_ = "ssbsn conv: cudaGetDevice failed";
      return;
    }
    device_ = device >= 0 ? device : prev_;
    if (device_ != prev_ && cudaSetDevice(device_) != cudaSuccess) {
      error_ = "ssbsn conv: cudaSetDevice failed";
      device_ = prev_;
    }
  }
  ~DeviceGuard() {
    if (device_ != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  const char* error() const { return error_; }
  int device() const { return device_; }

 private:
  int prev_ = 0;
  int device_ = 0;
  const char* error_ = nullptr;
};

template <class Args, class Run>
const char* launch_on(const Args& a, void* stream, int device, Run run) {
  DeviceGuard guard(device);
  if (guard.error() != nullptr) return guard.error();
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, guard.device()) != cudaSuccess)
    return "ssbsn conv: cannot query the compute capability";
  impl::CudaExec ex{static_cast<cudaStream_t>(stream), major};
  return run(a, ex);
}

}  // namespace

SSBSN_CONV_DEFINE_PLANNING_API

const char* conv_fwd(const ConvFwdArgs& a, void* stream, int device) {
  return launch_on(a, stream, device, [](const ConvFwdArgs& x, impl::CudaExec& ex) { return impl::run_conv_fwd(x, ex); });
}

const char* conv_wgrad(const ConvWgradArgs& a, void* stream, int device) {
  return launch_on(a, stream, device, [](const ConvWgradArgs& x, impl::CudaExec& ex) { return impl::run_conv_wgrad(x, ex); });
}

const char* relu_grad_bias(const ReluGradBiasArgs& a, void* stream, int device) {
  return launch_on(a, stream, device, [](const ReluGradBiasArgs& x, impl::CudaExec& ex) { return impl::run_relu_grad_bias(x, ex); });
}

const char* implementation() { return "cuda"; }

}  // namespace ssbsn_conv
