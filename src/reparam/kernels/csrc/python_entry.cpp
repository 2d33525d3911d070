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

// bitplane_linear (bitplane_choice.cpp: the LUT or decode-and-GEMM), straight to the kernel unless autograd records.
at::Tensor entry_bitplane_linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                                 const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const bool records =
      at::GradMode::is_enabled() && (x.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (records) {
    static const auto op = registered_op("reparam_cpu::bitplane_linear");
    return op.call(x, planes, coef, offset, group_size, bias);
  }
  return reparam::bitplane_linear(x, planes, coef, offset, group_size, bias);
}

}  // namespace
}  // namespace reparam

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitplane_linear", &reparam::entry_bitplane_linear,
        "bitplane_lut or bitplane_decode_mm by token count, straight to the kernel when autograd records nothing",
        py::call_guard<py::gil_scoped_release>());
  m.def("factor_chain_linear", &reparam::factor_chain_linear,
        "(x·firstᵀ)·secondᵀ + bias: compiled GEMVs at few float32 tokens without autograd, else at::linear twice",
        py::call_guard<py::gil_scoped_release>());
}
