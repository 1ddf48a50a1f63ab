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
  // Fused GLM subspace Hessian (fastattn/ops/subspace_hvp): (P g [s], P H P^T [s, s]); P absent: generated from
  // seed with sketch code 1 (gaussian) or 2 (rademacher); loss / reg are the codes of glm.LOSSES / REGULARISERS.
  m.def(
      "subspace_hvp_glm_fused(Tensor A, Tensor x, Tensor y, Tensor? P, int s, int sketch, int seed, float scale, "
      "int loss, int reg, float lam, float loss_scale) -> (Tensor, Tensor)");
  // Fills out [s, n] with the seeded sketch of kind 1 (gaussian) or 2 (rademacher) times scale (the hash of
  // fastattn/ops/subspace_hvp/sketch.py; values computed in fp64, then stored in out's dtype).
  m.def("sketch_fill_(Tensor(a!) out, int kind, int seed, float scale) -> Tensor(a!)");
  // seq_logps over the response tokens (mask True): (logps [B], lse [B, T]); the backward gives (dhidden, dweight)
  m.def(
      "lm_head_logps_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor mask, int token_chunk, "
      "int vocab_chunk) -> (Tensor, Tensor)");
  m.def(
      "lm_head_logps_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor labels, Tensor mask, Tensor lse, "
      "int token_chunk, int vocab_chunk) -> (Tensor, Tensor)");
}

// `import fastattn._C` loads this library (and with it the registrations above); it exposes no Python symbols.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { (void)m; }
