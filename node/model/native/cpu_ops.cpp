// node's MLX CPU extension: primitives MLX's CPU backend lacks a fast path for, sharing one thread
// pool (pool.h). node.model.cpu_extension compiles int8_matmul.cpp, decode_attention.cpp,
// norm_rope.cpp, attention_inputs.cpp, decode_blocks.cpp, argmax.cpp and this file with nanobind once per source version and loads the module.

#include <nanobind/nanobind.h>

#include "pool.h"

namespace nb = nanobind;
using namespace nb::literals;

void register_int8_matmul(nb::module_& m);
void register_decode_attention(nb::module_& m);
void register_norm_rope(nb::module_& m);
void register_attention_inputs(nb::module_& m);
void register_decode_blocks(nb::module_& m);
void register_argmax(nb::module_& m);

NB_MODULE(_node_cpu_ops, m) {
  nb::module_::import_("mlx.core");
  m.doc() = "node's CPU primitives for MLX: int8 x @ W^T, one-query attention, RMS norm, RoPE, fused Gemma decode blocks, argmax";
  register_int8_matmul(m);
  register_decode_attention(m);
  register_norm_rope(m);
  register_attention_inputs(m);
  register_decode_blocks(m);
  register_argmax(m);
  m.def("set_threads", [](int threads) { node_native::pool().set_threads(threads); }, "threads"_a,
        "The most threads one primitive uses (0: one per online CPU).");
  m.def("threads", [] { return node_native::pool().threads(); });
}
