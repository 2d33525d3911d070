// The instruction set the CPU kernels use: detected once, and cappable (set_isa_limit, bitplane.cpp) so tests
// reach every path on one machine.
#pragma once

#include <algorithm>
#include <atomic>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define REPARAM_X86 1
#endif

namespace reparam {

constexpr int kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;

inline std::atomic<int> isa_limit{kIsaAvx512};

inline int detected_isa() {
#ifdef REPARAM_X86
  static const int isa = __builtin_cpu_supports("avx512f") ? kIsaAvx512
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kIsaAvx2
                                                                                                : kIsaScalar;
  return isa;
#else
  return kIsaScalar;
#endif
}

inline int active_isa() { return std::min(detected_isa(), isa_limit.load()); }

}  // namespace reparam
