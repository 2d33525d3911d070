// The compiled bit-plane kernels, shared by their op registrations (bitplane.cpp) and the direct Python entry
// (python_entry.cpp). Arguments as the ops' schemas: see bitplane.cpp.
#pragma once

#include <ATen/ATen.h>

namespace reparam {

at::Tensor bitplane_lut(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                        const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias);

at::Tensor bitplane_decode_mm(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                              const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias);

}  // namespace reparam
