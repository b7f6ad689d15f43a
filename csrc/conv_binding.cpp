// pybind11 binding of the blind-spot convolution kernels (conv_api.h) for torch tensors.
// Thin on purpose: it checks the tensors, fills the argument structs and allocates the
// fp32 workspaces; the weight packing, layouts and autograd live in ssbsn/nn/conv.py.
// Errors are returned, not thrown: each entry point returns "" or a one-line message, which
// ssbsn/nn/_cuda_ext.py raises as RuntimeError. On an H200 image a failed TORCH_CHECK (a
// c10::Error, which captures a C++ backtrace) ended the process with a segfault instead.
// Only torch/extension.h is used (no ATen CUDA headers): the caller passes the CUDA stream
// and device index. Built with -DSSBSN_CONV_HOST_EMULATION it takes CPU tensors and runs the
// host emulation of the kernels instead (tests without a GPU).
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "conv_api.h"

namespace {

using ssbsn_conv::Taps;

#ifdef SSBSN_CONV_HOST_EMULATION
constexpr bool kWantCuda = false;
#else
constexpr bool kWantCuda = true;
#endif

// A failed condition returns its message from the enclosing function (std::string: "" = fine).
#define SSBSN_REQUIRE(cond, ...) \
  do {                           \
    if (!(cond)) return c10::str(__VA_ARGS__); \
  } while (0)
// A failed check (a function returning such a message) returns its message.
#define SSBSN_TRY(expr)                   \
  do {                                    \
    std::string ssbsn_err_ = (expr);      \
    if (!ssbsn_err_.empty()) return ssbsn_err_; \
  } while (0)

std::string dtype_code(const at::Tensor& t, int* code) {
  switch (t.scalar_type()) {
    case at::kFloat: *code = ssbsn_conv::kFloat32; return "";
    case at::kHalf: *code = ssbsn_conv::kFloat16; return "";
    case at::kBFloat16: *code = ssbsn_conv::kBFloat16; return "";
    default: return c10::str("ssbsn conv: dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

std::string check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  SSBSN_REQUIRE(t.is_cuda() == kWantCuda, "ssbsn conv: ", name,
                kWantCuda ? " must be a CUDA tensor" : " must be a CPU tensor (host emulation)");
  SSBSN_REQUIRE(t.device() == ref.device(), "ssbsn conv: ", name, " is on ", t.device(), ", expected ", ref.device());
  return "";
}

// A [N, C, H, W] activation, dense in the layout the call uses, of the reference dtype.
std::string check_act(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t C, bool nhwc) {
  SSBSN_TRY(check_device(t, name, ref));
  SSBSN_REQUIRE(t.dim() == 4, "ssbsn conv: ", name, " must be 4-D, got ", t.sizes());
  SSBSN_REQUIRE(t.size(0) == ref.size(0) && t.size(1) == C && t.size(2) == ref.size(2) && t.size(3) == ref.size(3),
                "ssbsn conv: ", name, " has shape ", t.sizes(), ", expected [", ref.size(0), ", ", C, ", ",
                ref.size(2), ", ", ref.size(3), "]");
  SSBSN_REQUIRE(t.scalar_type() == ref.scalar_type(), "ssbsn conv: ", name, " must be ", ref.scalar_type());
  SSBSN_REQUIRE(nhwc ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(),
                "ssbsn conv: ", name, nhwc ? " must be channels_last-contiguous" : " must be contiguous (NCHW)");
  return "";
}

// The call's primary [N, C, H, W] input (x, or grad): its device, rank, layout and dtype, against
// itself (the other tensors are checked against it).
std::string check_input(const at::Tensor& t, const char* name, bool nhwc) {
  SSBSN_TRY(check_device(t, name, t));
  SSBSN_REQUIRE(t.dim() == 4, "ssbsn conv: ", name, " must be 4-D, got ", t.sizes());
  return check_act(t, name, t, t.size(1), nhwc);
}

std::string make_taps(const std::vector<int64_t>& dys, const std::vector<int64_t>& dxs, Taps* taps) {
  SSBSN_REQUIRE(dys.size() == dxs.size(), "ssbsn conv: tap offset lists differ in length");
  SSBSN_REQUIRE(!dys.empty() && dys.size() <= static_cast<size_t>(ssbsn_conv::kMaxTaps),
                "ssbsn conv: between 1 and ", ssbsn_conv::kMaxTaps, " taps, got ", dys.size());
  taps->count = static_cast<int>(dys.size());
  for (size_t t = 0; t < dys.size(); ++t) {
    SSBSN_REQUIRE(std::abs(dys[t]) <= ssbsn_conv::kMaxTapOffset && std::abs(dxs[t]) <= ssbsn_conv::kMaxTapOffset,
                  "ssbsn conv: tap offset out of range");
    taps->dy[t] = static_cast<int>(dys[t]);
    taps->dx[t] = static_cast<int>(dxs[t]);
  }
  return "";
}

std::string checked_int(int64_t v, const char* what, int* out) {
  SSBSN_REQUIRE(v >= 0 && v <= INT32_MAX, "ssbsn conv: ", what, " out of range: ", v);
  *out = static_cast<int>(v);
  return "";
}

std::string message(const char* err) { return err == nullptr ? std::string() : std::string(err); }

// The problem fields shared by the forward and weight-gradient arguments.
template <class Args>
std::string fill_problem(Args& a, const at::Tensor& x, int64_t Co, const Taps& taps, bool nhwc, int64_t algo) {
  SSBSN_TRY(dtype_code(x, &a.dtype));
  a.nhwc = nhwc;
  a.algo = static_cast<int>(algo);
  SSBSN_TRY(checked_int(x.size(0), "N", &a.N));
  SSBSN_TRY(checked_int(x.size(2), "H", &a.H));
  SSBSN_TRY(checked_int(x.size(3), "W", &a.W));
  SSBSN_TRY(checked_int(x.size(1), "Ci", &a.Ci));
  SSBSN_TRY(checked_int(Co, "Co", &a.Co));
  a.taps = taps;
  return "";
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// y = act(bias + conv(x, w)), written into the preallocated y.
std::string conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     const at::Tensor& y, const std::vector<int64_t>& dys, const std::vector<int64_t>& dxs, bool relu,
                     bool nhwc, int64_t algo, int64_t stream, int64_t device) {
  Taps taps;
  SSBSN_TRY(make_taps(dys, dxs, &taps));
  SSBSN_TRY(check_input(x, "x", nhwc));
  SSBSN_TRY(check_device(w, "w", x));
  SSBSN_REQUIRE(w.dim() == 3 && w.size(0) == taps.count && w.size(1) == x.size(1) && w.is_contiguous() &&
                    w.scalar_type() == x.scalar_type(),
                "ssbsn conv: w must be a contiguous [taps, Ci, Co] tensor of x's dtype, got ", w.sizes());
  const int64_t Co = w.size(2);
  SSBSN_TRY(check_act(y, "y", x, Co, nhwc));
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    SSBSN_TRY(check_device(b, "bias", x));
    SSBSN_REQUIRE(b.dim() == 1 && b.size(0) == Co && b.scalar_type() == at::kFloat && b.is_contiguous(),
                  "ssbsn conv: bias must be a contiguous float32 [Co] tensor");
    bias_ptr = b.data_ptr<float>();
  }
  ssbsn_conv::ConvFwdArgs a;
  SSBSN_TRY(fill_problem(a, x, Co, taps, nhwc, algo));
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.bias = bias_ptr;
  a.y = y.data_ptr();
  a.relu = relu;
  return message(ssbsn_conv::conv_fwd(a, as_stream(stream), static_cast<int>(device)));
}

// dw[t, ci, co] (fp32, preallocated [taps, Ci, Co]) from x and dz. splits == 0: automatic.
std::string conv_wgrad(const at::Tensor& x, const at::Tensor& dz, const at::Tensor& dw,
                       const std::vector<int64_t>& dys, const std::vector<int64_t>& dxs, bool nhwc, int64_t algo,
                       int64_t splits, int64_t num_sms, int64_t stream, int64_t device) {
  Taps taps;
  SSBSN_TRY(make_taps(dys, dxs, &taps));
  SSBSN_TRY(check_input(x, "x", nhwc));
  SSBSN_REQUIRE(dz.dim() == 4, "ssbsn conv: dz must be 4-D, got ", dz.sizes());
  SSBSN_TRY(check_act(dz, "dz", x, dz.size(1), nhwc));
  SSBSN_TRY(check_device(dw, "dw", x));
  SSBSN_REQUIRE(dw.dim() == 3 && dw.size(0) == taps.count && dw.size(1) == x.size(1) && dw.size(2) == dz.size(1) &&
                    dw.scalar_type() == at::kFloat && dw.is_contiguous(),
                "ssbsn conv: dw must be a contiguous float32 [taps, Ci, Co] tensor, got ", dw.sizes());
  ssbsn_conv::ConvWgradArgs a;
  SSBSN_TRY(fill_problem(a, x, dz.size(1), taps, nhwc, algo));
  if (splits > 0) {
    SSBSN_TRY(checked_int(splits, "splits", &a.splits));
  } else {
    int sms = 0;
    SSBSN_TRY(checked_int(num_sms, "num_sms", &sms));
    a.splits = ssbsn_conv::conv_wgrad_default_splits(a, sms);
  }
  at::Tensor ws;
  const size_t ws_floats = ssbsn_conv::conv_wgrad_workspace_floats(a);
  if (ws_floats > 0) {
    ws = at::empty({static_cast<int64_t>(ws_floats)}, x.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
  }
  a.x = x.data_ptr();
  a.dz = dz.data_ptr();
  a.dw = dw.data_ptr<float>();
  return message(ssbsn_conv::conv_wgrad(a, as_stream(stream), static_cast<int>(device)));
}

// dz = grad * (out > 0) into the preallocated dz (when out is given); db = sum of dz over
// N, H, W into the preallocated fp32 db (when given). hw_chunk == 0: automatic.
std::string relu_grad_bias(const at::Tensor& grad, const std::optional<at::Tensor>& out,
                           const std::optional<at::Tensor>& dz, const std::optional<at::Tensor>& db, bool nhwc,
                           int64_t hw_chunk, int64_t stream, int64_t device) {
  SSBSN_TRY(check_input(grad, "grad", nhwc));
  SSBSN_REQUIRE(out.has_value() == dz.has_value(), "ssbsn conv: out and dz go together");
  ssbsn_conv::ReluGradBiasArgs a;
  SSBSN_TRY(dtype_code(grad, &a.dtype));
  a.nhwc = nhwc;
  SSBSN_TRY(checked_int(grad.size(0), "N", &a.N));
  SSBSN_TRY(checked_int(grad.size(2), "H", &a.H));
  SSBSN_TRY(checked_int(grad.size(3), "W", &a.W));
  SSBSN_TRY(checked_int(grad.size(1), "C", &a.C));
  SSBSN_TRY(checked_int(hw_chunk, "hw_chunk", &a.hw_chunk));
  a.grad = grad.data_ptr();
  if (out.has_value()) {
    SSBSN_TRY(check_act(*out, "out", grad, grad.size(1), nhwc));
    SSBSN_TRY(check_act(*dz, "dz", grad, grad.size(1), nhwc));
    a.out = out->data_ptr();
    a.dz = dz->data_ptr();
  }
  at::Tensor ws;
  if (db.has_value()) {
    SSBSN_TRY(check_device(*db, "db", grad));
    SSBSN_REQUIRE(db->dim() == 1 && db->size(0) == grad.size(1) && db->scalar_type() == at::kFloat &&
                      db->is_contiguous(),
                  "ssbsn conv: db must be a contiguous float32 [C] tensor");
    a.db = db->data_ptr<float>();
    ws = at::empty({static_cast<int64_t>(ssbsn_conv::relu_grad_bias_workspace_floats(a))},
                   grad.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
  }
  return message(ssbsn_conv::relu_grad_bias(a, as_stream(stream), static_cast<int>(device)));
}

#undef SSBSN_TRY
#undef SSBSN_REQUIRE

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SS-BSN blind-spot tap convolutions (masked and dilated), forward and backward";
  m.def("conv_fwd", &conv_fwd, "y = act(bias + tap-conv(x, w)) into y; returns \"\" or an error message", py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("y"), py::arg("dys"), py::arg("dxs"), py::arg("relu"), py::arg("nhwc"), py::arg("algo"),
        py::arg("stream"), py::arg("device"));
  m.def("conv_wgrad", &conv_wgrad, "fp32 weight gradient [taps, Ci, Co] into dw; returns \"\" or an error message", py::arg("x"), py::arg("dz"),
        py::arg("dw"), py::arg("dys"), py::arg("dxs"), py::arg("nhwc"), py::arg("algo"), py::arg("splits"),
        py::arg("num_sms"), py::arg("stream"), py::arg("device"));
  m.def("relu_grad_bias", &relu_grad_bias, "ReLU mask of the gradient and the bias gradient; returns \"\" or an error message", py::arg("grad"),
        py::arg("out"), py::arg("dz"), py::arg("db"), py::arg("nhwc"), py::arg("hw_chunk"), py::arg("stream"),
        py::arg("device"));
  m.def("implementation", []() { return std::string(ssbsn_conv::implementation()); });
}
