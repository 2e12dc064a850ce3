// A decode step's attention inputs as one MLX primitive: the q, k and v projections (int8), the
// per-head RMS norms of q and k and their rotation (RoPE).
//
// In mlx-lm's attention these are thirteen operations per layer (three products, three reshapes,
// three transposes, two norms, two rotations), each scheduled and allocated by MLX on its own; a
// decode step of a small model is dominated by that per-operation cost, not by its arithmetic.
//
//   x (B, 1, K) float32 -> q (B, H, 1, D), k (B, KH, 1, D), v (B, KH, 1, D)
//   q = rope(norm(x @ Wq^T per head, q_norm)), k = rope(norm(x @ Wk^T per head, k_norm)), v = x @ Wv^T
//
// With split_rows (a batch of agents, each with its own cache), k and v come out per row instead:
// q, k_0 .. k_{B-1}, v_0 .. v_{B-1}, each (1, KH, 1, D), so that writing them into the agents'
// caches takes no slice operations (2B per layer and step otherwise).
//
// With `into` (buffer index per row) k and v go straight into the agents' cache buffers, given as
// inputs k_0 .. k_{B-1}, v_0 .. v_{B-1} (1, KH, T, D) float32, at that index along T, and only q
// comes out: a decode step then has no write operations at all (2 per agent and layer otherwise,
// ~8 us each). This writes into inputs, which MLX arrays otherwise never see: the caller passes
// only buffers that `exclusive` found unseen by anything else (see node.model.cpu_kernels), and the
// step's attention reads them after this operation (it takes q).
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx_inputs.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Layout {
  int heads, kv_heads, head_dim;
  float eps, norm_offset;
  int rope_dims;
  double rope_base, rope_scale;
  bool split_rows;
  std::vector<int> into;  // per row, the cache buffer index k and v go to; empty: k and v come out

  bool operator==(const Layout&) const = default;
};

// inputs: x, wq, sq, wk, sk, wv, sv, q_norm, k_norm, offsets
class AttentionInputs : public node_native::CpuPrimitive {
 public:
  AttentionInputs(mx::Stream stream, Layout layout) : node_native::CpuPrimitive(stream), layout_(layout) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [l = layout_](node_native::Arrays& held, node_native::Arrays& out) {
      std::vector<float> x_copy;
      const float* x = node_native::row_major_floats(held[0], x_copy);
      const int B = (int)held[0].shape(0), K = (int)held[0].shape(-1), D = l.head_dim;
      const int counts[3] = {l.heads, l.kv_heads, l.kv_heads};
      const bool scratch = l.split_rows || !l.into.empty();  // k and v computed aside, then copied out
      std::vector<float> split_k, split_v;
      float* results[3] = {out[0].data<float>(), nullptr, nullptr};
      for (int i = 1; i < 3; i++) {
        std::vector<float>& rows = i == 1 ? split_k : split_v;
        if (scratch) rows.resize((size_t)B * counts[i] * D);
        results[i] = scratch ? rows.data() : out[i].data<float>();
      }
      for (int i = 0; i < 3; i++)
        node_native::int8_product(node_native::Product{x, held[1 + 2 * i].data<int8_t>(), held[2 + 2 * i].data<float>(),
                                                       results[i], B, counts[i] * D, K});
      const int32_t* offsets = held[9].data<int32_t>();
      const bool per_batch = held[9].size() > 1;
      for (int i = 0; i < 2; i++) {  // q and k: norm, then rotation, in place
        float* rows = results[i];
        const long count = (long)B * counts[i];
        node_native::normalize_rows(rows, held[7 + i].data<float>(), rows, 0, count, D, l.eps, l.norm_offset);
        node_native::rotate_rows(rows, offsets, per_batch, rows, 0, count, counts[i], 1, D, l.rope_dims, l.rope_base,
                                 l.rope_scale);
      }
      if (l.split_rows) {
        const size_t row = (size_t)l.kv_heads * D;
        for (int b = 0; b < B; b++) {
          std::memcpy(out[1 + b].data<float>(), results[1] + b * row, row * sizeof(float));
          std::memcpy(out[1 + B + b].data<float>(), results[2] + b * row, row * sizeof(float));
        }
      }
      for (int b = 0; b < (int)l.into.size(); b++)
        for (int i = 1; i < 3; i++) {
          mx::array& buffer = held[10 + (i - 1) * B + b];
          const auto& strides = buffer.strides();
          for (int h = 0; h < l.kv_heads; h++)
            std::memcpy(buffer.data<float>() + h * strides[1] + l.into[b] * strides[2],
                        results[i] + ((size_t)b * l.kv_heads + h) * D, D * sizeof(float));
        }
    });
  }

  const char* name() const override { return "NodeAttentionInputs"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const AttentionInputs&>(other).layout_ == layout_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return shapes(inputs[0].shape(0), layout_);
  }

  static std::vector<mx::Shape> shapes(int B, const Layout& l) {
    std::vector<mx::Shape> result{{B, l.heads, 1, l.head_dim}};
    if (!l.into.empty()) return result;
    const int copies = l.split_rows ? 2 * B : 2;
    for (int i = 0; i < copies; i++) result.push_back({l.split_rows ? 1 : B, l.kv_heads, 1, l.head_dim});
    return result;
  }

 private:
  Layout layout_;
};

nb::tuple attention_inputs(const mx::array& x, const std::vector<mx::array>& weights, const mx::array& q_norm,
                           const mx::array& k_norm, const mx::array& offsets, int heads, int kv_heads, int head_dim,
                           float eps, float norm_offset, int rope_dims, double rope_base, double rope_scale,
                           bool split_rows, const std::vector<mx::array>& into_keys,
                           const std::vector<mx::array>& into_values, const std::vector<int>& into) {
  if (x.ndim() != 3 || x.shape(1) != 1 || x.dtype() != mx::float32)
    throw std::invalid_argument("attention_inputs: x must be float32 (B, 1, K)");
  if (weights.size() != 6) throw std::invalid_argument("attention_inputs: weights are wq, sq, wk, sk, wv, sv");
  const int K = x.shape(2), counts[3] = {heads, kv_heads, kv_heads};
  for (int i = 0; i < 3; i++) {
    const mx::array &w = weights[2 * i], &s = weights[2 * i + 1];
    if (w.dtype() != mx::int8 || w.ndim() != 2 || w.shape(0) != counts[i] * head_dim || w.shape(1) != K ||
        s.dtype() != mx::float32 || !w.is_available() || !s.is_available() || !w.flags().row_contiguous ||
        !s.flags().row_contiguous)
      throw std::invalid_argument("attention_inputs: projections must be evaluated int8 (heads * D, K) weights");
  }
  if (q_norm.size() != (size_t)head_dim || k_norm.size() != (size_t)head_dim || q_norm.dtype() != mx::float32 ||
      k_norm.dtype() != mx::float32)
    throw std::invalid_argument("attention_inputs: norm weights must be float32 (D,)");
  if (rope_dims % 2 != 0 || rope_dims > head_dim) throw std::invalid_argument("attention_inputs: bad rope dims");
  if (offsets.size() != 1 && offsets.size() != (size_t)x.shape(0))
    throw std::invalid_argument("attention_inputs: offsets must hold one position or one per batch row");
  const int B = x.shape(0);
  if (!into.empty()) {
    if (split_rows || (int)into.size() != B || (int)into_keys.size() != B || (int)into_values.size() != B)
      throw std::invalid_argument("attention_inputs: into needs one key buffer, value buffer and index per row");
    for (int b = 0; b < B; b++)
      for (const mx::array* buffer : {&into_keys[b], &into_values[b]})
        if (buffer->dtype() != mx::float32 || buffer->ndim() != 4 || buffer->shape(0) != 1 ||
            buffer->shape(1) != kv_heads || buffer->shape(3) != head_dim || buffer->strides(3) != 1 ||
            into[b] < 0 || into[b] >= buffer->shape(2))
          throw std::invalid_argument("attention_inputs: into buffers must be float32 (1, KH, T, D), index < T");
  }
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> inputs{x};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  inputs.push_back(q_norm);
  inputs.push_back(k_norm);
  inputs.push_back(offsets.dtype() == mx::int32 ? offsets : mx::astype(offsets, mx::int32, stream));
  inputs.insert(inputs.end(), into_keys.begin(), into_keys.end());
  inputs.insert(inputs.end(), into_values.begin(), into_values.end());
  Layout layout{heads, kv_heads, head_dim, eps, norm_offset, rope_dims, rope_base, rope_scale, split_rows, into};
  std::vector<mx::Shape> shapes = AttentionInputs::shapes(B, layout);
  auto outputs = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                        std::make_shared<AttentionInputs>(stream, layout), inputs);
  if (!into.empty()) return nb::make_tuple(outputs[0]);
  if (!split_rows) return nb::make_tuple(outputs[0], outputs[1], outputs[2]);
  return nb::make_tuple(outputs[0], std::vector<mx::array>(outputs.begin() + 1, outputs.begin() + 1 + B),
                        std::vector<mx::array>(outputs.begin() + 1 + B, outputs.end()));
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_attention_inputs(nb::module_& m) {
  m.def("attention_inputs", &attention_inputs, "x"_a, "weights"_a, "q_norm"_a, "k_norm"_a, "offsets"_a, "heads"_a,
        "kv_heads"_a, "head_dim"_a, "eps"_a, "norm_offset"_a, "rope_dims"_a, "rope_base"_a, "rope_scale"_a,
        "split_rows"_a = false, "into_keys"_a = std::vector<mx::array>{}, "into_values"_a = std::vector<mx::array>{},
        "into"_a = std::vector<int>{},
        "(q, k, v) of one decode position: int8 projections, per-head RMS norms of q and k, RoPE; with "
        "split_rows, k and v as lists of one (1, KH, 1, D) array per row; with into (an index per row), "
        "k and v written into the rows' cache buffers into_keys, into_values at that index, and (q,)");
  m.def("exclusive", [](const mx::array& a) { return a.is_available() && a.is_donatable(); }, "array"_a,
        "Whether nothing but this handle sees `a` (no graph, view or other handle): it may be written in place");
}
