// The factorized layers' inference forward (factor_chain.cpp), called from python_entry.cpp.
#pragma once

#include <ATen/ATen.h>

namespace reparam {

// (x·firstᵀ)·secondᵀ + bias; the compiled GEMVs up to max_tokens float32 tokens when autograd records nothing,
// else at::linear twice (which records autograd as usual).
at::Tensor factor_chain_linear(const at::Tensor& x, const at::Tensor& first, const at::Tensor& second,
                               const c10::optional<at::Tensor>& bias, int64_t max_tokens);

}  // namespace reparam
