// RMS normalization and RoPE as single MLX primitives on the CPU.
//
// MLX's CPU backend has no kernels of its own for mx.fast.rms_norm and mx.fast.rope: it expands
// each call into its fallback graph (a norm into ~8 operations, a rotation into ~15 with element-
// wise sin and cos). A Gemma 3 270M decode step held ~2,900 operations, ~1,400 of them from 109
// norms and 36 rotations, and MLX's scheduler costs microseconds per operation. Here each is one
// operation:
//
//   rms_norm(x, weight, eps, weight_offset): x / sqrt(mean(x^2) + eps) * (weight_offset + weight)
//     over the last axis (Gemma keeps its weights as w - 1: weight_offset 1)
//   rope(x, dims, base, scale, offsets): the non-traditional rotation (first half of the dims
//     against the second) of x (B, H, L, D) at positions offsets[b] + l, angles in float64
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "kernels.h"
#include "mlx_inputs.h"
#include "pool.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

constexpr long MIN_PARALLEL_FLOATS = 1L << 16;

void run_rows(long rows, long row_floats, const std::function<void(long, long)>& rows_job) {
  auto& pool = node_native::pool();
  if (rows * row_floats < MIN_PARALLEL_FLOATS || rows == 1) return rows_job(0, rows);
  // Only prefill chunks have this many rows: MLX's BLAS products follow, not another of our jobs.
  pool.run(
      pool.threads(), [&](int part, int parts) { rows_job(rows * part / parts, rows * (part + 1) / parts); },
      node_native::Next::blas);
}

}  // namespace

__attribute__((target_clones("avx512f", "avx2,fma", "default"))) void node_native::normalize_rows(
    const float* x, const float* w, float* out, long r0, long r1, int D, float eps, float offset) {
  for (long r = r0; r < r1; r++) {
    const float* row = x + r * D;
    const float inverse = 1.0f / std::sqrt(node_native::dot(row, row, D) / D + eps);
    float* o = out + r * D;
    for (int d = 0; d < D; d++) o[d] = row[d] * inverse * (offset + w[d]);
  }
}

namespace {

class RmsNorm : public node_native::CpuPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps, float offset) : node_native::CpuPrimitive(stream), eps_(eps), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [eps = eps_, offset = offset_](node_native::Arrays& in, node_native::Arrays& out) {
      std::vector<float> x_copy, w_copy;
      const float* xs = node_native::row_major_floats(in[0], x_copy);
      const float* ws = node_native::row_major_floats(in[1], w_copy);
      const int D = (int)in[0].shape(-1);
      float* o = out[0].data<float>();
      run_rows((long)(in[0].size() / D), D, [&](long r0, long r1) { node_native::normalize_rows(xs, ws, o, r0, r1, D, eps, offset); });
    });
  }

  const char* name() const override { return "NodeRmsNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RmsNorm&>(other);
    return o.eps_ == eps_ && o.offset_ == offset_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float eps_, offset_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, float weight_offset) {
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: weight must be 1-D with x's last axis");
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32)
    throw std::invalid_argument("rms_norm: x and weight must be float32");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps, weight_offset), {x, weight});
}

}  // namespace

namespace {

// cos and sin of one position's RoPE angles (frequencies in float64). Every layer of a decode step
// rotates at the same positions, so a small per-thread ring of recent tables computes them once per
// step instead of once per layer and call (for a batch, once per sequence: 36 x B x 128 sincos
// per step otherwise).
struct RopeTable {
  long position = -1;
  int dims = 0;
  double base = 0.0, scale = 0.0;
  std::vector<float> cosines, sines;
};

const RopeTable& rope_table(long position, int dims, double base, double scale) {
  constexpr int RING = 32;
  thread_local RopeTable ring[RING];
  thread_local int next = 0;
  for (const RopeTable& t : ring)
    if (t.position == position && t.dims == dims && t.base == base && t.scale == scale) return t;
  RopeTable& t = ring[next];
  next = (next + 1) % RING;
  const int half = dims / 2;
  t.position = position, t.dims = dims, t.base = base, t.scale = scale;
  t.cosines.resize(half);
  t.sines.resize(half);
  for (int i = 0; i < half; i++) {
    const double angle = (double)position * scale * std::pow(base, -2.0 * i / dims);
    t.cosines[i] = (float)std::cos(angle);
    t.sines[i] = (float)std::sin(angle);
  }
  return t;
}

}  // namespace

void node_native::rotate_rows(const float* x, const int32_t* offsets, bool per_batch, float* out, long r0,
                              long r1, int H, int L, int D, int dims, double base, double scale) {
  const int half = dims / 2;
  for (long r = r0; r < r1; r++) {  // r = ((b * H) + h) * L + l
    const int l = (int)(r % L), b = (int)(r / ((long)H * L));
    const RopeTable& table = rope_table((long)offsets[per_batch ? b : 0] + l, dims, base, scale);
    const float *cosines = table.cosines.data(), *sines = table.sines.data();
    const float* row = x + r * D;
    float* o = out + r * D;
    for (int i = 0; i < half; i++) {
      const float first = row[i], second = row[i + half];
      o[i] = first * cosines[i] - second * sines[i];
      o[i + half] = second * cosines[i] + first * sines[i];
    }
    if (o != row)
      for (int d = dims; d < D; d++) o[d] = row[d];
  }
}

namespace {

class Rope : public node_native::CpuPrimitive {
 public:
  Rope(mx::Stream stream, int dims, double base, double scale)
      : node_native::CpuPrimitive(stream), dims_(dims), base_(base), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [dims = dims_, base = base_, scale = scale_](node_native::Arrays& in, node_native::Arrays& out) {
      const mx::array& x = in[0];
      std::vector<float> x_copy;
      const float* xs = node_native::row_major_floats(x, x_copy);
      const int B = (int)x.shape(0), H = (int)x.shape(1), L = (int)x.shape(2), D = (int)x.shape(3);
      const int32_t* o = in[1].data<int32_t>();
      const bool per_batch = in[1].size() > 1;
      float* dst = out[0].data<float>();
      run_rows((long)B * H * L, D, [&](long r0, long r1) {
        node_native::rotate_rows(xs, o, per_batch, dst, r0, r1, H, L, D, dims, base, scale);
      });
    });
  }

  const char* name() const override { return "NodeRope"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return o.dims_ == dims_ && o.base_ == base_ && o.scale_ == scale_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  int dims_;
  double base_, scale_;
};

mx::array rope(const mx::array& x, int dims, double base, double scale, const mx::array& offsets) {
  if (x.ndim() != 4 || x.dtype() != mx::float32) throw std::invalid_argument("rope: x must be float32 (B, H, L, D)");
  if (dims % 2 != 0 || dims > x.shape(3)) throw std::invalid_argument("rope: dims must be even and at most D");
  if (offsets.size() != 1 && offsets.size() != (size_t)x.shape(0))
    throw std::invalid_argument("rope: offsets must hold one position or one per batch row");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  mx::array positions = offsets.dtype() == mx::int32 ? offsets : mx::astype(offsets, mx::int32, stream);
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, dims, base, scale), {x, positions});
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_norm_rope(nb::module_& m) {
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, "weight_offset"_a = 0.0f,
        "x / sqrt(mean(x^2, -1) + eps) * (weight_offset + weight), float32");
  m.def("rope", &rope, "x"_a, "dims"_a, "base"_a, "scale"_a, "offsets"_a,
        "Non-traditional RoPE of x (B, H, L, D) at positions offsets[b] + l (offsets int32, 1 or B)");
}
