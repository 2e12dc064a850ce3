// Kernels of node's CPU extension that more than one primitive uses (attention_inputs.cpp fuses
// the int8 product, the RMS norm and RoPE of a decode step's attention inputs).
#pragma once

#include <cstdint>

namespace node_native {

// sum of a[d] * b[d] over D floats, in 16 independent lanes (vectorized in each caller's ISA clone)
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

struct Product {
  const float* x;       // M x K, row-major
  const int8_t* w;      // N x K, in panels where int8_matmul.cpp packs them (see there)
  const float* scales;  // N x K / BLOCK, likewise
  float* out;           // M x N
  int M, N, K;
  // The rows of x quantized per block (int8_matmul.cpp fills them for its VNNI paths): values,
  // scales, and -128 * the sum of each block's values.
  const int8_t* x_values = nullptr;    // M x K
  const float* x_scales = nullptr;     // M x K / BLOCK
  const int32_t* x_offsets = nullptr;  // M x K / BLOCK
  // Part of a decode step (one position per sequence): node's kernels follow within microseconds,
  // so the pool's workers keep spinning. False in a prefill, where BLAS's threads (attention) come
  // next and a spinning worker would take their core.
  bool decode_step = true;
};

// out = x @ (w * scales)^T (int8_matmul.cpp)
void int8_product(const Product& p);

// Rows [r0, r1) of x (D floats each) / sqrt(mean(x^2) + eps) * (offset + w) into out (norm_rope.cpp);
// out may be x.
void normalize_rows(const float* x, const float* w, float* out, long r0, long r1, int D, float eps, float offset);

// The non-traditional RoPE of rows [r0, r1) of x (B, H, L, D) at positions offsets[b] + l into out
// (norm_rope.cpp); out may be x. offsets holds one position for all b unless per_batch.
void rotate_rows(const float* x, const int32_t* offsets, bool per_batch, float* out, long r0, long r1, int H,
                 int L, int D, int dims, double base, double scale);

}  // namespace node_native
