// The rest of a Gemma 3 decode layer as two MLX primitives (with attention_inputs.cpp and
// decode_attention.cpp, a layer is four operations plus the cache writes):
//
//   attention_output(h, a, Wo, post_norm, eps, offset) = h + norm(a @ Wo^T, post_norm)
//   gated_mlp(h, pre_norm, Wg, Wu, Wd, post_norm, eps, offset)
//       = h + norm(Wd @ (gelu_tanh(Wg @ n) * (Wu @ n)), post_norm),  n = norm(h, pre_norm)
//
// W are int8 with per-block scales (int8_matmul.cpp), norms are Gemma's (scale offset + w), the
// GELU is tanh-approximated with Eigen's rational tanh (as node.model.cpu_kernels). Rows are the
// decode step's few sequences; the scratch vectors live for one call.
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
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

// Eigen's generic_fast_tanh_float: x * P(x^2) / Q(x^2) on [-7.9053, 7.9053].
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) void gelu_gate(const float* gate, float* up, long n) {
  constexpr float clamp = 7.90531110763549805f, c = 0.7978845608028654f;
  for (long i = 0; i < n; i++) {
    const float g = gate[i];
    float x = c * (g + 0.044715f * g * g * g);
    x = std::min(clamp, std::max(-clamp, x));
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    up[i] *= 0.5f * g * (1.0f + x * p / q);
  }
}

// out = h + norm(y, post) over rows of D
void add_normalized(const float* h, float* y, const float* post, float* out, long rows, int D, float eps, float offset) {
  node_native::normalize_rows(y, post, y, 0, rows, D, eps, offset);
  for (long i = 0; i < rows * D; i++) out[i] = h[i] + y[i];
}

node_native::Product product(const float* x, const mx::array& w, const mx::array& s, float* out, int rows) {
  return {x, w.data<int8_t>(), s.data<float>(), out, rows, (int)w.shape(0), (int)w.shape(1)};
}

struct Norm {
  float eps, offset;
  bool operator==(const Norm&) const = default;
};

// inputs: attention_output: h, a, wo, so, post | gated_mlp: h, pre, wg, sg, wu, su, wd, sd, post
class DecodeBlock : public node_native::CpuPrimitive {
 public:
  DecodeBlock(mx::Stream stream, bool mlp, Norm norm) : node_native::CpuPrimitive(stream), mlp_(mlp), norm_(norm) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [mlp = mlp_, n = norm_](node_native::Arrays& held, node_native::Arrays& out) {
      std::vector<float> h_copy, a_copy;
      const float* h = node_native::row_major_floats(held[0], h_copy);
      const int D = (int)held[0].shape(-1);
      const int rows = (int)(held[0].size() / D);
      std::vector<float> y((size_t)rows * D);
      if (!mlp) {
        const float* a = node_native::row_major_floats(held[1], a_copy);
        node_native::int8_product(product(a, held[2], held[3], y.data(), rows));
        add_normalized(h, y.data(), held[4].data<float>(), out[0].data<float>(), rows, D, n.eps, n.offset);
        return;
      }
      const int hidden = (int)held[2].shape(0);
      std::vector<float> normed((size_t)rows * D), gate((size_t)rows * hidden), up((size_t)rows * hidden);
      node_native::normalize_rows(h, held[1].data<float>(), normed.data(), 0, rows, D, n.eps, n.offset);
      node_native::int8_product(product(normed.data(), held[2], held[3], gate.data(), rows));
      node_native::int8_product(product(normed.data(), held[4], held[5], up.data(), rows));
      gelu_gate(gate.data(), up.data(), (long)rows * hidden);
      node_native::int8_product(product(up.data(), held[6], held[7], y.data(), rows));
      add_normalized(h, y.data(), held[8].data<float>(), out[0].data<float>(), rows, D, n.eps, n.offset);
    });
  }

  const char* name() const override { return mlp_ ? "NodeGatedMlp" : "NodeAttentionOutput"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeBlock&>(other);
    return o.mlp_ == mlp_ && o.norm_ == norm_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  bool mlp_;
  Norm norm_;
};

void check_projection(const mx::array& w, const mx::array& s, int outputs, int inputs, const char* name) {
  if (w.dtype() != mx::int8 || w.ndim() != 2 || w.shape(0) != outputs || w.shape(1) != inputs ||
      s.dtype() != mx::float32 || !w.is_available() || !s.is_available() || !w.flags().row_contiguous ||
      !s.flags().row_contiguous)
    throw std::invalid_argument(std::string(name) + ": projections must be evaluated int8 weights of matching shapes");
}

void check_norm(const mx::array& w, int D, const char* name) {
  if (w.ndim() != 1 || w.shape(0) != D || w.dtype() != mx::float32)
    throw std::invalid_argument(std::string(name) + ": norm weights must be float32 (D,)");
}

mx::array attention_output(const mx::array& h, const mx::array& a, const mx::array& wo, const mx::array& so,
                           const mx::array& post, float eps, float offset) {
  if (h.dtype() != mx::float32 || a.dtype() != mx::float32 || h.ndim() < 1)
    throw std::invalid_argument("attention_output: h and a must be float32");
  const int D = h.shape(-1);
  check_projection(wo, so, D, a.shape(-1), "attention_output");
  check_norm(post, D, "attention_output");
  if (a.size() / a.shape(-1) != h.size() / D) throw std::invalid_argument("attention_output: h and a rows differ");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(h.shape(), mx::float32, std::make_shared<DecodeBlock>(stream, false, Norm{eps, offset}),
                   {h, a, wo, so, post});
}

mx::array gated_mlp(const mx::array& h, const mx::array& pre, const std::vector<mx::array>& weights,
                    const mx::array& post, float eps, float offset) {
  if (h.dtype() != mx::float32 || h.ndim() < 1) throw std::invalid_argument("gated_mlp: h must be float32");
  if (weights.size() != 6) throw std::invalid_argument("gated_mlp: weights are wg, sg, wu, su, wd, sd");
  const int D = h.shape(-1), hidden = weights[0].shape(0);
  check_projection(weights[0], weights[1], hidden, D, "gated_mlp");
  check_projection(weights[2], weights[3], hidden, D, "gated_mlp");
  check_projection(weights[4], weights[5], D, hidden, "gated_mlp");
  check_norm(pre, D, "gated_mlp");
  check_norm(post, D, "gated_mlp");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> inputs{h, pre};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  inputs.push_back(post);
  return mx::array(h.shape(), mx::float32, std::make_shared<DecodeBlock>(stream, true, Norm{eps, offset}),
                   std::move(inputs));
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_decode_blocks(nb::module_& m) {
  m.def("attention_output", &attention_output, "h"_a, "a"_a, "wo"_a, "so"_a, "post_norm"_a, "eps"_a, "offset"_a,
        "h + norm(a @ Wo^T) (int8 Wo, norm scale offset + weight)");
  m.def("gated_mlp", &gated_mlp, "h"_a, "pre_norm"_a, "weights"_a, "post_norm"_a, "eps"_a, "offset"_a,
        "h + norm(down(gelu_tanh(gate(n)) * up(n))), n = norm(h): Gemma's MLP with its norms and residual");
}
