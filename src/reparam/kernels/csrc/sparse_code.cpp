// dense_sparse's whitened code step (methods/dense_sparse.py; its definition in torch: kernels/sparse_code.py).
// Every input channel's column y = Dᵀw is coded in turn (support: the nnz atoms of largest |C·y|; values: the
// ridged system solved on it; approximation: G·s) and its error compensated onto the columns not yet coded
// (GPTQ's loop, core/compensation.py). In torch that was a dozen small ops per column plus the loop's own,
// ~0.5-0.7 ms a column over thousands of columns per layer and round, most of it per-op overhead; here it is
// one call per layer and round, whose work is the products and the solves.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "scratch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

namespace reparam {
namespace {

// One body, compiled for AVX-512, AVX2 and baseline x86 and picked at load time (an ifunc: Linux only): the
// loops below are contiguous row updates that the compiler vectorizes when the target allows it.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define REPARAM_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define REPARAM_VECTOR_CLONES
#endif

// A[i, j] -= U[k, i]·U[k, j] for the rows i in [first, last), j ≥ i: row k's share of the rows below it.
inline void subtract_row_product(double* a, int64_t n, int64_t k, int64_t first, int64_t last) {
  const double* row = a + k * n;
  for (int64_t i = first; i < last; ++i) {
    const double u = row[i];
    double* target = a + i * n;
    for (int64_t j = i; j < n; ++j) target[j] -= u * row[j];
  }
}

constexpr int64_t kPanel = 4;

// Upper Cholesky factor U (A = UᵀU) of a row-major symmetric matrix, in place of its upper triangle.
// False at a pivot that is not positive (a support that is numerically singular: the caller then takes
// a pivoted LU). Rows are factored four at a time, and the rows below take the four at once: a quarter
// of the passes over them, 1.7x faster than one row at a time at n = 150-190, where LAPACK's call is
// mostly overhead.
REPARAM_VECTOR_CLONES bool cholesky_upper(double* a, int64_t n) {
  for (int64_t k0 = 0; k0 < n; k0 += kPanel) {
    const int64_t end = std::min(k0 + kPanel, n);
    for (int64_t k = k0; k < end; ++k) {
      double* row = a + k * n;
      if (!(row[k] > 0)) return false;
      const double pivot = std::sqrt(row[k]), inverse = 1.0 / pivot;
      row[k] = pivot;
      for (int64_t j = k + 1; j < n; ++j) row[j] *= inverse;
      subtract_row_product(a, n, k, k + 1, end);
    }
    if (end == n) break;  // only the last panel can be short
    const double *r0 = a + k0 * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
    for (int64_t i = end; i < n; ++i) {
      const double u0 = r0[i], u1 = r1[i], u2 = r2[i], u3 = r3[i];
      double* __restrict__ target = a + i * n;
      for (int64_t j = i; j < n; ++j) target[j] -= u0 * r0[j] + u1 * r1[j] + u2 * r2[j] + u3 * r3[j];
    }
  }
  return true;
}

// x = (UᵀU)⁻¹·b, in place of b.
REPARAM_VECTOR_CLONES void cholesky_solve(const double* u, int64_t n, double* b) {
  for (int64_t k = 0; k < n; ++k) {  // Uᵀz = b, row k of U spreading z_k over the entries after it
    const double* row = u + k * n;
    b[k] /= row[k];
    for (int64_t j = k + 1; j < n; ++j) b[j] -= row[j] * b[k];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // U·x = z
    const double* row = u + i * n;
    double sum = b[i];
    for (int64_t j = i + 1; j < n; ++j) sum -= row[j] * b[j];
    b[i] = sum / row[i];
  }
}

// out = Σ_b y_b·Cᵀ[b, :] = C·y: rows of Cᵀ read contiguously (an axpy per row, which vectorizes).
REPARAM_VECTOR_CLONES void transposed_mv(const double* transposed, const double* y, int64_t atoms, double* out) {
  std::fill(out, out + atoms, 0.0);
  for (int64_t b = 0; b < atoms; ++b) {
    const double* row = transposed + b * atoms;
    const double v = y[b];
    for (int64_t a = 0; a < atoms; ++a) out[a] += v * row[a];
  }
}

// out += Σ_i values_i·G[index_i, :]: G·s for symmetric G, its rows read contiguously for its columns.
REPARAM_VECTOR_CLONES void add_rows(const double* gram, int64_t atoms, const int64_t* index, const double* values,
                                    int64_t nnz, double* out) {
  for (int64_t i = 0; i < nnz; ++i) {
    const double* row = gram + index[i] * atoms;
    const double v = values[i];
    for (int64_t a = 0; a < atoms; ++a) out[a] += v * row[a];
  }
}

// target −= weight·x
REPARAM_VECTOR_CLONES void subtract_scaled(double* target, double weight, const double* x, int64_t n) {
  for (int64_t a = 0; a < n; ++a) target[a] -= weight * x[a];
}

// What a column's code reads: Cᵀ (contributions, transposed), the ridged system, G = DᵀD.
struct Coder {
  const double* contribution_t;
  const double* system;
  const double* gram;
  int64_t atoms, nnz;
};

// code_column's work space, reused across a layer's columns.
struct ColumnScratch {
  std::vector<double> scores, sub;
  std::vector<int64_t> order;
};

// One column y (atoms,): its support (ascending) into index, its values, and G·s into approximation.
void code_column(const Coder& coder, const double* y, ColumnScratch& scratch_space, int64_t* index, double* value,
                 double* approximation) {
  const int64_t atoms = coder.atoms, nnz = coder.nnz;
  double* score = scratch(scratch_space.scores, atoms);
  transposed_mv(coder.contribution_t, y, atoms, score);
  int64_t* order = scratch(scratch_space.order, atoms);
  std::iota(order, order + atoms, 0);
  // Largest |score| first; equal scores by index, so the support never depends on the sort's internals.
  std::nth_element(order, order + (nnz - 1), order + atoms, [score](int64_t a, int64_t b) {
    const double fa = std::abs(score[a]), fb = std::abs(score[b]);
    return fa > fb || (fa == fb && a < b);
  });
  std::sort(order, order + nnz);
  std::copy(order, order + nnz, index);

  double* sub = scratch(scratch_space.sub, nnz * nnz);
  auto gather_sub = [&] {
    for (int64_t i = 0; i < nnz; ++i) {
      const double* row = coder.system + index[i] * atoms;
      for (int64_t j = 0; j < nnz; ++j) sub[i * nnz + j] = row[index[j]];
    }
  };
  gather_sub();
  for (int64_t i = 0; i < nnz; ++i) value[i] = y[index[i]];
  if (cholesky_upper(sub, nnz)) {
    cholesky_solve(sub, nnz, value);
  } else {  // no Cholesky factor (the factorization overwrote the system up to its failed pivot): pivoted LU
    gather_sub();
    const at::Tensor solved = at::linalg_solve(at::from_blob(sub, {nnz, nnz}, at::kDouble),
                                               at::from_blob(value, {nnz, 1}, at::kDouble));
    std::copy(solved.const_data_ptr<double>(), solved.const_data_ptr<double>() + nnz, value);
  }
  std::fill(approximation, approximation + atoms, 0.0);
  add_rows(coder.gram, atoms, index, value, nnz, approximation);
}

void check_matrix(const at::Tensor& matrix, int64_t rows, int64_t columns, const char* name) {
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) == rows && matrix.size(1) == columns &&
                  matrix.scalar_type() == at::kDouble && matrix.is_contiguous() && matrix.device().is_cpu(),
              "reparam: sparse_codes_compensated needs ", name, " as a contiguous float64 CPU (", rows, ", ",
              columns, ") matrix, got ", matrix.sizes(), " ", matrix.scalar_type());
}

// Every column of projected (atoms, in) coded in processing order with GPTQ's compensation, the loop of
// core/compensation.py (Compensation.run) fused with the column code: column c's error, divided by its pivot
// U[c, c], goes onto the rest of its step through row c of U at once, onto the rest of its block after each
// step, and onto the later blocks after each block (the last two as matrix products). Columns are held as
// rows (in processing order, atoms contiguous). Returns (values, indices), (nnz, in), at the columns' own
// positions.
std::tuple<at::Tensor, at::Tensor> sparse_codes_compensated(const at::Tensor& projected, const at::Tensor& update,
                                                            const at::Tensor& order, const at::Tensor& dead,
                                                            const at::Tensor& contribution_t,
                                                            const at::Tensor& system, const at::Tensor& gram,
                                                            int64_t nnz, int64_t block, int64_t step) {
  TORCH_CHECK(projected.dim() == 2 && projected.scalar_type() == at::kDouble && projected.device().is_cpu(),
              "reparam: sparse_codes_compensated needs projected as a float64 CPU (atoms, in) matrix, got ",
              projected.sizes(), " ", projected.scalar_type());
  const int64_t atoms = projected.size(0), columns = projected.size(1);
  check_matrix(update, columns, columns, "update");
  check_matrix(contribution_t, atoms, atoms, "contribution_t");
  check_matrix(system, atoms, atoms, "system");
  check_matrix(gram, atoms, atoms, "gram");
  TORCH_CHECK(order.dim() == 1 && order.size(0) == columns && order.scalar_type() == at::kLong &&
                  dead.dim() == 1 && dead.size(0) == columns && dead.scalar_type() == at::kBool,
              "reparam: sparse_codes_compensated needs order (int64) and dead (bool) of length ", columns);
  TORCH_CHECK(nnz >= 1 && nnz <= atoms, "reparam: sparse_codes_compensated needs 1 <= nnz <= ", atoms, ", got ", nnz);
  TORCH_CHECK(block >= 1 && step >= 1, "reparam: sparse_codes_compensated needs block and step >= 1");

  // (in, atoms): row c is processed column c, dead ones zero (any code is free there).
  const at::Tensor order_c = order.contiguous(), dead_c = dead.contiguous();
  at::Tensor work = projected.t().index_select(0, order_c).contiguous();
  work.index_put_({dead_c}, 0.0);
  at::Tensor errors = at::empty({block, atoms}, at::kDouble);
  at::Tensor values = at::empty({nnz, columns}, at::kDouble);
  at::Tensor indices = at::empty({nnz, columns}, at::kLong);
  const Coder coder{contribution_t.const_data_ptr<double>(), system.const_data_ptr<double>(),
                    gram.const_data_ptr<double>(), atoms, nnz};
  const int64_t* position = order_c.const_data_ptr<int64_t>();
  const double* u = update.const_data_ptr<double>();
  double* rows = work.mutable_data_ptr<double>();
  double* error_rows = errors.mutable_data_ptr<double>();
  double* values_out = values.mutable_data_ptr<double>();
  int64_t* indices_out = indices.mutable_data_ptr<int64_t>();
  ColumnScratch scratch_space;
  std::vector<double> value(nnz), approximation(atoms);
  std::vector<int64_t> index(nnz);

  for (int64_t start = 0; start < columns; start += block) {
    const int64_t end = std::min(start + block, columns);
    for (int64_t first = start; first < end; first += step) {
      const int64_t stop = std::min(first + step, end);
      for (int64_t c = first; c < stop; ++c) {
        double* y = rows + c * atoms;
        code_column(coder, y, scratch_space, index.data(), value.data(), approximation.data());
        for (int64_t r = 0; r < nnz; ++r) {
          values_out[r * columns + position[c]] = value[r];
          indices_out[r * columns + position[c]] = index[r];
        }
        double* error = error_rows + (c - start) * atoms;
        const double pivot = u[c * columns + c];
        for (int64_t a = 0; a < atoms; ++a) error[a] = (y[a] - approximation[a]) / pivot;
        for (int64_t j = c + 1; j < stop; ++j)  // the rest of the step, one column's error at a time
          subtract_scaled(rows + j * atoms, u[c * columns + j], error, atoms);
      }
      if (stop < end)  // the rest of the block: (end − stop, atoms) −= U[first:stop, stop:end]ᵀ · E[first:stop]
        work.narrow(0, stop, end - stop).addmm_(update.narrow(0, first, stop - first).narrow(1, stop, end - stop).t(),
                                                errors.narrow(0, first - start, stop - first), 1.0, -1.0);
    }
    if (end < columns)  // the later blocks
      work.narrow(0, end, columns - end).addmm_(update.narrow(0, start, end - start).narrow(1, end, columns - end).t(),
                                                errors.narrow(0, 0, end - start), 1.0, -1.0);
  }
  return {values, indices};
}

}  // namespace
}  // namespace reparam

TORCH_LIBRARY_FRAGMENT(reparam_cpu, m) {
  m.def("sparse_codes_compensated(Tensor projected, Tensor update, Tensor order, Tensor dead, Tensor contribution_t, "
        "Tensor system, Tensor gram, int nnz, int block, int step) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reparam_cpu, CPU, m) { m.impl("sparse_codes_compensated", &reparam::sparse_codes_compensated); }
