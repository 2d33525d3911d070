// Compiled CPU forward of the bit-plane layers (shift_add, affine), registered
// as torch ops in the `reparam_cpu` namespace (dense_sparse.cpp adds its own).
//
// Bit-plane weights (see reparam/kernels/bitplane.py for the definition):
//   W[o, j] = Σ_i coef[i, o, g]·bit_i[o, j] + offset[o, g],  g = j / group_size,
//   planes (bits, padded_in/8, out) uint8, bit k of byte b ↔ column 8b + k.
//
// bitplane_lut (few tokens, or any batch where it wins: bitplane_choice.cpp), T-MAC style with exact float
// tables: for every 4 activations of a token a table of the 16 partial sums Σ_m bit_m·x[4q+m] is built once per
// call, 64 tokens at a time; a plane byte's low and high nibbles index the tables of
// its two column quads. With AVX-512 a 16-float table fills one register and
// vpermps looks up 16 outputs per instruction; with AVX2 two vpermps of
// 8 floats and a blend do 8. Lookups are summed in float over a group, then
// scaled by coef once per (plane, group, output): outputs equal the torch
// reference up to float summation order.
//
// bitplane_decode_mm (many tokens): W is decoded tile by tile (1024 inputs ×
// 128 outputs, 512 KB: written and read back within L2) into a reused buffer,
// transposed, and multiplied by MKL's GEMM, accumulating over the input blocks.
//
// With bf16 products (a bf16 input, or torch's float32 matmul precision set to bf16, on a CPU with native bf16),
// chunks of outputs are decoded over the whole input into a bf16 buffer and multiplied once by oneDNN's bf16
// GEMM (AMX where present): the precision torch gives a dense layer in the same setting.
//
// Scratch (tables, tiles, partial sums) lives in thread_local buffers that
// grow to the largest layer seen and are reused: a call allocates its output
// and nothing else of size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bitplane.h"
#include "isa.h"
#include "scratch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace reparam {
namespace {

constexpr int64_t kTokensPerPass = 4;  // token tables held in registers at once
// Tokens whose tables are built at once: 64·in·16 bytes (4 MB at 4096 inputs) bounds the scratch at any batch.
constexpr int64_t kTokensPerChunk = 64;
constexpr int64_t kDecodeTile = 128;   // outputs per decoded tile
constexpr int64_t kDecodeBlockBytes = 128;  // plane bytes per tile: a (1024, 128) float tile, 512 KB, stays in L2
constexpr int64_t kMaxBits = 8;
// Outputs per bf16 GEMM (a 4 MB block at 4096 inputs): of 128, 256, 512 and 1024, best or tied at 4096², 128 tokens.
constexpr int64_t kBf16ChunkOutputs = 512;

struct Layer {
  const uint8_t* planes;  // (bits, nbytes, out)
  const float* coef;      // (bits, out, groups), strided: coef_stride_* per index
  const float* offset;    // (out, groups), strided
  int64_t bits, nbytes, out, groups, group_bytes;
  int64_t coef_stride_i, coef_stride_o, coef_stride_g, offset_stride_o, offset_stride_g;

  float coef_at(int64_t i, int64_t o, int64_t g) const {
    return coef[i * coef_stride_i + o * coef_stride_o + g * coef_stride_g];
  }
  float offset_at(int64_t o, int64_t g) const { return offset[o * offset_stride_o + g * offset_stride_g]; }
};

Layer layer_of(const at::Tensor& planes, const at::Tensor& coef, const at::Tensor& offset, int64_t group_size,
               int64_t in_features) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == at::kByte && planes.is_contiguous(),
              "reparam: planes must be a contiguous uint8 (bits, padded_in/8, out) tensor");
  const int64_t bits = planes.size(0), nbytes = planes.size(1), out = planes.size(2);
  TORCH_CHECK(bits >= 1 && bits <= kMaxBits, "reparam: ", bits, " planes; the kernels take 1 to ", kMaxBits);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && (nbytes * 8) % group_size == 0,
              "reparam: group_size ", group_size, " must be a multiple of 8 dividing the padded input ", nbytes * 8);
  const int64_t groups = nbytes * 8 / group_size;
  // Any strides: a (bits, groups, out) tensor viewed as (bits, out, groups) makes outputs contiguous, the
  // fastest layout (QuantizedLinear caches it so).
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 3 && coef.size(0) == bits && coef.size(1) == out &&
                  coef.size(2) == groups,
              "reparam: coef must be float32 (bits, out, groups) = (", bits, ", ", out, ", ", groups, "), got ",
              coef.sizes(), " ", coef.scalar_type());
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.dim() == 2 && offset.size(0) == out &&
                  offset.size(1) == groups,
              "reparam: offset must be float32 (out, groups) = (", out, ", ", groups, "), got ", offset.sizes(), " ",
              offset.scalar_type());
  TORCH_CHECK(in_features <= nbytes * 8, "reparam: input has ", in_features, " features, the planes hold ",
              nbytes * 8);
  return {planes.data_ptr<uint8_t>(), coef.data_ptr<float>(), offset.data_ptr<float>(), bits, nbytes, out, groups,
          group_size / 8, coef.stride(0), coef.stride(1), coef.stride(2), offset.stride(0), offset.stride(1)};
}

at::Tensor output_for(const at::Tensor& x, int64_t out) {
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  return at::empty(sizes, x.options());
}

thread_local std::vector<float> row_buffer, tables_buffer, xsum_buffer, acc_buffer, tile_buffer, tile_out_buffer,
    input_buffer;
thread_local std::vector<at::BFloat16> bf16_input_buffer, bf16_tile_buffer, bf16_result_buffer;

// The 16 entries of each quad's table from a float row (quads·4 values): entry n is Σ_{bit m of n} row[4q + m],
// added in the order m = 0, 1, 2, 3 starting from +0.
void quad_tables_scalar(const float* row, int64_t quads, float* tables) {
  for (int64_t q = 0; q < quads; ++q) {
    float* e = tables + q * 16;
    e[0] = 0.f;
    for (int m = 0; m < 4; ++m)
      for (int n = 0; n < (1 << m); ++n) e[(1 << m) + n] = e[n] + row[4 * q + m];
  }
}

#ifdef REPARAM_X86
// The same with a quad's table in one register: lane n adds row[4q + m] under the mask of lanes with bit m set,
// in the same order from the same +0, so the entries are bit-identical to the scalar loop's.
__attribute__((target("avx512f"))) void quad_tables_avx512(const float* row, int64_t quads, float* tables) {
  constexpr __mmask16 kLanesWithBit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  for (int64_t q = 0; q < quads; ++q) {
    __m512 e = _mm512_setzero_ps();
    for (int m = 0; m < 4; ++m) e = _mm512_mask_add_ps(e, kLanesWithBit[m], e, _mm512_set1_ps(row[4 * q + m]));
    _mm512_storeu_ps(tables + q * 16, e);
  }
}
#endif

// tables (tokens, padded_in/4, 16): entry n of quad q is Σ_{bit m of n} x[4q + m]; xsum (tokens, groups).
template <typename scalar_t>
void build_tables(int isa, const scalar_t* x, int64_t tokens, int64_t in, int64_t quads, int64_t group_size,
                  float* tables, float* xsum) {
  const int64_t groups = quads * 4 / group_size, padded = quads * 4;
  float* row = scratch(row_buffer, padded);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < in; ++j) row[j] = static_cast<float>(x[t * in + j]);
    std::fill(row + in, row + padded, 0.f);
    float* sums = xsum + t * groups;
    std::fill(sums, sums + groups, 0.f);
    for (int64_t q = 0; q < quads; ++q)
      sums[q * 4 / group_size] += (row[4 * q] + row[4 * q + 1]) + (row[4 * q + 2] + row[4 * q + 3]);
#ifdef REPARAM_X86
    if (isa == kIsaAvx512) {
      quad_tables_avx512(row, quads, tables + t * quads * 16);
      continue;
    }
#endif
    quad_tables_scalar(row, quads, tables + t * quads * 16);
  }
}

struct Lut {
  Layer layer;
  const float* tables;
  const float* xsum;  // (tokens, groups): each group's input sum, the offsets' share
  int64_t quads;
};

// Plane i's share of group g, coef·(table sums), for outputs [o0, o0 + n) and tokens [t0, t0 + tok), added to
// acc (tok rows of stride ld).
void lut_block_scalar(const Lut& lut, int64_t g, int64_t i, int64_t o0, int64_t n, int64_t t0, int64_t tok,
                      float* acc, int64_t ld) {
  const Layer& w = lut.layer;
  float sums[kTokensPerPass];
  for (int64_t o = o0; o < o0 + n; ++o) {
    std::fill(sums, sums + tok, 0.f);
    for (int64_t b = g * w.group_bytes; b < (g + 1) * w.group_bytes; ++b) {
      const uint8_t byte = w.planes[(i * w.nbytes + b) * w.out + o];
      for (int64_t t = 0; t < tok; ++t) {
        const float* table = lut.tables + ((t0 + t) * lut.quads + 2 * b) * 16;
        sums[t] += table[byte & 15] + table[16 + (byte >> 4)];
      }
    }
    const float c = w.coef_at(i, o, g);
    for (int64_t t = 0; t < tok; ++t) acc[t * ld + o - o0] += c * sums[t];
  }
}

#ifdef REPARAM_X86
// 64 outputs (4 registers of 16) × TOK tokens.
template <int TOK>
__attribute__((target("avx512f"))) void lut_block_avx512(const Lut& lut, int64_t g, int64_t i, int64_t o0,
                                                         int64_t t0, float* acc, int64_t ld) {
  const Layer& w = lut.layer;
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(w.coef_stride_o)));
  __m512 sums[TOK][4];
  for (int t = 0; t < TOK; ++t)
    for (int p = 0; p < 4; ++p) sums[t][p] = _mm512_setzero_ps();
  for (int64_t b = g * w.group_bytes; b < (g + 1) * w.group_bytes; ++b) {
    const uint8_t* row = w.planes + (i * w.nbytes + b) * w.out + o0;
    _mm_prefetch(reinterpret_cast<const char*>(row + 256), _MM_HINT_T0);
    __m512i low[4], high[4];
    for (int p = 0; p < 4; ++p) {
      // vpermps reads the low 4 bits of each index: the byte itself indexes the low nibble's table.
      low[p] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * p)));
      high[p] = _mm512_srli_epi32(low[p], 4);
    }
    for (int t = 0; t < TOK; ++t) {
      const float* table = lut.tables + ((t0 + t) * lut.quads + 2 * b) * 16;
      const __m512 low_table = _mm512_loadu_ps(table), high_table = _mm512_loadu_ps(table + 16);
      for (int p = 0; p < 4; ++p)
        sums[t][p] = _mm512_add_ps(sums[t][p], _mm512_add_ps(_mm512_permutexvar_ps(low[p], low_table),
                                                             _mm512_permutexvar_ps(high[p], high_table)));
    }
  }
  const float* coef = w.coef + i * w.coef_stride_i + o0 * w.coef_stride_o + g * w.coef_stride_g;
  for (int p = 0; p < 4; ++p) {
    const float* first = coef + 16 * p * w.coef_stride_o;
    const __m512 c = w.coef_stride_o == 1 ? _mm512_loadu_ps(first) : _mm512_i32gather_ps(lanes, first, 4);
    for (int t = 0; t < TOK; ++t) {
      float* dst = acc + t * ld + 16 * p;
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(c, sums[t][p], _mm512_loadu_ps(dst)));
    }
  }
}

__attribute__((target("avx2,fma"))) inline __m256 lookup16(__m256 low_half, __m256 high_half, __m256i index) {
  // Entries 0-7 and 8-15 of a 16-float table; bit 3 of the index (moved to the sign bit) picks the half.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_half, index), _mm256_permutevar8x32_ps(high_half, index),
                          _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

// 32 outputs (4 registers of 8) × TOK tokens.
template <int TOK>
__attribute__((target("avx2,fma"))) void lut_block_avx2(const Lut& lut, int64_t g, int64_t i, int64_t o0,
                                                        int64_t t0, float* acc, int64_t ld) {
  const Layer& w = lut.layer;
  const __m256i lanes = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm256_set1_epi32(static_cast<int>(w.coef_stride_o)));
  __m256 sums[TOK][4];
  for (int t = 0; t < TOK; ++t)
    for (int p = 0; p < 4; ++p) sums[t][p] = _mm256_setzero_ps();
  for (int64_t b = g * w.group_bytes; b < (g + 1) * w.group_bytes; ++b) {
    const uint8_t* row = w.planes + (i * w.nbytes + b) * w.out + o0;
    for (int p = 0; p < 4; ++p) {
      const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * p)));
      const __m256i high = _mm256_srli_epi32(low, 4);
      for (int t = 0; t < TOK; ++t) {
        const float* table = lut.tables + ((t0 + t) * lut.quads + 2 * b) * 16;
        const __m256 hit = _mm256_add_ps(
            lookup16(_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8), low),
            lookup16(_mm256_loadu_ps(table + 16), _mm256_loadu_ps(table + 24), high));
        sums[t][p] = _mm256_add_ps(sums[t][p], hit);
      }
    }
  }
  const float* coef = w.coef + i * w.coef_stride_i + o0 * w.coef_stride_o + g * w.coef_stride_g;
  for (int p = 0; p < 4; ++p) {
    const float* first = coef + 8 * p * w.coef_stride_o;
    const __m256 c = w.coef_stride_o == 1 ? _mm256_loadu_ps(first) : _mm256_i32gather_ps(first, lanes, 4);
    for (int t = 0; t < TOK; ++t) {
      float* dst = acc + t * ld + 8 * p;
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(c, sums[t][p], _mm256_loadu_ps(dst)));
    }
  }
}

#endif

// Plane i's share of group g for outputs [o0, o0 + n) and tokens [t0, t0 + tok), added to acc (tok rows of stride ld).
void lut_block(int isa, const Lut& lut, int64_t g, int64_t i, int64_t o0, int64_t n, int64_t t0, int64_t tok, float* acc,
               int64_t ld) {
#ifdef REPARAM_X86
  if (isa == kIsaAvx512 && n == 64) {
    switch (tok) {
      case 1: return lut_block_avx512<1>(lut, g, i, o0, t0, acc, ld);
      case 2: return lut_block_avx512<2>(lut, g, i, o0, t0, acc, ld);
      case 3: return lut_block_avx512<3>(lut, g, i, o0, t0, acc, ld);
      default: return lut_block_avx512<4>(lut, g, i, o0, t0, acc, ld);
    }
  }
  if (isa == kIsaAvx2 && n == 32) {
    switch (tok) {
      case 1: return lut_block_avx2<1>(lut, g, i, o0, t0, acc, ld);
      case 2: return lut_block_avx2<2>(lut, g, i, o0, t0, acc, ld);
      case 3: return lut_block_avx2<3>(lut, g, i, o0, t0, acc, ld);
      default: return lut_block_avx2<4>(lut, g, i, o0, t0, acc, ld);
    }
  }
#endif
  lut_block_scalar(lut, g, i, o0, n, t0, tok, acc, ld);
}

// Outputs [o0, o1) of every token into acc (tokens, o1 - o0), zeroed by the caller. (group, plane) is the
// outer loop: the group/8 plane rows it reads (a page each on wide layers) are swept along the outputs as
// that many sequential streams, which the hardware prefetcher follows.
void lut_range(int isa, const Lut& lut, int64_t block, int64_t o0, int64_t o1, int64_t tokens, float* acc) {
  const int64_t ld = o1 - o0;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokensPerPass) {
    const int64_t tok = std::min(kTokensPerPass, tokens - t0);
    for (int64_t g = 0; g < lut.layer.groups; ++g)
      for (int64_t i = 0; i < lut.layer.bits; ++i)
        for (int64_t o = o0; o < o1; o += block)
          lut_block(isa, lut, g, i, o, std::min(block, o1 - o), t0, tok, acc + t0 * ld + (o - o0), ld);
  }
}

// y[t, o] = acc[t, o] + bias[o] + Σ_g offset[o, g]·xsum[t, g], in the output's dtype; acc is overwritten.
template <typename scalar_t>
void finish_block(const Layer& w, float* acc, int64_t ld, const float* xsum, const float* bias, int64_t o0,
                  int64_t n, int64_t tokens, scalar_t* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* __restrict__ row = acc + t * ld;
    if (bias)
      for (int64_t o = 0; o < n; ++o) row[o] += bias[o0 + o];
    for (int64_t g = 0; g < w.groups; ++g) {
      const float s = xsum[t * w.groups + g];
      const float* __restrict__ offset = w.offset + g * w.offset_stride_g + o0 * w.offset_stride_o;
      if (w.offset_stride_o == 1)  // the layout QuantizedLinear caches: this loop vectorizes
        for (int64_t o = 0; o < n; ++o) row[o] += offset[o] * s;
      else
        for (int64_t o = 0; o < n; ++o) row[o] += offset[o * w.offset_stride_o] * s;
    }
    scalar_t* __restrict__ dst = y + t * w.out + o0;
    for (int64_t o = 0; o < n; ++o) dst[o] = static_cast<scalar_t>(row[o]);
  }
}

// The bias as float32: its own data when it already is (no op, no copy), else a converted copy kept in `owner`.
const float* float_bias(const c10::optional<at::Tensor>& bias, int64_t out, at::Tensor& owner) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "reparam: bias must have ", out, " elements, got ",
              bias->sizes());
  if (bias->scalar_type() == at::kFloat && bias->is_contiguous()) return bias->data_ptr<float>();
  owner = bias->to(at::kFloat).contiguous();
  return owner.data_ptr<float>();
}

// x as a contiguous (tokens, in) block: x itself when it already is (the usual case: no op runs).
at::Tensor contiguous_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "reparam: the input needs a last dimension of features, got ",
              x.sizes());
  return x.is_contiguous() ? x : x.contiguous();
}

}  // namespace

at::Tensor bitplane_lut(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                        const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const int64_t in = x.size(-1);
  const Layer w = layer_of(planes, coef, offset, group_size, in);
  const at::Tensor x2 = contiguous_rows(x);
  const int64_t tokens = x2.numel() / in, quads = w.nbytes * 2;
  at::Tensor bias_owner;
  const float* bias_ptr = float_bias(bias, w.out, bias_owner);
  at::Tensor y = output_for(x, w.out);
  if (tokens == 0) return y;
  const int isa = active_isa();
  const int64_t block = isa == kIsaAvx512 ? 64 : isa == kIsaAvx2 ? 32 : 64;
  const int64_t blocks = (w.out + block - 1) / block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitplane_lut", [&] {
    const scalar_t* rows = x2.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    // Output blocks [first, last) of `count` tokens from t0, whose tables are built.
    const auto lookups = [&](const Lut& lut, int64_t t0, int64_t count, int64_t first, int64_t last) {
      const int64_t o0 = first * block, o1 = std::min(last * block, w.out);
      float* acc = scratch(acc_buffer, count * (o1 - o0));
      std::fill(acc, acc + count * (o1 - o0), 0.f);
      lut_range(isa, lut, block, o0, o1, count, acc);
      finish_block<scalar_t>(w, acc, o1 - o0, lut.xsum, bias_ptr, o0, o1 - o0, count, out + t0 * w.out);
    };
    // The tables of `count` tokens from t0, in the calling thread's scratch.
    const auto tables_of = [&](int64_t t0, int64_t count) {
      float* tables = scratch(tables_buffer, count * quads * 16);
      float* xsum = scratch(xsum_buffer, count * w.groups);
      build_tables<scalar_t>(isa, rows + t0 * in, count, in, quads, group_size, tables, xsum);
      return Lut{w, tables, xsum, quads};
    };
    if (tokens <= kTokensPerChunk) {
      const Lut lut = tables_of(0, tokens);
      // Threads split the outputs only where each gets ~2^20 weight-plane lookups (~15 µs): on smaller layers
      // waking and joining a second thread costs more than it saves, and on a loaded machine the join waits for a
      // descheduled thread. (At 2^22, SmolLM2's and MiniLM's MLP layers, 25-40 µs of lookups, ran on one thread
      // while dense used two.)
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (block * w.nbytes * 8 * w.bits * tokens));
      const auto run = [&](int64_t first, int64_t last) { lookups(lut, 0, tokens, first, last); };
      if (blocks <= grain) run(0, blocks);  // one thread's work: no parallel region at all
      else at::parallel_for(0, blocks, grain, run);
      return;
    }
    // More tokens: threads take whole chunks of kTokensPerChunk and build their tables themselves, in one parallel
    // region a call. (A region per chunk, with the tables built between them on one thread, made a 32x128-token
    // MiniLM batch 64 joins a layer.)
    at::parallel_for(0, (tokens + kTokensPerChunk - 1) / kTokensPerChunk, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t t0 = c * kTokensPerChunk, count = std::min(kTokensPerChunk, tokens - t0);
        lookups(tables_of(t0, count), t0, count, 0, blocks);
      }
    });
  });
  return y;
}

namespace {

// A group's coefficients and offsets for outputs [o0, o0 + n), contiguous so the decode loops vectorize.
struct GroupScales {
  float coef[kMaxBits][kDecodeTile], offset[kDecodeTile];

  void load(const Layer& w, int64_t g, int64_t o0, int64_t n) {
    for (int64_t o = 0; o < n; ++o) offset[o] = w.offset_at(o0 + o, g);
    for (int64_t i = 0; i < w.bits; ++i)
      for (int64_t o = 0; o < n; ++o) coef[i][o] = w.coef_at(i, o0 + o, g);
  }
};

// Columns [b0·8, b1·8) of the transposed tile: tile[(j - base·8)·ld + o] = W[o0 + o, j] for n ≤ kDecodeTile
// outputs, float32 or rounded to bf16 (to nearest even, like every float → bf16 conversion in torch).
template <typename tile_t>
void decode_rows_scalar(const Layer& w, int64_t o0, int64_t n, int64_t base, int64_t b0, int64_t b1,
                        tile_t* __restrict__ tile, int64_t ld) {
  GroupScales scales;
  float column[kDecodeTile];
  for (int64_t b = b0; b < b1; ++b) {
    if (b == b0 || b % w.group_bytes == 0) scales.load(w, b / w.group_bytes, o0, n);
    for (int k = 0; k < 8; ++k) {
      for (int64_t o = 0; o < n; ++o) column[o] = scales.offset[o];
      for (int64_t i = 0; i < w.bits; ++i) {
        const uint8_t* __restrict__ row = w.planes + (i * w.nbytes + b) * w.out + o0;
        // bit × coefficient rather than a select: the form GCC vectorizes for any target
        for (int64_t o = 0; o < n; ++o) column[o] += static_cast<float>((row[o] >> k) & 1) * scales.coef[i][o];
      }
      tile_t* __restrict__ dst = tile + ((b - base) * 8 + k) * ld;
      for (int64_t o = 0; o < n; ++o) dst[o] = static_cast<tile_t>(column[o]);
    }
  }
}

#ifdef REPARAM_X86
__attribute__((target("avx512f"))) inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

__attribute__((target("avx512f,avx512bf16"))) inline void store16(at::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// The same with n a multiple of 16: the 8 columns of a plane byte are 8 registers of 16 outputs, each adding
// the plane's coefficient under the mask of its bit.
template <typename tile_t>
__attribute__((target("avx512f,avx512bf16"))) void decode_rows_avx512(const Layer& w, int64_t o0, int64_t n,
                                                                      int64_t base, int64_t b0, int64_t b1,
                                                                      tile_t* __restrict__ tile, int64_t ld) {
  GroupScales scales;
  for (int64_t b = b0; b < b1; ++b) {
    if (b == b0 || b % w.group_bytes == 0) scales.load(w, b / w.group_bytes, o0, n);
    for (int64_t p = 0; p < n; p += 16) {
      __m512 columns[8];
      for (int k = 0; k < 8; ++k) columns[k] = _mm512_loadu_ps(scales.offset + p);
      for (int64_t i = 0; i < w.bits; ++i) {
        const uint8_t* row = w.planes + (i * w.nbytes + b) * w.out + o0 + p;
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
        const __m512 c = _mm512_loadu_ps(scales.coef[i] + p);
        for (int k = 0; k < 8; ++k)
          columns[k] = _mm512_mask_add_ps(columns[k], _mm512_test_epi32_mask(bytes, _mm512_set1_epi32(1 << k)),
                                          columns[k], c);
      }
      for (int k = 0; k < 8; ++k) store16(tile + ((b - base) * 8 + k) * ld + p, columns[k]);
    }
  }
}

// The same for float tiles with AVX2 and n a multiple of 8: 8 registers of 8 outputs, each adding the plane's
// coefficient where its bit is set (a compare makes the lane mask).
__attribute__((target("avx2,fma"))) void decode_rows_avx2(const Layer& w, int64_t o0, int64_t n, int64_t base,
                                                         int64_t b0, int64_t b1, float* __restrict__ tile,
                                                         int64_t ld) {
  GroupScales scales;
  for (int64_t b = b0; b < b1; ++b) {
    if (b == b0 || b % w.group_bytes == 0) scales.load(w, b / w.group_bytes, o0, n);
    for (int64_t p = 0; p < n; p += 8) {
      __m256 columns[8];
      for (int k = 0; k < 8; ++k) columns[k] = _mm256_loadu_ps(scales.offset + p);
      for (int64_t i = 0; i < w.bits; ++i) {
        const uint8_t* row = w.planes + (i * w.nbytes + b) * w.out + o0 + p;
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
        const __m256 c = _mm256_loadu_ps(scales.coef[i] + p);
        for (int k = 0; k < 8; ++k) {
          const __m256i bit = _mm256_set1_epi32(1 << k);
          const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(bytes, bit), bit));
          columns[k] = _mm256_add_ps(columns[k], _mm256_and_ps(set, c));
        }
      }
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(tile + ((b - base) * 8 + k) * ld + p, columns[k]);
    }
  }
}
#endif

template <typename tile_t>
void decode_rows(int isa, const Layer& w, int64_t o0, int64_t n, int64_t base, int64_t b0, int64_t b1,
                 tile_t* tile, int64_t ld) {
#ifdef REPARAM_X86
  // bf16 tiles are only asked for on CPUs with AVX512-BF16 (cpu_has_bf16), so AVX-512 implies it there.
  if (isa == kIsaAvx512 && n % 16 == 0) return decode_rows_avx512(w, o0, n, base, b0, b1, tile, ld);
  if constexpr (std::is_same_v<tile_t, float>)
    if (isa >= kIsaAvx2 && n % 8 == 0) return decode_rows_avx2(w, o0, n, base, b0, b1, tile, ld);  // AVX-512 tails too
#endif
  decode_rows_scalar(w, o0, n, base, b0, b1, tile, ld);
}

// bf16 GEMMs (below) only where the CPU multiplies bf16 natively (AVX512-BF16, and AMX on newer Xeons): elsewhere
// oneDNN emulates them, slower than float32.
bool cpu_has_bf16() {
#ifdef REPARAM_X86
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Decode-and-GEMM with bf16 products. Chunks of kBf16ChunkOutputs outputs are decoded over the whole input into
// a bf16 buffer (threads split the chunk's tiles), then multiplied by one GEMM outside any parallel region:
// inside one, oneDNN's bf16 GEMM ran 1.8x slower than from Python. No partial sum is rounded to bf16 between
// input blocks; the (tokens, chunk) result is rounded to bf16 once (torch's CPU bf16 GEMM has no float32
// output), then the bias is added in float32.
template <typename scalar_t>
void decode_mm_bf16(int isa, const Layer& w, const at::Tensor& xb, const float* bias, scalar_t* y) {
  const int64_t tokens = xb.size(0), padded = w.nbytes * 8;
  const auto as_bf16 = at::TensorOptions().dtype(at::kBFloat16);
  const int64_t chunk = std::min(kBf16ChunkOutputs, w.out);
  at::BFloat16* weight = scratch(bf16_tile_buffer, padded * chunk);
  at::BFloat16* result = scratch(bf16_result_buffer, tokens * chunk);
  for (int64_t c0 = 0; c0 < w.out; c0 += chunk) {
    const int64_t n = std::min(chunk, w.out - c0);
    // Each thread decodes tiles of kDecodeTile outputs: column blocks of the chunk's (padded, n) row-major matrix.
    at::parallel_for(0, (n + kDecodeTile - 1) / kDecodeTile, 1, [&](int64_t first, int64_t last) {
      for (int64_t o = first * kDecodeTile; o < std::min(last * kDecodeTile, n); o += kDecodeTile)
        decode_rows(isa, w, c0 + o, std::min(kDecodeTile, n - o), 0, 0, w.nbytes, weight + o, n);
    });
    at::Tensor product = at::from_blob(result, {tokens, n}, as_bf16);
    at::mm_out(product, xb, at::from_blob(weight, {padded, n}, as_bf16));
    at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const at::BFloat16* __restrict__ src = result + t * n;
        scalar_t* __restrict__ dst = y + t * w.out + c0;
        for (int64_t o = 0; o < n; ++o)
          dst[o] = static_cast<scalar_t>(static_cast<float>(src[o]) + (bias ? bias[c0 + o] : 0.f));
      }
    });
  }
}

}  // namespace

bool bf16_products(const at::Tensor& x) {
  if (!cpu_has_bf16()) return false;
  if (x.scalar_type() == at::kBFloat16) return true;
  return x.scalar_type() == at::kFloat &&
         at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
             at::Float32Precision::BF16;
}

at::Tensor bitplane_decode_mm(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                              const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  return decode_mm(x, planes, coef, offset, group_size, bias, bf16_products(x));
}

at::Tensor decode_mm(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef, const at::Tensor& offset,
                     int64_t group_size, const c10::optional<at::Tensor>& bias, bool bf16) {
  const int64_t in = x.size(-1);
  const Layer w = layer_of(planes, coef, offset, group_size, in);
  const int64_t padded = w.nbytes * 8;
  at::Tensor x2 = contiguous_rows(x).view({-1, in});
  const int64_t tokens = x2.size(0);
  at::Tensor bias_owner;
  const float* bias_ptr = float_bias(bias, w.out, bias_owner);
  at::Tensor y = output_for(x, w.out);
  if (tokens == 0) return y;
  const auto as_float = at::TensorOptions().dtype(at::kFloat);
  const int isa = active_isa();
  at::Tensor y2 = y.view({tokens, w.out});
  if (bf16) {
    at::Tensor xb = at::from_blob(scratch(bf16_input_buffer, tokens * padded), {tokens, padded},
                                  at::TensorOptions().dtype(at::kBFloat16));
    xb.narrow(1, in, padded - in).zero_();
    xb.narrow(1, 0, in).copy_(x2);
    if (y.scalar_type() == at::kFloat)
      decode_mm_bf16(isa, w, xb, bias_ptr, y.data_ptr<float>());
    else
      decode_mm_bf16(isa, w, xb, bias_ptr, y.data_ptr<at::BFloat16>());
    return y;
  }
  // The input as float32 (tokens, padded), zero beyond in: x itself when it already is.
  at::Tensor xf;
  if (x2.scalar_type() == at::kFloat && in == padded && x2.is_contiguous()) {
    xf = x2;
  } else {
    xf = at::from_blob(scratch(input_buffer, tokens * padded), {tokens, padded}, as_float);
    xf.narrow(1, in, padded - in).zero_();
    xf.narrow(1, 0, in).copy_(x2);
  }
  const int64_t block_bytes = std::min(kDecodeBlockBytes, w.nbytes);
  // A float32 output takes each tile's GEMMs in place (the bias as its initial value); other dtypes go through a
  // float32 tile and one rounding.
  const bool in_place = y.scalar_type() == at::kFloat;
  const at::Tensor bias_f = bias_ptr ? at::from_blob(const_cast<float*>(bias_ptr), {w.out}, as_float) : at::Tensor();
  // One parallel region: each thread decodes and multiplies whole output tiles of its own (its GEMMs run on one
  // thread inside the region). A region per tile would join 100+ times a call, and on a loaded machine every
  // join waits for a descheduled thread.
  at::parallel_for(0, (w.out + kDecodeTile - 1) / kDecodeTile, 1, [&](int64_t first, int64_t last) {
    // Called from the op's autograd wrapper, x may require grad: the GEMMs below must not dispatch to autograd.
    // The wrapper's exclusion of autograd is thread-local, and OpenMP's worker threads do not inherit it.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    float* tile = scratch(tile_buffer, block_bytes * 8 * kDecodeTile);
    float* tile_out = in_place ? nullptr : scratch(tile_out_buffer, tokens * kDecodeTile);
    for (int64_t o0 = first * kDecodeTile; o0 < std::min(last * kDecodeTile, w.out); o0 += kDecodeTile) {
      const int64_t n = std::min(kDecodeTile, w.out - o0);
      at::Tensor dst = y2.narrow(1, o0, n);
      at::Tensor result = in_place ? dst : at::from_blob(tile_out, {tokens, n}, as_float);
      for (int64_t k0 = 0; k0 < w.nbytes; k0 += block_bytes) {
        const int64_t k1 = std::min(k0 + block_bytes, w.nbytes);
        decode_rows(isa, w, o0, n, k0, k0, k1, tile, n);
        const at::Tensor weight = at::from_blob(tile, {(k1 - k0) * 8, n}, as_float);
        const at::Tensor inputs = xf.narrow(1, k0 * 8, (k1 - k0) * 8);
        if (k0 > 0)
          result.addmm_(inputs, weight);
        else if (bias_f.defined())
          at::addmm_out(result, bias_f.narrow(0, o0, n), inputs, weight);
        else
          at::mm_out(result, inputs, weight);
      }
      if (!in_place) dst.copy_(result);
    }
  });
  return y;
}

namespace {

// Caps the instruction set the LUT uses (0 scalar, 1 AVX2, 2 AVX-512) so tests reach every path; returns the old cap.
int64_t set_isa_limit(int64_t level) { return isa_limit.exchange(static_cast<int>(level)); }

int64_t cpu_isa() { return active_isa(); }

}  // namespace
}  // namespace reparam

TORCH_LIBRARY(reparam_cpu, m) {
  m.def("bitplane_lut(Tensor x, Tensor planes, Tensor coef, Tensor offset, int group_size, Tensor? bias) -> Tensor");
  m.def("bitplane_decode_mm(Tensor x, Tensor planes, Tensor coef, Tensor offset, int group_size, Tensor? bias)"
        " -> Tensor");
  m.def("set_isa_limit(int level) -> int", &reparam::set_isa_limit);
  m.def("cpu_isa() -> int", &reparam::cpu_isa);
}

TORCH_LIBRARY_IMPL(reparam_cpu, CPU, m) {
  m.impl("bitplane_lut", &reparam::bitplane_lut);
  m.impl("bitplane_decode_mm", &reparam::bitplane_decode_mm);
}
