// Evaluating node's primitives on MLX's CPU stream, and reading their inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace node_native {

using Arrays = std::vector<mlx::core::array>;

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

// A primitive's eval_cpu: allocates its outputs, registers inputs and outputs with the stream's
// encoder and runs job(inputs, outputs) as the stream's next task (on weak copies that live as long
// as the task).
template <class Job>
void dispatch(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
              std::vector<mlx::core::array>& outputs, Job job) {
  namespace mx = mlx::core;
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> in, out;
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
    in.push_back(mx::array::unsafe_weak_copy(input));
  }
  for (auto& output : outputs) {
    output.set_data(mx::allocator::malloc(output.nbytes()));
    encoder.set_output_array(output);
    out.push_back(mx::array::unsafe_weak_copy(output));
  }
  encoder.dispatch([in = std::move(in), out = std::move(out), job = std::move(job)]() mutable { job(in, out); });
}

// The base of node's primitives: CPU only (eval_gpu refuses, naming the primitive).
class CpuPrimitive : public mlx::core::Primitive {
 public:
  using mlx::core::Primitive::Primitive;

  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU backend only");
  }
};

}  // namespace node_native
