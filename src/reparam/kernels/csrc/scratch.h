// Reusable per-thread buffers: kernels keep their scratch (tables, tiles,
// partial sums) in thread_local vectors that grow to the largest layer seen,
// so a call allocates nothing of size beyond its output.
#pragma once

#include <cstddef>
#include <vector>

namespace reparam {

// A buffer of at least n elements.
template <typename T>
T* scratch(std::vector<T>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace reparam
