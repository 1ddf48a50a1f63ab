// Plain launchers of the linear-attention CUDA kernels (csrc/cuda/linear_attn.cu).
//
// No torch types here: the torch glue (csrc/cuda/linear_attn_glue.cpp) checks arguments, allocates outputs and
// the workspace, fills these structs from tensors and passes the current stream. Math and argument meaning follow
// fastattn/ops/linear_attn/README.md ("bhtd" logical layout, any element strides, fp32 state).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace cuda {

enum class LaDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A strided view: element (i0, i1, i2, i3) is at data[i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3]]
// (element strides, not bytes). Lower-rank tensors use the leading strides. data == nullptr: tensor absent.
// key_mask views point at torch.bool storage (one byte per element, nonzero = real token).
struct LaView {
  void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

// q, k: [B, H, T, D]; v: [B, Hv, T, Dv] (H % Hv == 0; head h reads value head h / (H / Hv)).
// Supported: 1 <= D <= kMaxFeatureTile (feature_tiles.h), 1 <= Dv <= 256, any T >= 0.
struct LaSizes {
  int64_t B = 0, H = 0, Hv = 0, T = 0, D = 0, Dv = 0;
};

struct LaFwdParams {
  LaSizes n;
  LaDtype dtype = LaDtype::kFloat32;  // of q, k, v and o
  bool causal = true;
  bool normalize = true;
  float eps = 1e-6f;
  int num_sms = 0;                    // multiprocessor count of the device (sizes the split over T)
  bool tensor_cores = false;          // bf16: the chunk pass on tensor cores (sm_80+, opt-in, see the glue)
  int max_smem_bytes = 0;             // the device's opt-in shared memory per block (bounds the tensor-core pass)
  LaView q, k, v;                     // inputs
  LaView S0, z0;                      // [B, H, D, Dv], [B, H, D] fp32, optional
  LaView key_mask;                    // [B, T] bool, optional
  LaView o;                           // [B, H, T, Dv] output, dtype
  LaView S, z, den;                   // [B, H, D, Dv], [B, H, D], [B, H, T] fp32 outputs (z, den: normalize only)
  void* workspace = nullptr;          // linear_attn_fwd_workspace_bytes(*this) bytes, any content, 256-B aligned
  size_t workspace_bytes = 0;
};

struct LaBwdParams {
  LaSizes n;
  LaDtype dtype = LaDtype::kFloat32;
  bool causal = true;
  bool normalize = true;
  float eps = 1e-6f;
  int num_sms = 0;
  bool tensor_cores = false;          // bf16: the segment sums, dq and dk / dv passes on tensor cores (opt-in)
  int max_smem_bytes = 0;             // the device's opt-in shared memory per block
  LaView dout;                        // [B, H, T, Dv] gradient of o, dtype
  LaView dS, dz;                      // [B, H, D, Dv], [B, H, D] fp32 gradients of the final state, optional
  LaView q, k, v;
  LaView den;                         // [B, H, T] fp32 saved by the forward (normalize only, required then)
  LaView S0, z0, key_mask;            // as in the forward
  LaView dq, dk, dv;                  // outputs: shapes of q, k, v, dtype
  LaView dS0, dz0;                    // [B, H, D, Dv], [B, H, D] fp32 outputs (dz0: normalize only)
  void* workspace = nullptr;          // linear_attn_bwd_workspace_bytes(*this) bytes, any content, 256-B aligned
  size_t workspace_bytes = 0;
};

// One decode token: q, k [B, H, D]; v [B, Hv, Dv]; S [B, H, D, Dv] and z [B, H, D] (fp32) updated in place;
// o [B, H, Dv]. A single kernel launch: no allocation, no host synchronisation (CUDA-graph capturable).
struct LaStepParams {
  int64_t B = 0, H = 0, Hv = 0, D = 0, Dv = 0;
  LaDtype dtype = LaDtype::kFloat32;
  bool normalize = true;
  float eps = 1e-6f;
  LaView q, k, v;
  LaView S, z;
  LaView o;
};

size_t linear_attn_fwd_workspace_bytes(const LaFwdParams& p);
size_t linear_attn_bwd_workspace_bytes(const LaBwdParams& p);

// All three enqueue work on `stream` and return the first launch error (cudaSuccess otherwise); they never
// synchronise. cudaErrorInvalidValue: unsupported sizes/dtype or a workspace smaller than required.
cudaError_t linear_attn_fwd(const LaFwdParams& p, cudaStream_t stream);
cudaError_t linear_attn_bwd(const LaBwdParams& p, cudaStream_t stream);
cudaError_t linear_attn_step(const LaStepParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
