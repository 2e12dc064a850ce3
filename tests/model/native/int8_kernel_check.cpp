// The int8 kernels without MLX: every path this CPU supports against a float64 reference.
// Built and run by tests/model/test_int8_weights.py; also runnable by hand on another machine
// (an AVX-512 one) with: g++ -O2 -std=gnu++20 -pthread int8_kernel_check.cpp && ./a.out
#define NODE_INT8_KERNELS_ONLY
#include "../../../node/model/native/int8_matmul.cpp"

#include <cmath>
#include <cstdio>
#include <random>

int main() {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  const int rows[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 40};
  // Rows of whole panels are packed where this machine's best path packs them (see "Layout").
  const int shapes[][2] = {{13, 64}, {200, 320}, {1030, 640}, {2053, 640}, {48, 128}, {1024, 640}};
  int checked = 0, failures = 0;
  for (const Isa& isa : ISAS) {
    if (!isa.supported()) continue;
    current_isa.store(&isa);
    for (auto& shape : shapes)
      for (int M : rows) {
        const int N = shape[0], K = shape[1], blocks = K / BLOCK;
        std::vector<int8_t> q((size_t)N * K), stored(q.size());  // q row-major, stored as the kernels read it
        std::vector<float> scales((size_t)N * blocks), stored_scales(scales.size()), x((size_t)M * K), out((size_t)M * N);
        for (auto& v : q) v = (int8_t)(rng() % 255 - 127);
        for (auto& v : scales) v = std::fabs(normal(rng)) / 127.0f;
        for (auto& v : x) v = normal(rng);
        for (int n = 0; n < N; n++) {
          for (int k = 0; k < K; k++) stored[weight_at(N, K, n, k)] = q[(size_t)n * K + k];
          for (int b = 0; b < blocks; b++) stored_scales[scale_at(N, K, n, b)] = scales[(size_t)n * blocks + b];
        }
        product(Product{x.data(), stored.data(), stored_scales.data(), out.data(), M, N, K});
        // Paths that quantize the inputs per block are checked against products of the inputs
        // they see (QuantizedRows), the others against the inputs themselves.
        std::vector<float> seen(x);
        if (quantizes_inputs(M, N)) {
          Product p{x.data(), stored.data(), stored_scales.data(), out.data(), M, N, K};
          QuantizedRows rows;
          rows.fill(p);
          for (size_t i = 0; i < seen.size(); i++)
            seen[i] = p.x_values[i] * p.x_scales[i / BLOCK];
        }
        double worst = 0.0;
        for (int m = 0; m < M; m++)
          for (int n = 0; n < N; n++) {
            double expected = 0.0;
            for (int k = 0; k < K; k++)
              expected += (double)seen[(size_t)m * K + k] * q[(size_t)n * K + k] * scales[(size_t)n * blocks + k / BLOCK];
            worst = std::max(worst, std::fabs(expected - out[(size_t)m * N + n]) / (1.0 + std::fabs(expected)));
          }
        checked++;
        if (worst > 1e-4) {
          failures++;
          std::printf("FAIL %s M=%d N=%d K=%d relative error %g\n", isa.name, M, N, K, worst);
        }
      }
    std::printf("path %s checked (%s)\n", isa.name, PACKING ? "packed weights where N is whole panels" : "row-major weights");
  }
  std::printf("%d products checked, %d failed\n", checked, failures);
  return failures ? 1 : 0;
}
