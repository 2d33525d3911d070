// The compiled bit-plane kernels, shared by their op registrations (bitplane.cpp) and the direct Python entry
// (python_entry.cpp). Arguments as the ops' schemas: see bitplane.cpp.
#pragma once

#include <ATen/ATen.h>

namespace reparam {

at::Tensor bitplane_lut(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                        const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias);

at::Tensor bitplane_decode_mm(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                              const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias);

// bitplane_decode_mm with bf16 products (bf16 inputs, rounded once) when bf16 is set, float32 ones otherwise.
at::Tensor decode_mm(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef, const at::Tensor& offset,
                     int64_t group_size, const c10::optional<at::Tensor>& bias, bool bf16);

// Whether torch itself would multiply this input in bf16 on this CPU: a bf16 input, or a float32 one under
// torch.backends.mkldnn.matmul.fp32_precision = "bf16" (what torch.set_float32_matmul_precision("medium") sets),
// the switch torch's own CPU matmuls (a dense nn.Linear among them) follow; only where the CPU has native bf16.
bool bf16_products(const at::Tensor& x);

// The kernel for this call: bitplane_lut up to the crossover token count (bitplane_choice.cpp), else
// bitplane_decode_mm. The op `bitplane_linear`.
at::Tensor bitplane_linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                           const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias);

}  // namespace reparam
