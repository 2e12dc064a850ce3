// Reading MLX arrays inside node's primitives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  copy.resize(x.size());
  // Rows of the last axis (contiguous ones with memcpy: a transposed head layout in a prefill).
  const int64_t row = dims ? shape[dims - 1] : 1, step = dims ? strides[dims - 1] : 1;
  std::vector<int> index(std::max(dims - 1, 0), 0);
  for (size_t start = 0; start < x.size(); start += row) {
    int64_t offset = 0;
    for (int d = 0; d < dims - 1; d++) offset += index[d] * strides[d];
    if (step == 1)
      std::memcpy(copy.data() + start, src + offset, row * sizeof(float));
    else
      for (int64_t k = 0; k < row; k++) copy[start + k] = src[offset + k * step];
    for (int d = dims - 2; d >= 0 && ++index[d] == shape[d]; d--) index[d] = 0;
  }
  return copy.data();
}

}  // namespace node_native
