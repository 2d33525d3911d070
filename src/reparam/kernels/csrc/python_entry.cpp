// The eager entry into the compiled kernels: one pybind call from a layer's forward (QuantizedLinear's bit-plane
// kernels; the factorized layers' factor_chain_linear, which needs no op: it falls back to aten ops itself).
// Calling an op through torch.ops costs the dispatcher's argument parsing (~2 µs here) and the Python autograd
// wrapper that torch.library.register_autograd puts around it (~6 µs): together as much as a whole 384x384
// layer. This entry calls the kernels directly whenever autograd has nothing to record; when it must record
// (grad mode on and x or the bias requiring grad) it calls the registered op, so training sees the same graph as
// before. torch.compile never reaches it: bitplane_linear uses the ops while compiling, so graphs keep them whole.
#include <torch/extension.h>

#include "bitplane.h"
#include "factor_chain.h"

namespace reparam {
namespace {

using KernelSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   const c10::optional<at::Tensor>&);

c10::TypedOperatorHandle<KernelSignature> registered_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<KernelSignature>();
}

// The LUT up to lut_max_tokens tokens, decode-and-GEMM above (the crossover lives in bitplane.py).
at::Tensor bitplane_linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                           const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias,
                           int64_t lut_max_tokens) {
  const int64_t in = x.dim() > 0 ? x.size(-1) : 0;
  const bool lut = (in > 0 ? x.numel() / in : 0) <= lut_max_tokens;
  const bool records =
      at::GradMode::is_enabled() && (x.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (records) {
    static const auto lut_op = registered_op("reparam_cpu::bitplane_lut");
    static const auto decode_mm_op = registered_op("reparam_cpu::bitplane_decode_mm");
    return (lut ? lut_op : decode_mm_op).call(x, planes, coef, offset, group_size, bias);
  }
  return lut ? bitplane_lut(x, planes, coef, offset, group_size, bias)
             : bitplane_decode_mm(x, planes, coef, offset, group_size, bias);
}

}  // namespace
}  // namespace reparam

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitplane_linear", &reparam::bitplane_linear,
        "bitplane_lut or bitplane_decode_mm by token count, straight to the kernel when autograd records nothing",
        py::call_guard<py::gil_scoped_release>());
  m.def("factor_chain_linear", &reparam::factor_chain_linear,
        "(x·firstᵀ)·secondᵀ + bias: compiled GEMVs at few float32 tokens without autograd, else at::linear twice",
        py::call_guard<py::gil_scoped_release>());
}
