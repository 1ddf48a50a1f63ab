// Operator schemas of the fastattn extension. Kernels register per dispatch key elsewhere:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cpp (CUDA). The math and argument conventions are in
// fastattn/ops/linear_attn/README.md; zero-element tensors stand for "None" outputs.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "linear_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, Tensor? key_mask, bool causal, "
      "bool normalize, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_attn_bwd(Tensor do, Tensor? dS, Tensor? dz, Tensor q, Tensor k, Tensor v, Tensor? den, Tensor? S0, "
      "Tensor? z0, Tensor? key_mask, bool causal, bool normalize, float eps) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "linear_attn_step(Tensor q, Tensor k, Tensor v, Tensor(a!) S, Tensor(b!)? z, bool normalize, float eps) "
      "-> Tensor");
}

// `import fastattn._C` loads this library (and with it the registrations above); it exposes no Python symbols.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { (void)m; }
