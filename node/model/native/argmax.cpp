// Greedy decoding's argmax over each row of the logits as one MLX primitive on the CPU.
//
// MLX's CPU argmax walks a row one float at a time on one thread: ~0.25 ms for Gemma's 262,144
// logits, 2-3% of a decode step, paid once per agent in a batch while the other core idles. Here
// a row is split over the pool, each part scanned 16 lanes at a time (AVX-512 where the CPU has it),
// and the parts merged: the first index of the largest value, as mx.argmax returns.
//
//   argmax_rows(x): x (..., V) float32 -> (...) uint32
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NODE_X86 1
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx_inputs.h"
#include "pool.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Best {
  float value;
  long index;
};

// The first index of the largest of x[v0, v1); ties go to the smaller index.
Best scan_portable(const float* x, long v0, long v1) {
  Best best{-std::numeric_limits<float>::infinity(), v0};
  for (long v = v0; v < v1; v++)
    if (x[v] > best.value) best = {x[v], v};
  return best;
}

#ifdef NODE_X86
__attribute__((target("avx512f"))) Best scan_avx512(const float* x, long v0, long v1) {
  long v = v0;
  Best best{-std::numeric_limits<float>::infinity(), v0};
  if (v1 - v0 >= 16) {
    // Per lane: the largest value and the first position it was seen at.
    __m512 top = _mm512_loadu_ps(x + v);
    __m512i where = _mm512_add_epi32(_mm512_set1_epi32((int)v), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i position = where;
    const __m512i step = _mm512_set1_epi32(16);
    for (v += 16; v + 16 <= v1; v += 16) {
      position = _mm512_add_epi32(position, step);
      const __m512 values = _mm512_loadu_ps(x + v);
      const __mmask16 greater = _mm512_cmp_ps_mask(values, top, _CMP_GT_OQ);
      top = _mm512_mask_mov_ps(top, greater, values);
      where = _mm512_mask_mov_epi32(where, greater, position);
    }
    alignas(64) float tops[16];
    alignas(64) int32_t wheres[16];
    _mm512_store_ps(tops, top);
    _mm512_store_si512((void*)wheres, where);
    for (int l = 0; l < 16; l++)
      if (tops[l] > best.value || (tops[l] == best.value && wheres[l] < best.index)) best = {tops[l], wheres[l]};
  }
  const Best tail = scan_portable(x, v, v1);
  return tail.value > best.value ? tail : best;
}
#endif

Best scan(const float* x, long v0, long v1) {
#ifdef NODE_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return scan_avx512(x, v0, v1);
#endif
  return scan_portable(x, v0, v1);
}

constexpr long MIN_PARALLEL_FLOATS = 1L << 15;

class ArgmaxRows : public node_native::CpuPrimitive {
 public:
  explicit ArgmaxRows(mx::Stream stream) : node_native::CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs, [](node_native::Arrays& in, node_native::Arrays& out) {
      std::vector<float> copy;
      const float* x = node_native::row_major_floats(in[0], copy);
      const long V = in[0].shape(-1), rows = (long)(in[0].size() / V);
      auto& pool = node_native::pool();
      const int parts = V < MIN_PARALLEL_FLOATS ? 1 : pool.threads();  // what pool.run uses
      std::vector<Best> found((size_t)rows * parts);
      pool.run(parts, [&](int part, int count) {
        const long v0 = V * part / count, v1 = V * (part + 1) / count;
        for (long r = 0; r < rows; r++) found[(size_t)r * count + part] = scan(x + r * V, v0, v1);
      });
      uint32_t* result = out[0].data<uint32_t>();
      for (long r = 0; r < rows; r++) {  // parts in index order: a tie keeps the earlier part's
        Best best = found[(size_t)r * parts];
        for (int p = 1; p < parts; p++)
          if (found[(size_t)r * parts + p].value > best.value) best = found[(size_t)r * parts + p];
        result[r] = (uint32_t)best.index;
      }
    });
  }

  const char* name() const override { return "NodeArgmaxRows"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.pop_back();
    return {shape};
  }
};

mx::array argmax_rows(const mx::array& x) {
  if (x.ndim() < 1 || x.shape(-1) == 0 || x.dtype() != mx::float32)
    throw std::invalid_argument("argmax_rows: x must be float32 (..., V) with V > 0");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  auto shape = x.shape();
  shape.pop_back();
  return mx::array(shape, mx::uint32, std::make_shared<ArgmaxRows>(stream), {x});
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_argmax(nb::module_& m) {
  m.def("argmax_rows", &argmax_rows, "x"_a,
        "The first index of the largest value along the last axis of float32 x, as uint32 (mx.argmax)");
}
