// Compiled CPU forward of dense_sparse layers at few tokens: y = (x·Sᵀ)·Dᵀ + b
// with S (atoms, in) stored column-sparse as values and indices (nnz, in).
// x·Sᵀ is a scatter-add of the nnz·in products x_j·S[a, j] into a reused
// (tokens, atoms) buffer, never a dense S; then one GEMM with D.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "scratch.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace reparam {
namespace {

// z (tokens, atoms) = x·Sᵀ by scatter-add of the s·in products, then y = z·Dᵀ + b.
template <typename scalar_t, typename value_t, typename index_t>
void sparse_codes(const scalar_t* __restrict__ x, const value_t* __restrict__ values,
                  const index_t* __restrict__ indices, int64_t tokens, int64_t in, int64_t nnz, int64_t atoms,
                  float* __restrict__ z) {
  // Indices are checked in one pass first: a stray one would write outside z.
  const int64_t count = nnz * in;
  bool inside = true;
  for (int64_t e = 0; e < count; ++e) inside &= indices[e] >= 0 && static_cast<int64_t>(indices[e]) < atoms;
  if (!inside) {
    for (int64_t e = 0; e < count; ++e)
      TORCH_CHECK(indices[e] >= 0 && static_cast<int64_t>(indices[e]) < atoms, "reparam: dense_sparse index ",
                  static_cast<int64_t>(indices[e]), " outside [0, ", atoms, ")");
  }
  std::fill(z, z + tokens * atoms, 0.f);
  for (int64_t t = 0; t < tokens; ++t) {
    const scalar_t* row = x + t * in;
    float* codes = z + t * atoms;
    for (int64_t r = 0; r < nnz; ++r)
      for (int64_t j = 0; j < in; ++j)
        codes[indices[r * in + j]] += static_cast<float>(values[r * in + j]) * static_cast<float>(row[j]);
  }
}

thread_local std::vector<float> codes_buffer;

at::Tensor dense_sparse_linear(const at::Tensor& x, const at::Tensor& d, const at::Tensor& values,
                               const at::Tensor& indices, const c10::optional<at::Tensor>& bias) {
  const int64_t in = x.size(-1), out = d.size(0), atoms = d.size(1), nnz = values.size(0);
  TORCH_CHECK(values.dim() == 2 && values.size(1) == in && indices.sizes() == values.sizes(),
              "reparam: values and indices must both be (nnz, in) = (", nnz, ", ", in, "), got ", values.sizes(),
              " and ", indices.sizes());
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  const int64_t tokens = x2.size(0);
  float* codes = scratch(codes_buffer, tokens * atoms);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_sparse_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "dense_sparse_values", [&] {
      using v_t = scalar_t;
      AT_DISPATCH_INTEGRAL_TYPES(idx.scalar_type(), "dense_sparse_indices", [&] {
        sparse_codes<x_t, v_t, scalar_t>(x2.data_ptr<x_t>(), v.data_ptr<v_t>(), idx.data_ptr<scalar_t>(), tokens,
                                         in, nnz, atoms, codes);
      });
    });
  });
  at::Tensor z = at::from_blob(codes, {tokens, atoms}, at::TensorOptions().dtype(at::kFloat));
  if (d.scalar_type() != at::kFloat) z = z.to(d.scalar_type());
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  at::Tensor y = at::empty({tokens, out}, d.options());
  if (bias.has_value())
    at::addmm_out(y, *bias, z, d.t());
  else
    at::mm_out(y, z, d.t());
  return y.view(sizes);
}

}  // namespace
}  // namespace reparam

TORCH_LIBRARY_FRAGMENT(reparam_cpu, m) {
  m.def("dense_sparse_linear(Tensor x, Tensor d, Tensor values, Tensor indices, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(reparam_cpu, CPU, m) { m.impl("dense_sparse_linear", &reparam::dense_sparse_linear); }
