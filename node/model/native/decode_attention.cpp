// Attention of one new position per sequence over its cached keys and values (a decode step),
// as one MLX primitive with a CPU implementation.
//
// MLX's CPU backend computes a one-query attention as six graph operations: q @ K^T and P @ V go
// through cblas_sgemm (whose OpenBLAS threads then spin beside the other kernels' threads on a
// 2-core machine), the softmax evaluates exp one element at a time and every intermediate is a new
// buffer. Measured on Gemma 3 270M at 2k tokens of context: a decode step took 62 ms against 29 ms
// at 70 tokens, though attention over 2k keys is ~4 MFLOP per layer. Here the whole product is one
// pass over K and V (flash-decoding): the positions are cut into chunks spread over node's thread
// pool, each chunk keeps its running maximum, sum and weighted values for every query head of its
// KV head (grouped-query heads read K and V once), and the chunks are merged at the end.
//
//   q (B, H, 1, D), k and v (B, KH, S, D) float32, H a multiple of KH; k and v may be views into a
//   larger cache buffer (any strides but the last); mask (B, S) bool, true where a position is
//   visible (batched decode left-pads shorter sequences), or none.
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

#include "pool.h"

#ifndef NODE_DECODE_ATTENTION_KERNELS_ONLY
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx_inputs.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NODE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define NODE_VECTOR_CLONES
#endif

namespace node_native {

constexpr int ATTENTION_CHUNK = 256;      // positions per unit of work
constexpr int MAX_GROUP = 16;             // query heads per KV head handled here
constexpr long MIN_PARALLEL_VALUES = 1L << 16;  // K and V floats below which one thread does it all

struct Attention {
  const float* q;      // (B, H, D) contiguous (the one position squeezed)
  const float* k;      // strides below, last axis contiguous
  const float* v;
  const bool* mask;    // (B, S) or nullptr
  float* out;          // (B, H, D)
  int B, H, KH, S, D;
  int64_t k_strides[3], v_strides[3];  // batch, head, position
  float scale;
};

// One chunk's partial result for the G query heads of one KV head: running maximum, sum of
// exp(score - maximum) and the values weighted by it.
struct Partial {
  float* max;   // G
  float* sum;   // G
  float* acc;   // G x D
};

inline float dot(const float* a, const float* b, int D) {
  float lanes[16] = {};
  int d = 0;
  for (; d + 16 <= D; d += 16)
    for (int l = 0; l < 16; l++) lanes[l] += a[d + l] * b[d + l];
  float total = 0.0f;
  for (int l = 0; l < 16; l++) total += lanes[l];
  for (; d < D; d++) total += a[d] * b[d];
  return total;
}

NODE_VECTOR_CLONES
void attend_chunk(const Attention& a, int b, int kh, int s0, int s1, Partial part) {
  const int G = a.H / a.KH, D = a.D, n = s1 - s0;
  const float* q = a.q + ((size_t)b * a.H + (size_t)kh * G) * D;
  const float* k = a.k + b * a.k_strides[0] + kh * a.k_strides[1];
  const float* v = a.v + b * a.v_strides[0] + kh * a.v_strides[1];
  const bool* mask = a.mask ? a.mask + (size_t)b * a.S : nullptr;
  float scores[MAX_GROUP][ATTENTION_CHUNK];
  constexpr float hidden = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; j++) {
    const int s = s0 + j;
    const float* key = k + s * a.k_strides[2];
    const bool visible = mask == nullptr || mask[s];
    for (int g = 0; g < G; g++) scores[g][j] = visible ? dot(q + (size_t)g * D, key, D) * a.scale : hidden;
  }
  for (int g = 0; g < G; g++) {
    float m = hidden;
    for (int j = 0; j < n; j++) m = std::max(m, scores[g][j]);
    float sum = 0.0f;
    if (m != hidden)
      for (int j = 0; j < n; j++) sum += (scores[g][j] = std::exp(scores[g][j] - m));
    part.max[g] = m;
    part.sum[g] = sum;
    std::fill(part.acc + (size_t)g * D, part.acc + (size_t)(g + 1) * D, 0.0f);
  }
  for (int j = 0; j < n; j++) {
    const float* value = v + (s0 + j) * a.v_strides[2];
    for (int g = 0; g < G; g++) {
      if (part.max[g] == hidden) continue;
      const float p = scores[g][j];
      float* acc = part.acc + (size_t)g * D;
      for (int d = 0; d < D; d++) acc[d] += p * value[d];
    }
  }
}

// out = sum over chunks of acc * exp(max - M) / sum over chunks of sum * exp(max - M).
void merge(const Attention& a, int b, int kh, const std::vector<float>& partials, int chunks, int G) {
  const int D = a.D;
  const size_t stride = (size_t)G * (D + 2);
  const float* base = partials.data() + ((size_t)b * a.KH + kh) * chunks * stride;
  for (int g = 0; g < G; g++) {
    float M = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < chunks; c++) M = std::max(M, base[c * stride + g]);
    float* out = a.out + ((size_t)b * a.H + (size_t)kh * G + g) * D;
    std::fill(out, out + D, 0.0f);
    if (M == -std::numeric_limits<float>::infinity()) continue;  // nothing visible
    float total = 0.0f;
    for (int c = 0; c < chunks; c++) {
      const float* chunk = base + c * stride;
      if (chunk[g] == -std::numeric_limits<float>::infinity()) continue;
      const float w = std::exp(chunk[g] - M);
      total += chunk[G + g] * w;
      const float* acc = chunk + 2 * G + (size_t)g * D;
      for (int d = 0; d < D; d++) out[d] += acc[d] * w;
    }
    const float inverse = 1.0f / total;
    for (int d = 0; d < D; d++) out[d] *= inverse;
  }
}

void decode_attention_cpu(const Attention& a) {
  const int G = a.H / a.KH;
  const int chunks = (a.S + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
  const int units = a.B * a.KH * chunks;
  const size_t stride = (size_t)G * (a.D + 2);
  std::vector<float> partials((size_t)units * stride);
  auto work = [&](int part, int parts) {
    for (int u = (int)((long)units * part / parts); u < (int)((long)units * (part + 1) / parts); u++) {
      const int c = u % chunks, group = u / chunks;
      float* p = partials.data() + (size_t)u * stride;
      attend_chunk(a, group / a.KH, group % a.KH, c * ATTENTION_CHUNK, std::min(a.S, (c + 1) * ATTENTION_CHUNK),
                   Partial{p, p + G, p + 2 * G});
    }
  };
  const long values = 2L * a.B * a.KH * a.S * a.D;
  if (values < MIN_PARALLEL_VALUES || units == 1)
    work(0, 1);
  else
    pool().run(std::min(units, pool().threads()), work);
  for (int b = 0; b < a.B; b++)
    for (int kh = 0; kh < a.KH; kh++) merge(a, b, kh, partials, chunks, G);
}

}  // namespace node_native

#ifndef NODE_DECODE_ATTENTION_KERNELS_ONLY
namespace {

using node_native::Attention;

// k or v (B, KH, S, D) as the kernel reads them, its batch, head and position strides in `strides`:
// a cache's view as it is (any strides but the last), anything else gathered into `copy` first.
const float* positions(const mx::array& x, std::vector<float>& copy, int64_t* strides) {
  if (x.strides().back() == 1) {
    for (int d = 0; d < 3; d++) strides[d] = x.strides()[d];
    return x.data<float>();
  }
  strides[2] = x.shape(3);
  strides[1] = strides[2] * x.shape(2);
  strides[0] = strides[1] * x.shape(1);
  return node_native::row_major_floats(x, copy);
}

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    std::vector<mx::array> held;
    for (const auto& input : inputs) held.push_back(mx::array::unsafe_weak_copy(input));
    encoder.dispatch([held = std::move(held), out = mx::array::unsafe_weak_copy(out), scale = scale_]() mutable {
      const mx::array &q = held[0], &k = held[1], &v = held[2];
      std::vector<float> q_copy, k_copy, v_copy;
      Attention a{node_native::row_major_floats(q, q_copy), nullptr, nullptr,
                  held.size() > 3 ? held[3].data<bool>() : nullptr, out.data<float>(),
                  (int)q.shape(0), (int)q.shape(1), (int)k.shape(1), (int)k.shape(2), (int)k.shape(3),
                  {}, {}, scale};
      a.k = positions(k, k_copy, a.k_strides);
      a.v = positions(v, v_copy, a.v_strides);
      node_native::decode_attention_cpu(a);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("decode_attention runs on the CPU backend only");
  }

  const char* name() const override { return "NodeDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const DecodeAttention&>(other).scale_ == scale_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
};

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           std::optional<mx::array> mask) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention: q must be (B, H, 1, D), k and v (B, KH, S, D)");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3))
    throw std::invalid_argument("decode_attention: q, k and v disagree on B or D");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0 || q.shape(1) / k.shape(1) > node_native::MAX_GROUP)
    throw std::invalid_argument("decode_attention: query heads must be 1-16 times the KV heads");
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32)
    throw std::invalid_argument("decode_attention: q, k and v must be float32");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> inputs{q, k, v};  // taken as they come: no copy operations in a decode step
  if (mask.has_value()) {
    const int B = k.shape(0), S = k.shape(2);
    if (mask->size() != (size_t)B * S || mask->shape(0) != B || mask->shape(-1) != S)
      throw std::invalid_argument("decode_attention: mask must hold (B, S) visibilities, e.g. (B, 1, 1, S)");
    inputs.push_back(mx::contiguous(mx::reshape(mx::astype(*mask, mx::bool_, stream), {B, S}, stream), false, stream));
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale), std::move(inputs));
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_decode_attention(nb::module_& m) {
  m.def("decode_attention", &decode_attention, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a = nb::none(),
        "softmax(q k^T * scale) v for one query position: q (B, H, 1, D), k and v (B, KH, S, D) "
        "float32, mask (B, ..., S) bool (true: visible) or None");
}
#endif  // NODE_DECODE_ATTENTION_KERNELS_ONLY
