// Which compiled bit-plane kernel runs a call: bitplane_lut up to a crossover token count, bitplane_decode_mm
// above. The op `bitplane_linear` makes the choice at run time, so a torch.compile'd or exported graph, whose token
// count may change from call to call, chooses as eager code does.
//
// The crossover is measured on the machine, not fixed. Per token the LUT does one permute per 4 weights per
// plane; decode-and-GEMM decodes the weight once per call, then does one FMA per weight per token. How the two
// compare is the CPU's business: at 4096², 3 bits, 1 thread, the LUT lost at 16 tokens and above on a Sapphire
// Rapids (6.9 against 6.5 ms) and still won at 256 on a Zen 5 (52.6 against 89.1 ms); capped to AVX2 on the Zen 5
// it lost at 16 (12.3 against 11.0 ms). So the first call above kAlwaysLutTokens for a (planes, threads,
// instruction set) triple times both kernels on a 2048x2048 layer with that many planes at 32, 64, 128 and 256
// tokens (interleaved, medians of 3; 0.1-0.3 s on the Zen 5) and keeps the largest count at which the LUT was
// still faster; no limit when it won at all of them (beyond, both costs grow linearly with the tokens, the LUT's
// more slowly). With bf16 products (bitplane_decode_mm's oneDNN bf16 GEMM) the limit is kAlwaysLutTokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bitplane.h"
#include "isa.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace reparam {
namespace {

constexpr int64_t kAlwaysLutTokens = 16;  // every CPU measured: the LUT won up to 12 tokens, within 12% at 16
constexpr int64_t kProbeTokens[] = {32, 64, 128, 256};
constexpr int64_t kProbeFeatures = 2048, kProbeGroup = 128, kProbeRounds = 3;
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

std::mutex crossover_mutex;
std::map<std::tuple<int64_t, int, int>, int64_t> measured;  // (planes, threads, isa) -> most tokens for the LUT
std::map<int64_t, int64_t> pinned;                   // planes -> most tokens, set by set_lut_crossover

template <typename F>
double seconds(F&& run) {
  const auto start = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

int64_t measure_crossover(int64_t bits) {
  // Constant contents: the kernels' time does not depend on the values, and no random generator of the user's moves.
  const int64_t features = kProbeFeatures, groups = features / kProbeGroup;
  const at::Tensor planes = at::arange(bits * features / 8 * features, at::kLong).mul_(37).remainder_(256)
                                .to(at::kByte).view({bits, features / 8, features});
  // Scales with outputs contiguous, the layout QuantizedLinear gives the kernels (others cost the LUT gathers).
  const at::Tensor coef = at::full({bits, groups, features}, 0.01f).transpose(1, 2);
  const at::Tensor offset = at::zeros({groups, features}).t();
  int64_t most = kAlwaysLutTokens;
  for (const int64_t tokens : kProbeTokens) {
    const at::Tensor x = at::full({tokens, features}, 0.5f);
    const auto lut = [&] { bitplane_lut(x, planes, coef, offset, kProbeGroup, c10::nullopt); };
    const auto decode = [&] { decode_mm(x, planes, coef, offset, kProbeGroup, c10::nullopt, /*bf16=*/false); };
    lut(), decode();  // warm: scratch buffers grown, pages touched
    std::vector<double> lut_times, decode_times;
    for (int64_t round = 0; round < kProbeRounds; ++round) {
      lut_times.push_back(seconds(lut));
      decode_times.push_back(seconds(decode));
    }
    if (median(lut_times) > median(decode_times)) return most;
    most = tokens;
  }
  return kNoLimit;
}

int64_t lut_max_tokens(int64_t bits) {
  std::lock_guard<std::mutex> lock(crossover_mutex);
  if (const auto pin = pinned.find(bits); pin != pinned.end()) return pin->second;
  const auto key = std::make_tuple(bits, at::get_num_threads(), active_isa());
  auto found = measured.find(key);
  if (found == measured.end()) found = measured.emplace(key, measure_crossover(bits)).first;
  return found->second;
}

// The op lut_crossover: the most tokens the LUT takes for layers of `bits` planes at the current thread count
// (measured on first use, or pinned).
int64_t lut_crossover(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "reparam: lut_crossover takes 1 to 8 planes, got ", bits);
  return lut_max_tokens(bits);
}

// The op set_lut_crossover: pins the crossover for layers of `bits` planes (at any thread count) to `tokens`, or
// unpins it when tokens < 0, so the measured one applies again. Returns the previous pin, -1 for none.
int64_t set_lut_crossover(int64_t bits, int64_t tokens) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "reparam: set_lut_crossover takes 1 to 8 planes, got ", bits);
  std::lock_guard<std::mutex> lock(crossover_mutex);
  const auto pin = pinned.find(bits);
  const int64_t previous = pin == pinned.end() ? -1 : pin->second;
  if (tokens < 0) pinned.erase(bits);
  else pinned[bits] = tokens;
  return previous;
}

}  // namespace

at::Tensor bitplane_linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& coef,
                           const at::Tensor& offset, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const int64_t in = x.dim() > 0 ? x.size(-1) : 0;
  const int64_t tokens = in > 0 ? x.numel() / in : 0;
  const bool lut = tokens <= kAlwaysLutTokens ||
                   (!bf16_products(x) && planes.dim() == 3 && tokens <= lut_max_tokens(planes.size(0)));
  return lut ? bitplane_lut(x, planes, coef, offset, group_size, bias)
             : bitplane_decode_mm(x, planes, coef, offset, group_size, bias);
}

}  // namespace reparam

TORCH_LIBRARY_FRAGMENT(reparam_cpu, m) {
  m.def("bitplane_linear(Tensor x, Tensor planes, Tensor coef, Tensor offset, int group_size, Tensor? bias)"
        " -> Tensor");
  m.def("lut_crossover(int bits) -> int", &reparam::lut_crossover);
  m.def("set_lut_crossover(int bits, int tokens) -> int", &reparam::set_lut_crossover);
}

TORCH_LIBRARY_IMPL(reparam_cpu, CPU, m) { m.impl("bitplane_linear", &reparam::bitplane_linear); }
