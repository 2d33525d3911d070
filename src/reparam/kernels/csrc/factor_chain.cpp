// y = (x·Aᵀ)·Bᵀ + b at a few tokens: the inference forward of the factorized layers (low_rank: A = V, B = U;
// dense_sparse's CPU path: A = its packed S made dense, B = D). Two library GEMVs cost a fixed ~9 µs each on
// these shapes here (a 96x384 product took as long as a 384x384 one), more than their arithmetic; this runs both
// products in one call, four rows of A or B at a time against up to four tokens, 16 columns per FMA (AVX2: two
// rows, 8 columns). CPUs without AVX2 take the library. Outputs equal the library's up to float summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "factor_chain.h"
#include "isa.h"
#include "scratch.h"

#include <cstdint>
#include <vector>

namespace reparam {
namespace {

constexpr int64_t kGrainMacs = int64_t{1} << 18;  // multiply-adds a thread takes at least (~30 µs)

constexpr int64_t kTokensPerPass = 4;  // tokens per pass over the weights: 4 rows x 4 tokens of sums in registers

#ifdef REPARAM_X86
// y[t, o] = Σ_j w[o, j]·x[t, j] (+ bias[o]) for rows o of a row-major (rows, in) w, tokens t < TOK; x (TOK, in) and
// y (TOK, rows) row-major.
//
// 16 columns from j (those under mask) of ROWS rows of w, multiplied with TOK tokens' and added to acc.
template <int ROWS, int TOK>
__attribute__((target("avx512f"))) inline void gemv_step_avx512(const float* w, const float* x, int64_t in, int64_t o,
                                                                int64_t j, __mmask16 mask, __m512 (&acc)[ROWS][TOK]) {
  __m512 row[ROWS];
  for (int r = 0; r < ROWS; ++r) row[r] = _mm512_maskz_loadu_ps(mask, w + (o + r) * in + j);
  for (int t = 0; t < TOK; ++t) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * in + j);
    for (int r = 0; r < ROWS; ++r) acc[r][t] = _mm512_fmadd_ps(row[r], xv, acc[r][t]);
  }
}

// ROWS rows of w against TOK tokens: each 16 columns of a row are loaded once for all tokens.
template <int ROWS, int TOK>
__attribute__((target("avx512f"))) void gemv_block_avx512(const float* w, const float* x, int64_t in, int64_t rows,
                                                          int64_t o, const float* bias, float* y) {
  __m512 acc[ROWS][TOK];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOK; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= in; j += 16) gemv_step_avx512<ROWS, TOK>(w, x, in, o, j, 0xFFFF, acc);
  if (j < in) gemv_step_avx512<ROWS, TOK>(w, x, in, o, j, static_cast<__mmask16>((1u << (in - j)) - 1), acc);
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOK; ++t) {
      const float sum = _mm512_reduce_add_ps(acc[r][t]);
      y[t * rows + o + r] = bias ? sum + bias[o + r] : sum;
    }
}

template <int TOK>
void gemv_avx512(const float* w, const float* x, int64_t in, int64_t rows, int64_t o0, int64_t o1,
                 const float* bias, float* y) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) gemv_block_avx512<4, TOK>(w, x, in, rows, o, bias, y);
  for (; o < o1; ++o) gemv_block_avx512<1, TOK>(w, x, in, rows, o, bias, y);
}

// The same with AVX2: 8 columns per FMA, two rows at a time (2 rows x 4 tokens of sums fit the 16 registers).
template <int ROWS, int TOK>
__attribute__((target("avx2,fma"))) inline void gemv_step_avx2(const float* w, const float* x, int64_t in, int64_t o,
                                                               int64_t j, __m256i mask, __m256 (&acc)[ROWS][TOK]) {
  __m256 row[ROWS];
  for (int r = 0; r < ROWS; ++r) row[r] = _mm256_maskload_ps(w + (o + r) * in + j, mask);
  for (int t = 0; t < TOK; ++t) {
    const __m256 xv = _mm256_maskload_ps(x + t * in + j, mask);
    for (int r = 0; r < ROWS; ++r) acc[r][t] = _mm256_fmadd_ps(row[r], xv, acc[r][t]);
  }
}

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

template <int ROWS, int TOK>
__attribute__((target("avx2,fma"))) void gemv_block_avx2(const float* w, const float* x, int64_t in, int64_t rows,
                                                         int64_t o, const float* bias, float* y) {
  __m256 acc[ROWS][TOK];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOK; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 8 <= in; j += 8) gemv_step_avx2<ROWS, TOK>(w, x, in, o, j, all, acc);
  if (j < in) {
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(in - j)),
                                            _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
    gemv_step_avx2<ROWS, TOK>(w, x, in, o, j, tail, acc);
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOK; ++t) {
      const float sum = sum8(acc[r][t]);
      y[t * rows + o + r] = bias ? sum + bias[o + r] : sum;
    }
}

template <int TOK>
void gemv_avx2(const float* w, const float* x, int64_t in, int64_t rows, int64_t o0, int64_t o1, const float* bias,
               float* y) {
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) gemv_block_avx2<2, TOK>(w, x, in, rows, o, bias, y);
  for (; o < o1; ++o) gemv_block_avx2<1, TOK>(w, x, in, rows, o, bias, y);
}
#endif

// Rows [o0, o1) of y (tok, rows) = x (tok, in)·wᵀ + bias for tok ≤ kTokensPerPass, with AVX2 or AVX-512
// (takes_simd).
void gemv_pass(int isa, const float* w, const float* x, int64_t tok, int64_t in, int64_t rows, int64_t o0,
               int64_t o1, const float* bias, float* y) {
#ifdef REPARAM_X86
  if (isa == kIsaAvx512) {
    switch (tok) {
      case 1: return gemv_avx512<1>(w, x, in, rows, o0, o1, bias, y);
      case 2: return gemv_avx512<2>(w, x, in, rows, o0, o1, bias, y);
      case 3: return gemv_avx512<3>(w, x, in, rows, o0, o1, bias, y);
      default: return gemv_avx512<4>(w, x, in, rows, o0, o1, bias, y);
    }
  }
  switch (tok) {
    case 1: return gemv_avx2<1>(w, x, in, rows, o0, o1, bias, y);
    case 2: return gemv_avx2<2>(w, x, in, rows, o0, o1, bias, y);
    case 3: return gemv_avx2<3>(w, x, in, rows, o0, o1, bias, y);
    default: return gemv_avx2<4>(w, x, in, rows, o0, o1, bias, y);
  }
#endif
}

// Only SIMD code beats the library here: a portable loop (eight running sums, vectorized by GCC for SSE2) ran
// 2x slower than two library GEMVs at 8 tokens on a Zen 5 capped to it.
bool takes_simd(int isa) {
#ifdef REPARAM_X86
  return isa >= kIsaAvx2;
#else
  return false;
#endif
}

// y (tokens, rows) = x (tokens, in)·wᵀ + bias, threaded over rows when each thread gets kGrainMacs; each thread
// sweeps its rows once per kTokensPerPass tokens.
void gemv(int isa, const float* w, const float* x, int64_t tokens, int64_t in, int64_t rows, const float* bias,
          float* y) {
  const auto run = [&](int64_t o0, int64_t o1) {
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokensPerPass)
      gemv_pass(isa, w, x + t0 * in, std::min(kTokensPerPass, tokens - t0), in, rows, o0, o1, bias, y + t0 * rows);
  };
  const int64_t grain = std::max<int64_t>(4, kGrainMacs / std::max<int64_t>(in * tokens, 1));
  if (rows <= grain) run(0, rows);
  else at::parallel_for(0, rows, grain, run);
}

bool fast_path_takes(const at::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

thread_local std::vector<float> codes_buffer;

}  // namespace

at::Tensor factor_chain_linear(const at::Tensor& x, const at::Tensor& first, const at::Tensor& second,
                               const c10::optional<at::Tensor>& bias, int64_t max_tokens) {
  const int64_t in = x.dim() > 0 ? x.size(-1) : 0;
  const int64_t tokens = in > 0 ? x.numel() / in : 0;
  const bool records = at::GradMode::is_enabled() &&
                       (x.requires_grad() || first.requires_grad() || second.requires_grad() ||
                        (bias.has_value() && bias->requires_grad()));
  const int isa = active_isa();
  const bool takes = takes_simd(isa) && !records && tokens > 0 && tokens <= max_tokens && first.dim() == 2 &&
                     second.dim() == 2 && first.size(1) == in && second.size(1) == first.size(0) &&
                     fast_path_takes(x) && fast_path_takes(first) && fast_path_takes(second) &&
                     (!bias.has_value() || (fast_path_takes(*bias) && bias->numel() == second.size(0)));
  if (!takes) return at::linear(at::linear(x, first), second, bias);  // autograd, other dtypes, many tokens
  const int64_t rank = first.size(0), out = second.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  at::Tensor y = at::empty(sizes, x.options());
  float* codes = scratch(codes_buffer, tokens * rank);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  gemv(isa, first.data_ptr<float>(), x.data_ptr<float>(), tokens, in, rank, nullptr, codes);
  gemv(isa, second.data_ptr<float>(), codes, tokens, rank, out, b, y.data_ptr<float>());
  return y;
}

}  // namespace reparam
