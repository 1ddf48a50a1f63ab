// Constants, index helpers and kernel arguments shared by the linear-attention kernels (linear_attn.cu) and the
// tensor-core forward chunk pass (linear_attn_mma.cuh). CUDA qualifiers only, no CUDA headers: the host-side
// emulation test (tests/cuda_emu/) compiles the tensor-core pass with g++ against these very definitions.
#pragma once

#include <cstdint>

#include "feature_tiles.h"
#include "linear_attn.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;       // one 16 x 16 thread grid per block
constexpr int kC = 64;              // tokens per chunk
constexpr int kBV = 64;             // value columns per block
constexpr int kLdC = kC + 1;        // row pitches padded by one float: walking a column (stride = pitch) hits
constexpr int kLdV = kBV + 1;       // 16 distinct banks
constexpr int kMaxDv = 256;
constexpr int kMaxD = kMaxFeatureTile;
constexpr int kScanThreads = 256;

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --------------------------------------------------------------------------------------- kernel arguments
// Workspace state slots: [B*H][NS + 1][slot] fp32 with slot = D*Dv + D: S row-major [D][Dv] then z [D].
struct SegArgs {                 // la_seg_sum: slot(bh, seg) = sum_{t in seg} x_t^T (y_t / den_t), sum w_t x_t
  int64_t H, T, D, Dv, ygroup;   // y head = h / ygroup
  int NS, cps, nvt;
  bool with_z;
  LaView x, y, key_mask, den;    // key_mask zeroes x and y rows; den (optional) divides y rows
  const float* wz;               // [BH][T] weight of the z column (nullptr: 1)
  float* ws;
  int64_t slot;
};

struct ScanArgs {                // la_scan: prefix over the NS segment slots, in place
  int64_t H, D, Dv;
  int NS;
  bool with_z, reverse;
  float* ws;
  int64_t slot;
  LaView init_S, init_z;         // added before the first segment (optional)
  LaView out_S, out_z;           // receive slot NS, the total (optional)
};

struct ChunkArgs {               // la_fwd_chunk, la_bwd_dq, la_bwd_dkdv
  int64_t H, G, Hv, T, D, Dv;    // G = H / Hv
  int NS, cps, nvt, Dp;          // Dp = D rounded up to the D sub-tile: rows of the state in shared memory
  bool causal, normalize;
  float eps;
  LaView q, k, v, key_mask;
  LaView dout, den;              // fwd: den is an output; bwd: do and the saved den
  LaView out;                    // fwd: o; dq kernel: dq; dkdv kernel: dk
  LaView out2;                   // dkdv kernel: dv
  const float* ws;               // state slots (forward prefix for fwd/dq, reverse prefix for dkdv)
  int64_t slot;
  float* cbuf;                   // [BH][T] fp32 c_t (bwd, normalize)
  float* acc;                    // [BH][T][D] fp32 accumulator of dq / dk (nullptr: write out directly)
  float* acc2;                   // [B*Hv][T][Dv] fp32 accumulator of dv (nullptr: write out2 directly)
};

struct StepArgs {
  int64_t H, G, D, Dv;
  bool normalize;
  float eps;
  LaView q, k, v, S, z, o;
};

}  // namespace
}  // namespace cuda
}  // namespace fastattn
