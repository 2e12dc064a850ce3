// x @ W^T with int8 weights: an MLX primitive with a CPU implementation.
//
// Decode on the CPU is bound by reading the weights (Gemma 3 270M in fp32 streams ~1.07 GB per
// token), and MLX's CPU backend has no fast reduced-precision product (its bf16 and 4-bit
// matmuls are 4x slower than fp32 BLAS). Here weights are int8 with one fp32 scale per block of
// BLOCK consecutive inputs (W[n, k] = q[n, k] * scale[n, k / BLOCK]); activations stay fp32.
//
//   rows <= MAX_DIRECT_ROWS (decode steps)  -> the int8 kernel: W read once per 8 rows, the
//                                             output columns split across a persistent pool;
//                                             AVX-512 VNNI, AVX-512F, AVX2+FMA or portable,
//                                             picked at run time
//   more rows (prefill), packed weights     -> the VNNI panel kernel blocked for the caches
//                                             (`blocked`): inputs quantized per block as in
//                                             decode; 2k-token prefill 4.0-4.4 -> 2.8-3.1 s
//   more rows, other machines or shapes     -> W dequantized to fp32 once per call (in parallel),
//                                             then cblas_sgemm (OpenBLAS behind node's shim)
//
// Part of node's MLX CPU extension (cpu_ops.cpp; built and loaded by node.model.cpu_extension).

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NODE_X86 1
#endif

#include "kernels.h"
#include "pool.h"

#ifndef NODE_INT8_KERNELS_ONLY  // defined by tests that check the kernels without MLX
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx_inputs.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;
#endif

namespace {

using node_native::pool;

constexpr int BLOCK = 64;
constexpr int MAX_KERNEL_ROWS = 8;    // rows one pass of the kernel reads W for
constexpr int MAX_DIRECT_ROWS = 16;   // above this, dequantize and use sgemm
constexpr long MIN_PARALLEL_WEIGHTS = 1L << 18;
constexpr int PREFETCH_BYTES = 4096;  // VNNI path for rows, several of them
constexpr int PANEL = 16;             // outputs per panel of packed weights (one 512-bit lane each)

using node_native::Product;

// ---------------------------------------------------------------------------------------------
// Kernels: out[m, n] for n in [n0, n1), all M (<= MAX_KERNEL_ROWS) rows.

template <int M>
void span_portable(const Product& p, int n0, int n1) {
  const int blocks = p.K / BLOCK;
  for (int n = n0; n < n1; n++) {
    const int8_t* w = p.w + (size_t)n * p.K;
    float acc[M] = {};
    for (int b = 0; b < blocks; b++) {
      float part[M] = {};
      for (int k = b * BLOCK; k < (b + 1) * BLOCK; k++) {
        const float wk = (float)w[k];
        for (int m = 0; m < M; m++) part[m] += wk * p.x[(size_t)m * p.K + k];
      }
      const float s = p.scales[(size_t)n * blocks + b];
      for (int m = 0; m < M; m++) acc[m] += part[m] * s;
    }
    for (int m = 0; m < M; m++) p.out[(size_t)m * p.N + n] = acc[m];
  }
}

#ifdef NODE_X86
// Accumulators per row: one row needs several independent FMA chains to hide their latency;
// eight rows already have eight.
constexpr int chains(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M>
__attribute__((target("avx2,fma"))) void span_avx2(const Product& p, int n0, int n1) {
  constexpr int U = chains(M);
  const int blocks = p.K / BLOCK;
  for (int n = n0; n < n1; n++) {
    const int8_t* w = p.w + (size_t)n * p.K;
    __m256 acc[M][U];
    for (int m = 0; m < M; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
      const __m256 scale = _mm256_set1_ps(p.scales[(size_t)n * blocks + b]);
      for (int j = 0; j < BLOCK; j += 32) {
        const int k = b * BLOCK + j;
        __m256 wv[4];
        for (int v = 0; v < 4; v++) {
          __m128i q = _mm_loadl_epi64((const __m128i*)(w + k + 8 * v));
          wv[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
        }
        for (int m = 0; m < M; m++) {
          const float* x = p.x + (size_t)m * p.K + k;
          for (int v = 0; v < 4; v++)
            acc[m][v % U] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + 8 * v), acc[m][v % U]);
        }
      }
    }
    for (int m = 0; m < M; m++) {
      __m256 total = acc[m][0];
      for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[m][u]);
      p.out[(size_t)m * p.N + n] = hsum256(total);
    }
  }
}

template <int M>
__attribute__((target("avx512f"))) void span_avx512(const Product& p, int n0, int n1) {
  constexpr int U = chains(M);
  const int blocks = p.K / BLOCK;
  for (int n = n0; n < n1; n++) {
    const int8_t* w = p.w + (size_t)n * p.K;
    __m512 acc[M][U];
    for (int m = 0; m < M; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
      const __m512 scale = _mm512_set1_ps(p.scales[(size_t)n * blocks + b]);
      const int k = b * BLOCK;  // BLOCK = 4 vectors of 16
      __m512 wv[4];
      for (int v = 0; v < 4; v++) {
        __m128i q = _mm_loadu_si128((const __m128i*)(w + k + 16 * v));
        wv[v] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale);
      }
      for (int m = 0; m < M; m++) {
        const float* x = p.x + (size_t)m * p.K + k;
        for (int v = 0; v < 4; v++)
          acc[m][v % U] = _mm512_fmadd_ps(wv[v], _mm512_loadu_ps(x + 16 * v), acc[m][v % U]);
      }
    }
    for (int m = 0; m < M; m++) {
      __m512 total = acc[m][0];
      for (int u = 1; u < U; u++) total = _mm512_add_ps(total, acc[m][u]);
      p.out[(size_t)m * p.N + n] = _mm512_reduce_add_ps(total);
    }
  }
}

// With AVX-512 VNNI the activations are quantized too (int8 per block of 64, as llama.cpp's Q8_0
// products do), so that one vpdpbusd multiplies 64 weights by 64 inputs: ~3x fewer instructions
// per weight than converting the weights to float, which made the float paths compute-bound (the
// lm_head took 12 ms on one core, 6.5 ms on two). vpdpbusd multiplies unsigned by signed bytes:
// the weights become unsigned by flipping their top bit (w + 128: one XOR per block, shared by all
// rows), and the 128 * sum(x) this adds to a block's dot is taken off once per output, as a dot
// of the row's block scales with the inputs' block offsets (-128 * sum, scaled). Per row and block that leaves
// a vpdpbusd, a conversion and an FMA whose scale (weight block's x input block's) comes from a
// table filled 16 blocks at a time; four outputs are reduced together. A batch of agents (rows)
// then costs little more than one where reading the weights bounds the product.
__attribute__((target("avx512f,avx512dq"))) inline __m128 sum_to_128(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void vnni_block(const Product& p, const int8_t* w, int b,
                                                                             int blocks, const float (&scale)[M][16],
                                                                             int j, __m512 (&acc)[M]) {
  // With several rows the arithmetic no longer hides the memory latency by itself: fetch the
  // weights ~6 rows ahead (one row alone is bound by the stream and gains nothing).
  if (M > 1) _mm_prefetch((const char*)(w + (size_t)b * BLOCK + PREFETCH_BYTES), _MM_HINT_T0);
  const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void*)(w + (size_t)b * BLOCK)), _mm512_set1_epi8((char)0x80));
  for (int m = 0; m < M; m++) {
    const __m512i x = _mm512_loadu_si512((const void*)(p.x_values + ((size_t)m * blocks + b) * BLOCK));
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, x);
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale[m][j]), acc[m]);
  }
}

// Output n of every row, summed to four lanes.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512dq"))) inline void vnni_output(const Product& p, int n,
                                                                                       __m128 (&out)[M]) {
  const int blocks = p.K / BLOCK;
  const int8_t* w = p.w + (size_t)n * p.K;
  const float* w_scales = p.scales + (size_t)n * blocks;
  alignas(64) float scale[M][16];
  __m512 even[M], odd[M], correction[M];  // two FMA chains per row; the w + 128 correction
  for (int m = 0; m < M; m++) even[m] = odd[m] = correction[m] = _mm512_setzero_ps();
  for (int b0 = 0; b0 < blocks; b0 += 16) {
    const int count = std::min(16, blocks - b0);
    const __mmask16 live = (__mmask16)((1u << count) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(live, w_scales + b0);
    for (int m = 0; m < M; m++) {
      const size_t xb = (size_t)m * blocks + b0;
      const __m512 xs = _mm512_maskz_loadu_ps(live, p.x_scales + xb);
      _mm512_store_ps(scale[m], _mm512_mul_ps(ws, xs));
      const __m512 offsets = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, p.x_offsets + xb));
      correction[m] = _mm512_fmadd_ps(ws, _mm512_mul_ps(xs, offsets), correction[m]);
    }
    int j = 0;
    for (; j + 2 <= count; j += 2) {
      vnni_block<M>(p, w, b0 + j, blocks, scale, j, even);
      vnni_block<M>(p, w, b0 + j + 1, blocks, scale, j + 1, odd);
    }
    if (j < count) vnni_block<M>(p, w, b0 + j, blocks, scale, j, even);
  }
  for (int m = 0; m < M; m++) out[m] = sum_to_128(_mm512_add_ps(_mm512_add_ps(even[m], odd[m]), correction[m]));
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512dq"))) void span_vnni(const Product& p, int n0, int n1) {
  int n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m128 part[4][M];
    for (int r = 0; r < 4; r++) vnni_output<M>(p, n + r, part[r]);
    for (int m = 0; m < M; m++) {
      const __m128 sums = _mm_hadd_ps(_mm_hadd_ps(part[0][m], part[1][m]), _mm_hadd_ps(part[2][m], part[3][m]));
      _mm_storeu_ps(p.out + (size_t)m * p.N + n, sums);
    }
  }
  for (; n < n1; n++) {
    __m128 part[M];
    vnni_output<M>(p, n, part);
    for (int m = 0; m < M; m++) {
      const __m128 pair = _mm_add_ps(part[m], _mm_movehl_ps(part[m], part[m]));
      p.out[(size_t)m * p.N + n] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
    }
  }
}

// Packed weights (see "Layout" below): one 512-bit load holds 4 inputs of 16 outputs, and one
// vpdpbusd per row adds them to 16 outputs' block sums at once, the row's 4 inputs broadcast from
// memory. The sums start at the row's -128 * (sum of the block's inputs), the weights' offset;
// per block and row one conversion and one FMA remain, for 16 outputs, where the row kernel above
// spends a conversion, a scale broadcast and an FMA per output (and reduces each output across
// lanes): 3 rows of the lm_head cost about what one does, bound by reading the weights.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512dq"))) void span_vnni_panels(const Product& p, int n0,
                                                                                     int n1) {
  constexpr int U = chains(M);  // independent vpdpbusd chains per row
  const int blocks = p.K / BLOCK;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int n = n0; n < n1; n += PANEL) {
    const int8_t* w = p.w + (size_t)n * p.K;
    const float* w_scales = p.scales + (size_t)n * blocks;
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
      const int8_t* wb = w + (size_t)b * BLOCK * PANEL;  // read in order: no software prefetch (it was slower)
      __m512i dot[M][U];
      for (int m = 0; m < M; m++) {
        dot[m][0] = _mm512_set1_epi32(p.x_offsets[(size_t)m * blocks + b]);
        for (int u = 1; u < U; u++) dot[m][u] = _mm512_setzero_si512();
      }
      for (int g = 0; g < BLOCK / 4; g++) {
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void*)(wb + g * 4 * PANEL)), flip);
        for (int m = 0; m < M; m++) {
          int32_t inputs;
          std::memcpy(&inputs, p.x_values + (size_t)m * p.K + b * BLOCK + g * 4, 4);
          dot[m][g % U] = _mm512_dpbusd_epi32(dot[m][g % U], wv, _mm512_set1_epi32(inputs));
        }
      }
      const __m512 scales = _mm512_loadu_ps(w_scales + (size_t)b * PANEL);
      for (int m = 0; m < M; m++) {
        __m512i sum = dot[m][0];
        for (int u = 1; u < U; u++) sum = _mm512_add_epi32(sum, dot[m][u]);
        const __m512 scale = _mm512_mul_ps(scales, _mm512_set1_ps(p.x_scales[(size_t)m * blocks + b]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[m]);
      }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(p.out + (size_t)m * p.N + n, acc[m]);
  }
}
#endif

// One block of BLOCK inputs: int8 values, their scale (largest magnitude -> 127) and 128 * scale *
// sum of the values. Runs M x K / BLOCK times per product on one thread, before the product starts;
// only the VNNI path quantizes its inputs, so it is written for AVX-512 (the compiler leaves the
// plain loop's max and rounding scalar).
#ifdef NODE_X86
__attribute__((target("avx512f,avx512bw"))) void quantize_block(const float* x, int8_t* q, float* scale, int32_t* offset) {
  __m512 v[BLOCK / 16];
  __m512 largest = _mm512_setzero_ps();
  for (int i = 0; i < BLOCK / 16; i++) {
    v[i] = _mm512_loadu_ps(x + 16 * i);
    largest = _mm512_max_ps(largest, _mm512_abs_ps(v[i]));
  }
  const float top = _mm512_reduce_max_ps(largest);
  const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  __m512i total = _mm512_setzero_si512();
  for (int i = 0; i < BLOCK / 16; i++) {
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse));  // round to nearest even
    total = _mm512_add_epi32(total, r);
    _mm_storeu_si128((__m128i*)(q + 16 * i), _mm512_cvtsepi32_epi8(r));
  }
  *scale = top / 127.0f;
  *offset = -128 * _mm512_reduce_add_epi32(total);
}
#else
void quantize_block(const float* x, int8_t* q, float* scale, int32_t* offset) {
  float largest = 0.0f;
  for (int k = 0; k < BLOCK; k++) largest = std::max(largest, std::fabs(x[k]));
  const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
  int total = 0;
  for (int k = 0; k < BLOCK; k++) total += q[k] = (int8_t)std::nearbyint(x[k] * inverse);
  *scale = largest / 127.0f;
  *offset = -128 * total;
}
#endif

// Rows of x as the VNNI paths read them: per block of BLOCK inputs, the largest magnitude maps to
// 127; the int8 values, the block scales, and -128 * (sum of the block's values): what the
// weights' offset of 128 adds to the block's dot, taken off by both VNNI kernels.
struct QuantizedRows {
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int32_t> offsets;

  void fill(Product& p) {
    const size_t blocks = (size_t)p.M * (p.K / BLOCK);
    values.resize((size_t)p.M * p.K);
    scales.resize(blocks);
    offsets.resize(blocks);
    for (size_t xb = 0; xb < blocks; xb++)  // rows are contiguous, so blocks are too
      quantize_block(p.x + xb * BLOCK, values.data() + xb * BLOCK, &scales[xb], &offsets[xb]);
    p.x_values = values.data();
    p.x_scales = scales.data();
    p.x_offsets = offsets.data();
  }
};

using SpanFn = void (*)(const Product&, int, int);

#define NODE_SPAN_TABLE(fn) \
  {nullptr, fn<1>, fn<2>, fn<3>, fn<4>, fn<5>, fn<6>, fn<7>, fn<8>}

const SpanFn PORTABLE[] = NODE_SPAN_TABLE(span_portable);
#ifdef NODE_X86
const SpanFn AVX2[] = NODE_SPAN_TABLE(span_avx2);
const SpanFn AVX512[] = NODE_SPAN_TABLE(span_avx512);
const SpanFn VNNI[] = NODE_SPAN_TABLE(span_vnni);
const SpanFn VNNI_PANELS[] = NODE_SPAN_TABLE(span_vnni_panels);
#endif

struct Isa {
  const char* name;
  const SpanFn* spans;        // weights as rows
  const SpanFn* panel_spans;  // packed weights; nullptr: unpacked a panel at a time for `spans`
  bool (*supported)();
  bool quantized_inputs;  // the spans read Product's x_* fields (QuantizedRows)
};

bool always() { return true; }
#ifdef NODE_X86
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_vnni() {
  return has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
#endif

const Isa ISAS[] = {
#ifdef NODE_X86
    {"avx512vnni", VNNI, VNNI_PANELS, has_vnni, true},
    {"avx512f", AVX512, nullptr, has_avx512, false},
    {"avx2", AVX2, nullptr, has_avx2, false},
#endif
    {"portable", PORTABLE, nullptr, always, false},
};

const Isa* best_isa() {
  for (const Isa& isa : ISAS)
    if (isa.supported()) return &isa;
  return &ISAS[sizeof(ISAS) / sizeof(ISAS[0]) - 1];
}

std::atomic<const Isa*> current_isa{best_isa()};

// ---------------------------------------------------------------------------------------------
// Layout. Where the best path for this CPU has a panel kernel, a matrix of whole panels is packed:
// its outputs in panels of PANEL, each panel's weights by groups of 4 inputs,
// [N / PANEL][K / 4][PANEL][4], and its scales [N / PANEL][K / BLOCK][PANEL]. Otherwise (and for
// other shapes) row-major, [N][K] and [N][K / BLOCK]. The choice depends on the machine and N
// only, so that quantize() and every product agree; the array shapes stay (N, K), (N, K / BLOCK).
const bool PACKING = best_isa()->panel_spans != nullptr;

bool packed(int N) { return PACKING && N % PANEL == 0; }

size_t weight_at(int N, int K, int n, int k) {
  if (!packed(N)) return (size_t)n * K + k;
  return ((size_t)(n / PANEL) * K + k / 4 * 4) * PANEL + (n % PANEL) * 4 + k % 4;
}

size_t scale_at(int N, int K, int n, int b) {
  if (!packed(N)) return (size_t)n * (K / BLOCK) + b;
  return ((size_t)(n / PANEL) * (K / BLOCK) + b) * PANEL + n % PANEL;
}

// Columns [n0, n1) (whole panels) of packed weights through a kernel for rows: each panel copied
// out as PANEL rows first (paths other than the best one, run by tests, on packed weights).
void span_unpacked(SpanFn span, const Product& p, int n0, int n1) {
  const int blocks = p.K / BLOCK;
  thread_local std::vector<int8_t> w;
  thread_local std::vector<float> scales;
  w.resize((size_t)PANEL * p.K);
  scales.resize((size_t)PANEL * blocks);
  for (int n = n0; n < n1; n += PANEL) {
    for (int r = 0; r < PANEL; r++) {
      for (int k = 0; k < p.K; k++) w[(size_t)r * p.K + k] = p.w[weight_at(p.N, p.K, n + r, k)];
      for (int b = 0; b < blocks; b++) scales[(size_t)r * blocks + b] = p.scales[scale_at(p.N, p.K, n + r, b)];
    }
    Product panel = p;  // rows 0..PANEL of the copies, written to outputs n..n + PANEL (N stays the stride)
    panel.w = w.data();
    panel.scales = scales.data();
    panel.out = p.out + n;
    span(panel, 0, PANEL);
  }
}

// Threads for a product of `rows` rows by a weight matrix: one below MIN_PARALLEL_WEIGHTS per row
// (a decode step's k and v projections: waking a second thread costs more than it saves), but the
// arithmetic grows with the rows (a batch of agents) while the weights read stay the same.
int parts_for(long weights, int rows) { return weights * rows < MIN_PARALLEL_WEIGHTS ? 1 : pool().threads(); }

// Rows [m0, m0 + count) of a product (and of its quantized inputs, where it has them).
Product rows_of(const Product& p, int m0, int count) {
  const size_t blocks = (size_t)(p.K / BLOCK);
  Product rows = p;
  rows.M = count;
  rows.x = p.x + (size_t)m0 * p.K;
  rows.out = p.out + (size_t)m0 * p.N;
  if (p.x_values != nullptr) {
    rows.x_values = p.x_values + (size_t)m0 * p.K;
    rows.x_scales = p.x_scales + m0 * blocks;
    rows.x_offsets = p.x_offsets + m0 * blocks;
  }
  return rows;
}

void direct(const Product& p) {
  const Isa* isa = current_isa.load();
  const bool panels = packed(p.N);
  const bool unpack = panels && isa->panel_spans == nullptr;
  // Threads take whole panels, or whole 8-column groups (off each other's output cache lines).
  const int group = panels ? PANEL : 8;
  QuantizedRows quantized;
  for (int m0 = 0; m0 < p.M; m0 += MAX_KERNEL_ROWS) {
    Product rows = rows_of(p, m0, std::min(MAX_KERNEL_ROWS, p.M - m0));
    if (isa->quantized_inputs) quantized.fill(rows);
    SpanFn span = panels && !unpack ? isa->panel_spans[rows.M] : isa->spans[rows.M];
    pool().run(
        parts_for((long)p.N * p.K, rows.M),
        [&](int part, int parts) {
          int groups = (p.N + group - 1) / group;
          int n0 = std::min(p.N, (int)((long)groups * part / parts) * group);
          int n1 = std::min(p.N, (int)((long)groups * (part + 1) / parts) * group);
          if (unpack)
            span_unpacked(span, rows, n0, n1);
          else
            span(rows, n0, n1);
        },
        p.decode_step ? node_native::Next::kernel : node_native::Next::blas);
  }
}

// Rows [n0, n1) of the tile of p's weights that starts at p.w, p.scales (a whole panel when packed).
void dequantize_rows(const Product& p, float* dst, int n0, int n1) {
  const int blocks = p.K / BLOCK;
  for (int n = n0; n < n1; n++)
    for (int b = 0; b < blocks; b++) {
      const float s = p.scales[scale_at(p.N, p.K, n, b)];
      float* d = dst + (size_t)n * p.K + b * BLOCK;
      if (!packed(p.N)) {
        const int8_t* q = p.w + (size_t)n * p.K + b * BLOCK;
        for (int k = 0; k < BLOCK; k++) d[k] = (float)q[k] * s;
      } else {
        const int8_t* q = p.w + weight_at(p.N, p.K, n, b * BLOCK);
        for (int g = 0; g < BLOCK / 4; g++)
          for (int k = 0; k < 4; k++) d[g * 4 + k] = (float)q[g * 4 * PANEL + k] * s;
      }
    }
}

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);

sgemm_fn find_sgemm() {
  // node's shim (loaded globally before libmlx) or whatever cblas_sgemm libmlx bound.
  return (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
}

// A prefill chunk multiplies hundreds of rows by every matrix: dequantizing W once per call costs
// little beside the product. W goes in tiles of at most TILE_FLOATS (a Gemma layer's matrices fit
// one; an lm_head does not), through one buffer per thread that is never zeroed.
constexpr size_t TILE_FLOATS = 1 << 22;

float* scratch(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t capacity = 0;
  if (floats > capacity) {
    buffer.reset(new float[floats]);
    capacity = floats;
  }
  return buffer.get();
}

// The cblas_sgemm found at the first prefill (none: many-row products go through `direct`).
sgemm_fn bound_sgemm() {
  static const sgemm_fn sgemm = find_sgemm();
  return sgemm;
}

void through_sgemm(const Product& p) {
  const sgemm_fn sgemm = bound_sgemm();
  const size_t whole = packed(p.N) ? PANEL : 1;  // tiles start on panels
  const int tile_rows = (int)std::max<size_t>(whole, std::min<size_t>(p.N, TILE_FLOATS / p.K) / whole * whole);
  float* weights = scratch((size_t)tile_rows * p.K);
  enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
  for (int n0 = 0; n0 < p.N; n0 += tile_rows) {
    const int rows = std::min(tile_rows, p.N - n0);
    Product tile = p;
    tile.w = p.w + (size_t)n0 * p.K;
    tile.scales = p.scales + (size_t)n0 * (p.K / BLOCK);
    pool().run(
        parts_for((long)rows * p.K, 1),
        [&](int part, int parts) {
          dequantize_rows(tile, weights, (int)((long)rows * part / parts), (int)((long)rows * (part + 1) / parts));
        },
        node_native::Next::blas);  // sgemm's threads come next
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, p.M, rows, p.K, 1.0f, p.x, p.K, weights, p.K, 0.0f, p.out + n0, p.N);
  }
}

// Many rows (a prefill chunk) on packed weights with the VNNI panel kernel, blocked for the
// caches: every row quantized once; each thread takes whole panels, and for each ROW_BLOCK rows
// walks its panels, each panel's weights (16 x K bytes) staying in L1 over the block's groups of
// MAX_KERNEL_ROWS rows and the thread's panels in L2 over the row blocks.
constexpr int ROW_BLOCK = 64;

void blocked(const Product& p) {
  const Isa* isa = current_isa.load();
  Product all = p;
  QuantizedRows quantized;
  quantized.fill(all);
  const int panels = p.N / PANEL;
  pool().run(
      pool().threads(),
      [&](int part, int parts) {
        const int n0 = (int)((long)panels * part / parts) * PANEL, n1 = (int)((long)panels * (part + 1) / parts) * PANEL;
        for (int r0 = 0; r0 < p.M; r0 += ROW_BLOCK)
          for (int n = n0; n < n1; n += PANEL)
            for (int m0 = r0; m0 < std::min(p.M, r0 + ROW_BLOCK); m0 += MAX_KERNEL_ROWS) {
              const int count = std::min(MAX_KERNEL_ROWS, p.M - m0);
              isa->panel_spans[count](rows_of(all, m0, count), n, n + PANEL);
            }
      },
      node_native::Next::blas);
}

enum class Path { direct, blocked, sgemm };

// Which path a product of M rows by N outputs takes on the current ISA.
Path path_for(int M, int N) {
  if (M <= MAX_DIRECT_ROWS) return Path::direct;
  if (packed(N) && current_isa.load()->panel_spans != nullptr) return Path::blocked;
  return bound_sgemm() != nullptr ? Path::sgemm : Path::direct;
}

// Whether such a product quantizes its inputs per block (the VNNI paths, not sgemm's fp32).
bool quantizes_inputs(int M, int N) {
  return current_isa.load()->quantized_inputs && path_for(M, N) != Path::sgemm;
}

void product(const Product& p) {
  switch (path_for(p.M, p.N)) {
    case Path::direct: return direct(p);
    case Path::blocked: return blocked(p);
    case Path::sgemm: return through_sgemm(p);
  }
}

}  // namespace

void node_native::int8_product(const Product& p) { product(p); }

#ifndef NODE_INT8_KERNELS_ONLY
// ---------------------------------------------------------------------------------------------
// The MLX primitive and op.

namespace {

class Int8MatMul : public node_native::CpuPrimitive {
 public:
  explicit Int8MatMul(mx::Stream stream) : node_native::CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs,
                          [](node_native::Arrays& in, node_native::Arrays& out) {
      const mx::array &x = in[0], &w = in[1], &s = in[2];
      std::vector<float> copy;
      const int K = (int)w.shape(1);
      Product p{node_native::row_major_floats(x, copy), w.data<int8_t>(), s.data<float>(), out[0].data<float>(),
                (int)(x.size() / K), (int)w.shape(0), K};
      p.decode_step = x.ndim() < 2 || x.shape(-2) == 1;  // (..., positions, K): one position per sequence
      product(p);
    });
  }

  const char* name() const override { return "NodeInt8MatMul"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
};

mx::array int8_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales) {
  if (weight.ndim() != 2 || weight.dtype() != mx::int8)
    throw std::invalid_argument("int8_matmul: weight must be a 2-D int8 array");
  const int N = weight.shape(0), K = weight.shape(1);
  if (K % BLOCK != 0) throw std::invalid_argument("int8_matmul: inputs must be a multiple of BLOCK");
  if (scales.shape() != mx::Shape{N, K / BLOCK} || scales.dtype() != mx::float32)
    throw std::invalid_argument("int8_matmul: scales must be float32 of shape (N, K / BLOCK)");
  if (x.ndim() < 1 || x.shape(-1) != K) throw std::invalid_argument("int8_matmul: x's last axis must be K");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  mx::Shape out_shape = x.shape();
  out_shape.back() = N;
  // One operation per product (a decode step runs ~130 of them, and each operation costs MLX's
  // scheduler microseconds): x is read as it comes (mlx_inputs.h), W and its scales are the
  // model's evaluated parameters, contiguous already.
  auto as_stored = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  mx::array rows = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream);
  return mx::array(out_shape, mx::float32, std::make_shared<Int8MatMul>(stream),
                   {rows, as_stored(weight), as_stored(scales)});
}

// Rows `ids` of an int8 matrix as float32 (an embedding lookup), whichever layout it is stored in:
// one operation where indexing packed panels from Python took eight (~75 us per decode step).
class Int8Rows : public node_native::CpuPrimitive {
 public:
  explicit Int8Rows(mx::Stream stream) : node_native::CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    node_native::dispatch(stream(), inputs, outputs, [](node_native::Arrays& in, node_native::Arrays& out) {
      const mx::array &w = in[0], &s = in[1], &ids = in[2];
      const int N = (int)w.shape(0), K = (int)w.shape(1);
      const int8_t* q = w.data<int8_t>();
      const float* scales = s.data<float>();
      const int32_t* rows = ids.data<int32_t>();
      float* dst = out[0].data<float>();
      for (size_t i = 0; i < ids.size(); i++, dst += K) {
        const int n = rows[i] < 0 ? rows[i] + N : rows[i];  // negative ids count from the end, as in numpy
        if (n < 0 || n >= N) {
          std::fill(dst, dst + K, 0.0f);
          continue;
        }
        for (int k = 0; k < K; k++) dst[k] = (float)q[weight_at(N, K, n, k)] * scales[scale_at(N, K, n, k / BLOCK)];
      }
    });
  }

  const char* name() const override { return "NodeInt8Rows"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[2].shape();
    shape.push_back(inputs[0].shape(1));
    return {shape};
  }
};

mx::array int8_rows(const mx::array& weight, const mx::array& scales, const mx::array& ids) {
  if (weight.ndim() != 2 || weight.dtype() != mx::int8 || weight.shape(1) % BLOCK != 0)
    throw std::invalid_argument("int8_rows: weight must be a 2-D int8 array of whole blocks");
  if (scales.shape() != mx::Shape{weight.shape(0), weight.shape(1) / BLOCK} || scales.dtype() != mx::float32)
    throw std::invalid_argument("int8_rows: scales must be float32 of shape (N, K / BLOCK)");
  if (!mx::issubdtype(ids.dtype(), mx::integer)) throw std::invalid_argument("int8_rows: ids must be integers");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  auto contiguous = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  mx::array rows = contiguous(ids.dtype() == mx::int32 ? ids : mx::astype(ids, mx::int32, stream));
  mx::Shape shape = ids.shape();
  shape.push_back(weight.shape(1));
  return mx::array(shape, mx::float32, std::make_shared<Int8Rows>(stream),
                   {contiguous(weight), contiguous(scales), rows});
}

// Weights are read in order at every decode step; on 4 KB pages the hardware prefetchers stop at
// every page boundary (and each page costs a TLB miss), on 2 MB pages they stream on: the lm_head
// took 5.0 ms for one row on 4 KB pages, 2.9 ms on 2 MB ones. Linux's default (transparent huge
// pages on request) gives them to ranges advised so, before they are first written.
void ask_for_huge_pages(void* data, size_t bytes) {
  const uintptr_t page = 4096, start = ((uintptr_t)data + page - 1) & ~(page - 1);
  const uintptr_t end = ((uintptr_t)data + bytes) & ~(page - 1);
  if (end > start) madvise((void*)start, end - start, MADV_HUGEPAGE);  // a hint: failure changes nothing
}

// Quantize a float32 (N, K) matrix now (not lazily): each block's largest magnitude maps to 127;
// packed in panels where this machine's kernel reads them so (see "Layout").
std::tuple<mx::array, mx::array> quantize(mx::array weight) {
  if (weight.ndim() != 2 || weight.shape(1) % BLOCK != 0)
    throw std::invalid_argument("quantize: weight must be 2-D with a multiple of BLOCK columns");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  weight = mx::contiguous(mx::astype(weight, mx::float32, stream), false, stream);
  weight.eval();
  const int N = weight.shape(0), K = weight.shape(1), blocks = K / BLOCK;
  mx::array q(mx::allocator::malloc((size_t)N * K), {N, K}, mx::int8);
  mx::array scales(mx::allocator::malloc((size_t)N * blocks * sizeof(float)), {N, blocks}, mx::float32);
  const float* w = weight.data<float>();
  int8_t* qd = q.data<int8_t>();
  float* sd = scales.data<float>();
  ask_for_huge_pages(qd, (size_t)N * K);
  nb::gil_scoped_release released;
  pool().run(pool().threads(), [&](int part, int parts) {
    for (size_t b = (size_t)N * blocks * part / parts; b < (size_t)N * blocks * (part + 1) / parts; b++) {
      const float* src = w + b * BLOCK;
      float largest = 0.0f;
      for (int k = 0; k < BLOCK; k++) largest = std::max(largest, std::fabs(src[k]));
      const float scale = largest / 127.0f, inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
      const int n = (int)(b / blocks), first = (int)(b % blocks) * BLOCK;
      sd[scale_at(N, K, n, first / BLOCK)] = scale;
      for (int k = 0; k < BLOCK; k++) qd[weight_at(N, K, n, first + k)] = (int8_t)std::nearbyint(src[k] * inverse);
    }
  });
  return {q, scales};
}

std::string isa() { return current_isa.load()->name; }

// For tests and benchmarks: run on a named path (if this CPU has it); returns the path in use.
std::string use_isa(const std::string& name) {
  for (const Isa& candidate : ISAS)
    if (name == candidate.name) {
      if (!candidate.supported()) throw std::invalid_argument("this CPU cannot run the " + name + " path");
      current_isa.store(&candidate);
    }
  return isa();
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& candidate : ISAS)
    if (candidate.supported()) names.push_back(candidate.name);
  return names;
}

}  // namespace

// Registered into node's extension module by cpu_ops.cpp.
void register_int8_matmul(nb::module_& m) {
  m.attr("BLOCK") = BLOCK;
  m.attr("MAX_DIRECT_ROWS") = MAX_DIRECT_ROWS;
  m.def("quantizes_inputs", &quantizes_inputs, "rows"_a, "outputs"_a,
        "Whether a product of this shape on the current path quantizes its inputs per block");
  m.def("int8_matmul", &int8_matmul, "x"_a, "weight"_a, "scales"_a,
        "x @ (weight * scales per block)^T; x (..., K) float32, weight (N, K) int8, scales (N, K / BLOCK)");
  m.def("quantize", &quantize, "weight"_a,
        "(int8 (N, K), float32 scales (N, K / BLOCK)) of a float32 (N, K) matrix, computed now");
  m.def("int8_rows", &int8_rows, "weight"_a, "scales"_a, "ids"_a,
        "Rows ids of (weight * scales per block) as float32, shape ids.shape + (K,): an int8 embedding lookup");
  m.def("packed", &packed, "rows"_a,
        "Whether quantize() packs a matrix of this many rows (outputs) in panels on this machine");
  m.attr("PANEL") = PANEL;
  m.def("isa", &isa, "The int8 kernel path in use (avx512vnni, avx512f, avx2, portable).");
  m.def("use_isa", &use_isa, "name"_a);
  m.def("supported_isas", [] {
    nb::list names;
    for (auto& name : supported_isas()) names.append(name);
    return names;
  });
}
#endif  // NODE_INT8_KERNELS_ONLY
