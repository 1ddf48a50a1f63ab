// Plain launcher of the fused GLM subspace-Hessian CUDA kernel (csrc/cuda/subspace_hvp.cu).
//
// No torch types here: the torch glue (csrc/cuda/subspace_hvp_glue.cpp) checks arguments, allocates the zeroed
// partial slots, fills these params and reduces the slots. Math: fastattn/ops/subspace_hvp/reference.py; the
// sketch hash: fastattn/ops/subspace_hvp/sketch.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastattn {
namespace cuda {

constexpr int64_t kHvpMaxS = 512;   // the B tile [kHvpRows, s] lives in shared memory
constexpr int kHvpRows = 32;        // rows of A (or coordinates of x, for the regulariser) per block step

struct HvpGlmParams {
  int64_t m = 0, n = 0, s = 0;
  const float* A = nullptr;          // [m, n], element strides sAm, sAn
  int64_t sAm = 0, sAn = 0;
  const float* x = nullptr;          // [n] contiguous
  const float* y = nullptr;          // [m] contiguous
  const float* P = nullptr;          // [s, n], strides sPs, sPn; nullptr: generated from key (sketch 1 or 2)
  int64_t sPs = 0, sPn = 0;
  int sketch = 0;                    // 0 read P, 1 gaussian, 2 rademacher
  uint32_t key = 0;                  // sketch.seed_key(seed)
  float scale = 1.f;                 // entry scale of generated P
  int loss = 0, reg = 0;             // codes of glm.LOSSES / glm.REGULARISERS
  float lam = 0.f, loss_scale = 1.f;
  bool reg_active = false;           // adds the n / kHvpRows regulariser steps
  float* GP = nullptr;               // [G, s, s] partial slots, zero on entry
  float* PG = nullptr;               // [G, s]
  int G = 1;                         // blocks of the grid (one slot each)
};

// Bytes of dynamic shared memory the kernel needs for s.
size_t subspace_hvp_glm_smem_bytes(int64_t s);

cudaError_t subspace_hvp_glm_launch(const HvpGlmParams& p, cudaStream_t stream);

// out [s, n] fp32 (row stride row_stride, unit column stride) = scale * the seeded sketch of kind 1 or 2.
cudaError_t sketch_fill_launch(float* out, int64_t s, int64_t n, int64_t row_stride, int kind, int64_t seed,
                               double scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
