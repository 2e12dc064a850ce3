// Reading MLX arrays inside node's primitives.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace node_native {

// The floats of an evaluated float32 array in row-major order: its own buffer when it is
// row-contiguous (the usual case: the primitives take their inputs as they come, so that a
// decode step has no separate copy operations), else a copy gathered into `copy`.
inline const float* row_major_floats(const mlx::core::array& x, std::vector<float>& copy) {
  if (x.flags().row_contiguous) return x.data<float>();
  const float* src = x.data<float>();
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const int dims = (int)x.ndim();
  std::vector<int> index(dims, 0);
  copy.resize(x.size());
  for (size_t i = 0; i < x.size(); i++) {
    int64_t offset = 0;
    for (int d = 0; d < dims; d++) offset += index[d] * strides[d];
    copy[i] = src[offset];
    for (int d = dims - 1; d >= 0 && ++index[d] == shape[d]; d--) index[d] = 0;
  }
  return copy.data();
}

}  // namespace node_native
