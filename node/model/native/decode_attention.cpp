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
//   visible, or none. Or, for a batch of sequences of different lengths (batched decode), one k and
//   v (1, KH, S_b, D) per sequence: no padding, no copies.
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "pool.h"

#ifndef NODE_DECODE_ATTENTION_KERNELS_ONLY
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

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

constexpr int ATTENTION_CHUNK = 256;      // the most positions per unit of work
constexpr int MIN_CHUNK = 32;             // the fewest, unless a sequence holds fewer
constexpr int MAX_GROUP = 16;             // query heads per KV head handled here
constexpr long MIN_PARALLEL_VALUES = 1L << 16;  // K and V floats below which one thread does it all

// One sequence's cached positions: keys and values (KH, S, D) with their head and position
// strides (the last axis contiguous), and which positions it may see (nullptr: all).
struct Sequence {
  const float* k;
  const float* v;
  int S;
  int64_t k_head, k_position, v_head, v_position;
  const bool* mask;
};

struct Attention {
  const float* q;  // (B, H, D) contiguous (the one position squeezed)
  float* out;      // (B, H, D)
  int B, H, KH, D;
  float scale;
  std::vector<Sequence> sequences;  // B of them
};

// One chunk's partial result for the G query heads of one KV head: running maximum, sum of
// exp(score - maximum) and the values weighted by it.
struct Partial {
  float* max;   // G
  float* sum;   // G
  float* acc;   // G x D
};

// A unit of work: positions [s0, s1) of sequence b's KV head kh.
struct Unit {
  int b, kh, s0, s1;
};

NODE_VECTOR_CLONES
void attend_chunk(const Attention& a, const Unit& unit, Partial part) {
  const int G = a.H / a.KH, D = a.D, n = unit.s1 - unit.s0;
  const Sequence& seq = a.sequences[unit.b];
  const float* q = a.q + ((size_t)unit.b * a.H + (size_t)unit.kh * G) * D;
  const float* k = seq.k + unit.kh * seq.k_head;
  const float* v = seq.v + unit.kh * seq.v_head;
  float scores[MAX_GROUP][ATTENTION_CHUNK];
  constexpr float hidden = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; j++) {
    const int s = unit.s0 + j;
    const float* key = k + s * seq.k_position;
    const bool visible = seq.mask == nullptr || seq.mask[s];
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
    const float* value = v + (unit.s0 + j) * seq.v_position;
    for (int g = 0; g < G; g++) {
      if (part.max[g] == hidden) continue;
      const float p = scores[g][j];
      float* acc = part.acc + (size_t)g * D;
      for (int d = 0; d < D; d++) acc[d] += p * value[d];
    }
  }
}

// out = sum over chunks of acc * exp(max - M) / sum over chunks of sum * exp(max - M), for the
// units [first, last) that cover one (sequence, KV head).
void merge(const Attention& a, const std::vector<Unit>& units, int first, int last, const std::vector<float>& partials) {
  const int G = a.H / a.KH, D = a.D;
  const size_t stride = (size_t)G * (D + 2);
  constexpr float hidden = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; g++) {
    float M = hidden;
    for (int u = first; u < last; u++) M = std::max(M, partials[u * stride + g]);
    float* out = a.out + ((size_t)units[first].b * a.H + (size_t)units[first].kh * G + g) * D;
    std::fill(out, out + D, 0.0f);
    if (M == hidden) continue;  // nothing visible
    float total = 0.0f;
    for (int u = first; u < last; u++) {
      const float* chunk = partials.data() + u * stride;
      if (chunk[g] == hidden) continue;
      const float w = std::exp(chunk[g] - M);
      total += chunk[G + g] * w;
      const float* acc = chunk + 2 * G + (size_t)g * D;
      for (int d = 0; d < D; d++) out[d] += acc[d] * w;
    }
    const float inverse = 1.0f / total;
    for (int d = 0; d < D; d++) out[d] *= inverse;
  }
}

// Positions per unit of work for one sequence of S positions: about four units per thread (few,
// unequal chunks leave a thread idle: 300 positions in chunks of 256 gave one thread 256 and the
// other 44), at least MIN_CHUNK, at most ATTENTION_CHUNK. It depends on the sequence alone, not on
// the others in its batch, so that a sequence's result is the same bits batched or alone (the
// chunks are merged in order).
int chunk_positions(int S, int KH) {
  const long target = 4L * pool().threads();
  const long chunk = (((long)S * KH + target - 1) / target + 15) / 16 * 16;
  return (int)std::clamp<long>(chunk, MIN_CHUNK, ATTENTION_CHUNK);
}

void decode_attention_cpu(const Attention& a) {
  const int G = a.H / a.KH;
  std::vector<Unit> units;
  std::vector<int> starts;  // first unit of each (sequence, KV head), then the end
  long values = 0;
  for (int b = 0; b < a.B; b++)
    for (int kh = 0; kh < a.KH; kh++) {
      starts.push_back((int)units.size());
      const int S = a.sequences[b].S, chunk = chunk_positions(S, a.KH);
      for (int s0 = 0; s0 < S; s0 += chunk) units.push_back({b, kh, s0, std::min(S, s0 + chunk)});
      if (S == 0) units.push_back({b, kh, 0, 0});
      values += 2L * S * a.D;
    }
  starts.push_back((int)units.size());
  const int count = (int)units.size();
  const size_t stride = (size_t)G * (a.D + 2);
  std::vector<float> partials((size_t)count * stride);
  auto work = [&](int part, int parts) {
    for (int u = (int)((long)count * part / parts); u < (int)((long)count * (part + 1) / parts); u++) {
      float* p = partials.data() + (size_t)u * stride;
      attend_chunk(a, units[u], Partial{p, p + G, p + 2 * G});
    }
  };
  if (values < MIN_PARALLEL_VALUES || count == 1)
    work(0, 1);
  else
    pool().run(std::min(count, pool().threads()), work);
  for (size_t i = 0; i + 1 < starts.size(); i++) merge(a, units, starts[i], starts[i + 1], partials);
}

}  // namespace node_native

#ifndef NODE_DECODE_ATTENTION_KERNELS_ONLY
namespace {

using node_native::Attention;

// k or v (batch, KH, S, D) as the kernel reads them: a cache's view as it is (any strides but the
// last), anything else gathered into `copy` first. Returns the floats and their strides.
const float* positions(const mx::array& x, std::vector<float>& copy, int64_t strides[3]) {
  if (x.strides().back() == 1) {
    for (int d = 0; d < 3; d++) strides[d] = x.strides()[d];
    return x.data<float>();
  }
  strides[2] = x.shape(3);
  strides[1] = strides[2] * x.shape(2);
  strides[0] = strides[1] * x.shape(1);
  return node_native::row_major_floats(x, copy);
}

// inputs: q, then k, v (B, KH, S, D) and optionally a (B, S) mask ("padded"), or one k, v pair
// (1, KH, S_b, D) per sequence ("ragged": batched decode without padding or copies).
class DecodeAttention : public node_native::CpuPrimitive {
 public:
  // ranges: per sequence, the positions [start, stop) of its k and v buffers to attend to
  // (ragged only; empty: all of them)
  using Ranges = std::vector<std::pair<int, int>>;

  DecodeAttention(mx::Stream stream, float scale, bool ragged, Ranges ranges = {})
      : node_native::CpuPrimitive(stream), scale_(scale), ragged_(ragged), ranges_(std::move(ranges)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [scale = scale_, ragged = ragged_, ranges = ranges_](node_native::Arrays& held, node_native::Arrays& outs) {
      mx::array& out = outs[0];
      const mx::array& q = held[0];
      std::vector<float> q_copy;
      std::vector<std::vector<float>> copies(held.size());
      const int B = (int)q.shape(0), KH = (int)held[1].shape(1), D = (int)q.shape(3);
      node_native::Attention a{node_native::row_major_floats(q, q_copy), out.data<float>(), B, (int)q.shape(1), KH, D,
                               scale, {}};
      for (int b = 0; b < B; b++) {
        const int k_index = ragged ? 1 + 2 * b : 1, v_index = k_index + 1;
        int64_t ks[3], vs[3];
        const float* k = positions(held[k_index], copies[k_index], ks);
        const float* v = positions(held[v_index], copies[v_index], vs);
        const int batch_row = ragged ? 0 : b, S = (int)held[k_index].shape(2);
        const bool* mask = !ragged && held.size() > 3 ? held[3].data<bool>() + (size_t)b * S : nullptr;
        const auto [start, stop] = ranges.empty() ? std::pair<int, int>{0, S} : ranges[b];
        a.sequences.push_back({k + batch_row * ks[0] + start * ks[2], v + batch_row * vs[0] + start * vs[2], stop - start,
                               ks[1], ks[2], vs[1], vs[2], mask});
      }
      node_native::decode_attention_cpu(a);
    });
  }

  const char* name() const override { return "NodeDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return o.scale_ == scale_ && o.ragged_ == ragged_ && o.ranges_ == ranges_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  bool ragged_;
  Ranges ranges_;
};

void check_query(const mx::array& q, const mx::array& k) {
  if (q.ndim() != 4 || k.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention: q must be (B, H, 1, D), k and v (B, KH, S, D)");
  if (q.shape(3) != k.shape(3)) throw std::invalid_argument("decode_attention: q, k and v disagree on D");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0 || q.shape(1) / k.shape(1) > node_native::MAX_GROUP)
    throw std::invalid_argument("decode_attention: query heads must be 1-16 times the KV heads");
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32)
    throw std::invalid_argument("decode_attention: q, k and v must be float32");
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           std::optional<mx::array> mask) {
  check_query(q, k);
  if (k.shape() != v.shape() || v.dtype() != mx::float32 || q.shape(0) != k.shape(0))
    throw std::invalid_argument("decode_attention: q, k and v disagree on B or D");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  std::vector<mx::array> inputs{q, k, v};  // taken as they come: no copy operations in a decode step
  if (mask.has_value()) {
    const int B = k.shape(0), S = k.shape(2);
    if (mask->size() != (size_t)B * S || mask->shape(0) != B || mask->shape(-1) != S)
      throw std::invalid_argument("decode_attention: mask must hold (B, S) visibilities, e.g. (B, 1, 1, S)");
    inputs.push_back(mx::contiguous(mx::reshape(mx::astype(*mask, mx::bool_, stream), {B, S}, stream), false, stream));
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale, false), std::move(inputs));
}

mx::array decode_attention_ragged(const mx::array& q, const std::vector<mx::array>& keys,
                                  const std::vector<mx::array>& values, const std::vector<std::pair<int, int>>& ranges,
                                  float scale) {
  if (keys.size() != values.size() || keys.size() != ranges.size() || (int)keys.size() != (q.ndim() ? q.shape(0) : -1))
    throw std::invalid_argument("decode_attention_ragged: one keys, values and range per batch row of q");
  std::vector<mx::array> inputs{q};
  for (size_t b = 0; b < keys.size(); b++) {
    check_query(q, keys[b]);
    const mx::array &k = keys[b], &v = values[b];
    if (k.shape(0) != 1 || k.shape() != v.shape() || v.dtype() != mx::float32 || k.shape(1) != keys[0].shape(1))
      throw std::invalid_argument("decode_attention_ragged: each sequence's k and v must be (1, KH, S, D) float32");
    const auto [start, stop] = ranges[b];
    if (start < 0 || stop <= start || stop > k.shape(2))
      throw std::invalid_argument("decode_attention_ragged: each range must be 0 <= start < stop <= S");
    inputs.push_back(k);
    inputs.push_back(v);
  }
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale, true, ranges),
                   std::move(inputs));
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_decode_attention(nb::module_& m) {
  m.def("decode_attention", &decode_attention, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a = nb::none(),
        "softmax(q k^T * scale) v for one query position: q (B, H, 1, D), k and v (B, KH, S, D) "
        "float32, mask (B, ..., S) bool (true: visible) or None");
  m.def("decode_attention_ragged", &decode_attention_ragged, "q"_a, "keys"_a, "values"_a, "ranges"_a, "scale"_a,
        "decode_attention for sequences of different lengths: positions ranges[b] = (start, stop) of "
        "keys[b], values[b] (1, KH, S_b, D), e.g. a cache's whole buffer");
}
#endif  // NODE_DECODE_ATTENTION_KERNELS_ONLY
