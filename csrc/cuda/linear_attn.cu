// Linear attention on CUDA: chunked causal / non-causal forward and backward with a split over T, and the
// decode step. Math and argument meaning: fastattn/ops/linear_attn/README.md. Only CUDA headers here; the torch
// glue is csrc/cuda/linear_attn_glue.cpp.
//
// Notation per (batch b, head h): q_t, k_t in R^D, v_t in R^Dv, state S (D x Dv) and z (D), all fp32 on chip.
// T is cut into chunks of C = 64 tokens and the chunks into NS segments of `cps` consecutive chunks; a block
// owns one (b*h, segment, 64-wide value tile) and walks the chunks of its segment. The value dim Dv is split
// into nvt = ceil(Dv / 64) tiles (one block each); the feature dim D is walked inside the block in sub-tiles of
// DK = 16, 32 or 64 columns (feature_tiles.h), so no register array scales with D.
//
// Forward (3 launches):
//   1. la_seg_sum:   per segment dS_j = sum_{t in j} k_t^T v_t, dz_j = sum k_t       grid (BH, NS, D/DK * nvt)
//   2. la_scan:      exclusive prefix over segments: slot j = S0 + sum_{i<j} dS_i,
//                    slot NS = final state (written to S, z)                           grid (BH, (D*Dv+D)/256)
//   3. la_fwd_chunk: from the entering state, per chunk: A = tril(Q K^T), O = A V + Q S,
//                    den = A 1 + Q z + eps, o = O / den; then S += K^T V, z += K^T 1   grid (BH, NS, nvt)
//   Non-causal: the same launches; step 3 reads slot NS (the full sums) and skips A and the updates.
// Backward (5-8 launches), README notation (g_t = do_t / den_t, c_t = -(q_t . u_t) / den_t, u_t = S_t g_t):
//   1. seg_sum(k, v) + forward scan                 -> S entering each segment (recomputed, never stored per chunk)
//   2. la_bwd_dq:   P = tril(G V^T); u = P K + G S^T (fp32, per D sub-tile); c = -(q . u) / den;
//                   dq = (P + c 1^T on the causal triangle) K + G S^T + c z_enter^T
//   3. seg_sum(q, g, weight c) + reverse scan       -> R = dS + sum_{t>=later} q_t^T g_t, r = dz + sum c_t q_t
//                                                      entering each segment from the right; dS0, dz0 = totals
//   4. la_bwd_dkdv: walking chunks backwards: dk = P'^T Q + V R^T + r (P' = P + c on the triangle),
//                   dv = tril(Q K^T)^T G + K R; then R += Q^T G, r += Q^T c
//   5. la_cast:     fp32 accumulators -> outputs, only where a reduction across blocks was needed (dq and dk when
//                   nvt > 1: partial sums over value tiles; dv when H > Hv: sum over the query heads of a group).
//                   Those accumulate with atomicAdd into zeroed fp32 buffers; otherwise outputs are written once.
//
// Every block-level product is an fp32 FMA GEMM on shared-memory tiles, 256 threads as a 16 x 16 grid: thread
// (ty, tx) owns output rows ty + 16 i and columns tx + 16 j (a 64 x 64 output is 4 x 4 per thread). A warp then
// reads one or two rows of the left operand (broadcast) and 16 consecutive columns (or, for transposed operands,
// 16 rows of a pitch-65 array: distinct banks) of the right one, so the inner loops are free of bank conflicts.
//
// Bytes per token and head (input dtype size s, one value tile): the forward moves s (3 D + 3 Dv) + 4 (pass 1
// reads k, v; pass 3 reads q, k, v, writes o and the fp32 den) against the one-pass floor s (2 D + 2 Dv); the
// state moves once per segment, not per token. The backward moves about s (9 D + 7 Dv) + 24 (pass 1: k, v; dq:
// q, k twice, v, do, den, writes dq, c; pass 3: q, do, den, c; dkdv: q, k, v, do, den, c, writes dk, dv) against
// the floor s (4 D + 3 Dv). With nvt value tiles the q, k reads of the chunk passes repeat nvt times (L2 mostly);
// the fp32 accumulators (nvt > 1, GQA) add 8 bytes per accumulated element (atomic add, then the cast pass).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "feature_tiles.h"
#include "linear_attn.h"
#include "linear_attn_common.cuh"
#include "linear_attn_mma.cuh"

namespace fastattn {
namespace cuda {
namespace {

// (constants, index helpers and kernel arguments: linear_attn_common.cuh)

// ------------------------------------------------------------------------------------------------ dtype I/O
template <typename scalar_t>
struct Io;
template <>
struct Io<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
};
template <>
struct Io<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
};
template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

// ------------------------------------------------------------------------------------------ block helpers
// Copies a ROWS x COLS tile of a strided global matrix (row r at src + r * row_stride, column c at
// c * col_stride) into fp32 shared memory with row pitch `ld`. Rows >= nrows, columns >= ncols and rows with
// keep[r] == 0 are written as zeros: this is the in-kernel padding of D, Dv and of the tail chunk of T, and the
// key mask. Row r is multiplied by rowmul[r] when rowmul is given. keep / rowmul point to shared memory.
template <typename scalar_t, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, int ld, const scalar_t* __restrict__ src,
                                          int64_t row_stride, int64_t col_stride, int nrows, int ncols,
                                          const float* rowmul, const float* keep) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = idx / COLS, c = idx % COLS;
    float x = 0.f;
    if (r < nrows && c < ncols && (keep == nullptr || keep[r] != 0.f)) {
      x = Io<scalar_t>::load(src + r * row_stride + c * col_stride);
      if (rowmul != nullptr) x *= rowmul[r];
    }
    dst[r * ld + c] = x;
  }
}

// acc[i][j] += sum_{k < K} x(ty + 16 i, k) * y(k, tx + 16 j): the thread's share of a block GEMM whose operands
// are read from shared memory through the accessors x(row, k) and y(k, col).
template <int TM, int TN, int K, typename FX, typename FY>
__device__ __forceinline__ void gemm_acc(float (&acc)[TM][TN], int ty, int tx, const FX& x, const FY& y) {
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = x(ty + 16 * i, k);
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = y(k, tx + 16 * j);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Sum over the 16 threads tx = 0..15 of one thread row (they are 16 consecutive lanes of one warp).
// Every lane of the warp must call it.
__device__ __forceinline__ float sum16(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}

// Shared-memory carve of the chunk kernels, in floats. The state block S_s is Dp x 64 (pitch 65) and z_s Dp;
// Q_s, K_s: C x DK chunk sub-tiles; V_s, G_s: C x 64 value tiles; P_s: C x C; then three per-token vectors.
struct ChunkSmem {
  int S, z, Q, K, V, G, P, keep, rden, c, total;
};
__host__ __device__ __forceinline__ ChunkSmem chunk_smem(int Dp, int ldk, bool with_g) {
  ChunkSmem L{};
  int o = 0;
  L.S = o;    o += Dp * kLdV;
  L.z = o;    o += Dp;
  L.Q = o;    o += kC * ldk;
  L.K = o;    o += kC * ldk;
  L.V = o;    o += kC * kLdV;
  L.G = o;    o += with_g ? kC * kLdV : 0;   // forward: no G tile (L.G must not be used)
  L.P = o;    o += kC * kLdC;
  L.keep = o; o += kC;
  L.rden = o; o += kC;
  L.c = o;    o += kC;
  L.total = o;
  return L;
}

// ================================================================================================ kernels
// Pass 1 of forward and backward. Block (bh, seg, dtile * nvt + vtile) sums its segment into the DK x 64 tile
// (d0.., v0..) of slot (bh, seg): out[d][e] = sum_t keep_t x_t[d] y_t[e] / den_t, out_z[d] = sum_t keep_t x_t[d] w_t.
// Per chunk it reads C x DK of x and C x 64 of y (s (DK + 64) C bytes) for 2 DK 64 C flops.
template <typename scalar_t, int DK>
__global__ void __launch_bounds__(kThreads) la_seg_sum_kernel(const SegArgs a) {
  constexpr int LDK = DK + 1;
  constexpr int TD = DK / 16;
  __shared__ float X_s[kC * LDK];
  __shared__ float Y_s[kC * kLdV];
  __shared__ float keep_s[kC];
  __shared__ float rmul_s[kC];
  __shared__ float w_s[kC];

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y;
  const int dtile = blockIdx.z / a.nvt, vtile = blockIdx.z % a.nvt;
  const int64_t b = bh / a.H, h = bh % a.H, hy = h / a.ygroup;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv);
  const int d0 = dtile * DK, v0 = vtile * kBV;
  const int nd = imin(DK, D - d0), nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;

  const scalar_t* xb = static_cast<const scalar_t*>(a.x.data) + b * a.x.s[0] + h * a.x.s[1] + d0 * a.x.s[3];
  const scalar_t* yb = static_cast<const scalar_t*>(a.y.data) + b * a.y.s[0] + hy * a.y.s[1] + v0 * a.y.s[3];
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  const float* denb = a.den.data ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const float* wb = a.wz ? a.wz + bh * T : nullptr;
  const bool do_z = a.with_z && vtile == 0;

  float acc[TD][4] = {};
  float zacc = 0.f;
  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk's tiles are no longer read
    if (tid < kC) {
      const bool valid = tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0);
      keep_s[tid] = valid ? 1.f : 0.f;
      rmul_s[tid] = (tid < nt && denb != nullptr) ? 1.f / denb[(t0 + tid) * a.den.s[2]] : 1.f;
      w_s[tid] = (tid < nt && wb != nullptr) ? wb[t0 + tid] : 1.f;
    }
    __syncthreads();
    load_tile<scalar_t, kC, DK>(X_s, LDK, xb + t0 * a.x.s[2], a.x.s[2], a.x.s[3], nt, nd, nullptr, keep_s);
    load_tile<scalar_t, kC, kBV>(Y_s, kLdV, yb + t0 * a.y.s[2], a.y.s[2], a.y.s[3], nt, nv,
                          denb != nullptr ? rmul_s : nullptr, keep_s);
    __syncthreads();
    // acc[d][e] += sum_t X[t][d] Y[t][e]
    gemm_acc<TD, 4, kC>(acc, ty, tx, [&](int m, int k) { return X_s[k * LDK + m]; },
                        [&](int k, int n) { return Y_s[k * kLdV + n]; });
    if (do_z && tid < DK) {
      for (int t = 0; t < kC; ++t) zacc = fmaf(X_s[t * LDK + tid], w_s[t], zacc);
    }
  }
  float* out = a.ws + (bh * (a.NS + 1) + seg) * a.slot;
#pragma unroll
  for (int i = 0; i < TD; ++i) {
    const int d = d0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = v0 + tx + 16 * j;
      if (d < D && e < Dv) out[static_cast<int64_t>(d) * Dv + e] = acc[i][j];
    }
  }
  if (do_z && tid < DK && d0 + tid < D) out[static_cast<int64_t>(D) * Dv + d0 + tid] = zacc;
}

// Pass 2: prefix over the segment slots of one (bh), one thread per state element (S then z), in place.
// Forward: slot j <- init + sum_{i<j} slot_i. Reverse: slot j <- init + sum_{i>j} slot_i. Slot NS <- total,
// also written to out (the final state, or dS0 / dz0). Reads and writes (NS + 1) * 4 bytes per element.
__global__ void __launch_bounds__(kScanThreads) la_scan_kernel(const ScanArgs a) {
  const int64_t bh = blockIdx.x;
  const int64_t idx = static_cast<int64_t>(blockIdx.y) * kScanThreads + threadIdx.x;
  const int64_t nS = a.D * a.Dv;
  const int64_t n = nS + (a.with_z ? a.D : 0);
  if (idx >= n) return;
  const int64_t b = bh / a.H, h = bh % a.H;
  float acc = 0.f;
  float* out = nullptr;
  if (idx < nS) {
    const int64_t d = idx / a.Dv, e = idx % a.Dv;
    if (a.init_S.data)
      acc = static_cast<const float*>(a.init_S.data)[b * a.init_S.s[0] + h * a.init_S.s[1] + d * a.init_S.s[2] +
                                                     e * a.init_S.s[3]];
    if (a.out_S.data)
      out = static_cast<float*>(a.out_S.data) + b * a.out_S.s[0] + h * a.out_S.s[1] + d * a.out_S.s[2] +
            e * a.out_S.s[3];
  } else {
    const int64_t d = idx - nS;
    if (a.init_z.data)
      acc = static_cast<const float*>(a.init_z.data)[b * a.init_z.s[0] + h * a.init_z.s[1] + d * a.init_z.s[2]];
    if (a.out_z.data) out = static_cast<float*>(a.out_z.data) + b * a.out_z.s[0] + h * a.out_z.s[1] + d * a.out_z.s[2];
  }
  float* w = a.ws + bh * (a.NS + 1) * a.slot + idx;
  if (!a.reverse) {
    for (int j = 0; j < a.NS; ++j) {
      const float x = w[j * a.slot];
      w[j * a.slot] = acc;
      acc += x;
    }
  } else {
    for (int j = a.NS - 1; j >= 0; --j) {
      const float x = w[j * a.slot];
      w[j * a.slot] = acc;
      acc += x;
    }
  }
  w[a.NS * a.slot] = acc;
  if (out != nullptr) *out = acc;
}

// Pass 3 of the forward. Block (bh, seg, vt): state S_s = S[:, v0:v0+64] entering the segment (Dp x 64 fp32 in
// shared memory), z_s = z. Per chunk of C tokens and per D sub-tile d0:
//   A += Q_d K_d^T (C x C), O += Q_d S_s[d0:] (C x 64), qz += Q_d z_s[d0:], then S_s[d0:] += K_d^T V, z_s += K_d^T 1
// (the update of rows d0.. follows their last read in this chunk). Then O += tril(A) V, den = rowsum tril(A) + qz
// + eps (fused fp32 denominator: z is an fp32 column next to S, keys are never summed in the input dtype).
// Flops per chunk: 2 C D (C + 2*64) + 2 C^2 64. Reads q, k (C x D) and v (C x 64) once, writes o (C x 64).
template <typename scalar_t, int DK>
__global__ void __launch_bounds__(kThreads, 2) la_fwd_chunk_kernel(const ChunkArgs a) {
  constexpr int LDK = DK + 1;
  constexpr int TD = DK / 16;
  extern __shared__ float smem[];
  const ChunkSmem L = chunk_smem(a.Dp, LDK, false);
  float* __restrict__ S_s = smem + L.S;
  float* __restrict__ z_s = smem + L.z;
  float* __restrict__ Q_s = smem + L.Q;
  float* __restrict__ K_s = smem + L.K;
  float* __restrict__ V_s = smem + L.V;
  float* __restrict__ A_s = smem + L.P;
  float* __restrict__ keep_s = smem + L.keep;

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y, vt = blockIdx.z;
  const int64_t b = bh / a.H, h = bh % a.H, hv = h / a.G;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), Dp = a.Dp;
  const int v0 = vt * kBV, nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;

  // Entering state, zero outside [0, D) x [0, Dv): the padded rows and columns stay zero through the updates.
  const float* st = a.ws + (bh * (a.NS + 1) + (a.causal ? seg : a.NS)) * a.slot;
  for (int idx = tid; idx < Dp * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    S_s[d * kLdV + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads)
    z_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const scalar_t* qb = static_cast<const scalar_t*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const scalar_t* kb = static_cast<const scalar_t*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const scalar_t* vb = static_cast<const scalar_t*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  scalar_t* ob = static_cast<scalar_t*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1] + v0 * a.out.s[3];
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  float* denb = (a.normalize && vt == 0) ? static_cast<float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1]
                                         : nullptr;

  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with keep_s, V_s, A_s and its state update is complete
    if (tid < kC)
      keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
    __syncthreads();
    if (a.causal)
      load_tile<scalar_t, kC, kBV>(V_s, kLdV, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, nullptr, keep_s);

    float accA[4][4] = {}, accO[4][4] = {}, qzp[4] = {};
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // Q_s / K_s of the previous sub-tile are no longer read
      load_tile<scalar_t, kC, DK>(Q_s, LDK, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr,
                           nullptr);
      if (a.causal)
        load_tile<scalar_t, kC, DK>(K_s, LDK, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, nullptr,
                             keep_s);
      __syncthreads();
      if (a.causal)  // A[t][s] += sum_d Q[t][d] K[s][d]
        gemm_acc<4, 4, DK>(accA, ty, tx, [&](int m, int k) { return Q_s[m * LDK + k]; },
                           [&](int k, int n) { return K_s[n * LDK + k]; });
      // O[t][e] += sum_d Q[t][d] S[d0 + d][e]
      gemm_acc<4, 4, DK>(accO, ty, tx, [&](int m, int k) { return Q_s[m * LDK + k]; },
                         [&](int k, int n) { return S_s[(d0 + k) * kLdV + n]; });
      if (a.normalize) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          for (int kk = tx; kk < DK; kk += 16) qzp[i] = fmaf(Q_s[(ty + 16 * i) * LDK + kk], z_s[d0 + kk], qzp[i]);
      }
      if (a.causal) {
        __syncthreads();  // every read of S_s / z_s rows [d0, d0 + DK) for this chunk is done
        float upd[TD][4] = {};
        // upd[d][e] = sum_t K[t][d] V[t][e]
        gemm_acc<TD, 4, kC>(upd, ty, tx, [&](int m, int k) { return K_s[k * LDK + m]; },
                            [&](int k, int n) { return V_s[k * kLdV + n]; });
#pragma unroll
        for (int i = 0; i < TD; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) S_s[(d0 + ty + 16 * i) * kLdV + tx + 16 * j] += upd[i][j];
        if (a.normalize && tid < DK) {
          float s = 0.f;
          for (int t = 0; t < kC; ++t) s += K_s[t * LDK + tid];
          z_s[d0 + tid] += s;
        }
      }
    }

    float den[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) den[i] = sum16(qzp[i]);  // q_t . z_enter (0 when not normalized)
    if (a.causal) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = ty + 16 * i;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int s = tx + 16 * j;
          const float x = s <= t ? accA[i][j] : 0.f;
          A_s[t * kLdC + s] = x;
          rs += x;
        }
        den[i] += sum16(rs);  // + sum_{s<=t} q_t . k_s
      }
      __syncthreads();
      // O[t][e] += sum_s A[t][s] V[s][e]
      gemm_acc<4, 4, kC>(accO, ty, tx, [&](int m, int k) { return A_s[m * kLdC + k]; },
                         [&](int k, int n) { return V_s[k * kLdV + n]; });
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = ty + 16 * i;
      if (t >= nt) continue;
      den[i] += a.eps;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = tx + 16 * j;
        if (e < nv)
          Io<scalar_t>::store(ob + (t0 + t) * a.out.s[2] + e * a.out.s[3], a.normalize ? accO[i][j] / den[i] : accO[i][j]);
      }
      if (denb != nullptr && tx == 0) denb[(t0 + t) * a.den.s[2]] = den[i];
    }
  }
}

// (the tensor-core forward chunk pass: linear_attn_mma.cuh)

// Backward pass 2 (dq and c). Block (bh, seg, vt) with the forward state entering its segment. Per chunk:
//   G = do / den (C x 64), P = tril(G V^T) (C x C);
//   normalize: sub-tile loop 1: u = P K_d + G S_s[d0:]^T (fp32, C x DK), qu += Q_d . u; c = -qu / den
//              (c is a partial sum over this value tile; the tiles' partials add up, in cbuf and in dq).
//              P += c on the causal triangle (the c_t z_t term: z_t = z_enter + sum_{s<=t} k_s).
//   sub-tile loop 2: dq_d = P K_d + G S_s[d0:]^T + c z_s[d0:]; then S_s[d0:] += K_d^T V, z_s += K_d^T 1.
// Reads do, v (C x 64), q, k (C x D, k twice when normalized), writes dq (C x D) per chunk.
template <typename scalar_t, int DK>
__global__ void __launch_bounds__(kThreads, 2) la_bwd_dq_kernel(const ChunkArgs a) {
  constexpr int LDK = DK + 1;
  constexpr int TD = DK / 16;
  extern __shared__ float smem[];
  const ChunkSmem L = chunk_smem(a.Dp, LDK, true);
  float* __restrict__ S_s = smem + L.S;
  float* __restrict__ z_s = smem + L.z;
  float* __restrict__ Q_s = smem + L.Q;
  float* __restrict__ K_s = smem + L.K;
  float* __restrict__ V_s = smem + L.V;
  float* __restrict__ G_s = smem + L.G;
  float* __restrict__ P_s = smem + L.P;
  float* __restrict__ keep_s = smem + L.keep;
  float* __restrict__ rden_s = smem + L.rden;
  float* __restrict__ c_s = smem + L.c;

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y, vt = blockIdx.z;
  const int64_t b = bh / a.H, h = bh % a.H, hv = h / a.G;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), Dp = a.Dp;
  const int v0 = vt * kBV, nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;

  const float* st = a.ws + (bh * (a.NS + 1) + (a.causal ? seg : a.NS)) * a.slot;
  for (int idx = tid; idx < Dp * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    S_s[d * kLdV + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads)
    z_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const scalar_t* qb = static_cast<const scalar_t*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const scalar_t* kb = static_cast<const scalar_t*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const scalar_t* vb = static_cast<const scalar_t*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  const scalar_t* gb = static_cast<const scalar_t*>(a.dout.data) + b * a.dout.s[0] + h * a.dout.s[1] + v0 * a.dout.s[3];
  const float* denb =
      a.normalize ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  scalar_t* dqb = static_cast<scalar_t*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1];
  float* accb = a.acc ? a.acc + bh * T * a.D : nullptr;
  float* cb = a.normalize ? a.cbuf + bh * T : nullptr;

  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with every shared tile and its state update is complete
    if (tid < kC) {
      keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
      rden_s[tid] = tid < nt ? (denb != nullptr ? 1.f / denb[(t0 + tid) * a.den.s[2]] : 1.f) : 0.f;
    }
    __syncthreads();
    load_tile<scalar_t, kC, kBV>(G_s, kLdV, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, rden_s, nullptr);
    if (a.causal)
      load_tile<scalar_t, kC, kBV>(V_s, kLdV, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, nullptr, keep_s);
    __syncthreads();
    if (a.causal) {
      float accP[4][4] = {};
      // P[t][s] = sum_e G[t][e] V[s][e], kept for s <= t
      gemm_acc<4, 4, kBV>(accP, ty, tx, [&](int m, int k) { return G_s[m * kLdV + k]; },
                          [&](int k, int n) { return V_s[n * kLdV + k]; });
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int t = ty + 16 * i, s = tx + 16 * j;
          P_s[t * kLdC + s] = s <= t ? accP[i][j] : 0.f;
        }
    }

    if (a.normalize) {
      // Loop 1: c_t = -(q_t . u_t) / den_t with u_t = S_t g_t in fp32 (never from the rounded o).
      float qup[4] = {};
      for (int d0 = 0; d0 < D; d0 += DK) {
        const int nd = imin(DK, D - d0);
        __syncthreads();  // Q_s / K_s free; P_s written
        load_tile<scalar_t, kC, DK>(Q_s, LDK, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr,
                             nullptr);
        if (a.causal)
          load_tile<scalar_t, kC, DK>(K_s, LDK, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd,
                               nullptr, keep_s);
        __syncthreads();
        float u[4][TD] = {};
        if (a.causal)  // u[t][d] += sum_s P[t][s] K[s][d]
          gemm_acc<4, TD, kC>(u, ty, tx, [&](int m, int k) { return P_s[m * kLdC + k]; },
                              [&](int k, int n) { return K_s[k * LDK + n]; });
        // u[t][d] += sum_e G[t][e] S[d0 + d][e]
        gemm_acc<4, TD, kBV>(u, ty, tx, [&](int m, int k) { return G_s[m * kLdV + k]; },
                             [&](int k, int n) { return S_s[(d0 + n) * kLdV + k]; });
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < TD; ++j) qup[i] = fmaf(Q_s[(ty + 16 * i) * LDK + tx + 16 * j], u[i][j], qup[i]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = ty + 16 * i;
        const float ct = -sum16(qup[i]) * rden_s[t];  // 0 for rows t >= nt (rden 0)
        if (tx == 0) {
          c_s[t] = ct;
          if (t < nt) {
            if (a.nvt == 1) cb[t0 + t] = ct;
            else atomicAdd(cb + t0 + t, ct);
          }
        }
      }
      __syncthreads();  // c_s visible; loop 1 no longer reads P_s
      if (a.causal) {
        for (int idx = tid; idx < kC * kC; idx += kThreads) {
          const int t = idx / kC, s = idx % kC;
          if (s <= t) P_s[t * kLdC + s] += c_s[t];
        }
      }
    }

    // Loop 2: dq = P K + G S^T + c z_enter, then the state update.
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // K_s free; P_s (with c) and c_s visible
      if (a.causal)
        load_tile<scalar_t, kC, DK>(K_s, LDK, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, nullptr,
                             keep_s);
      __syncthreads();
      float u[4][TD] = {};
      if (a.causal)
        gemm_acc<4, TD, kC>(u, ty, tx, [&](int m, int k) { return P_s[m * kLdC + k]; },
                            [&](int k, int n) { return K_s[k * LDK + n]; });
      gemm_acc<4, TD, kBV>(u, ty, tx, [&](int m, int k) { return G_s[m * kLdV + k]; },
                           [&](int k, int n) { return S_s[(d0 + n) * kLdV + k]; });
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = ty + 16 * i;
        const float ct = a.normalize ? c_s[t] : 0.f;
#pragma unroll
        for (int j = 0; j < TD; ++j) {
          const int d = d0 + tx + 16 * j;
          const float x = fmaf(ct, z_s[d], u[i][j]);
          if (t < nt && d < D) {
            if (accb != nullptr) atomicAdd(accb + (t0 + t) * a.D + d, x);
            else Io<scalar_t>::store(dqb + (t0 + t) * a.out.s[2] + d * a.out.s[3], x);
          }
        }
      }
      if (a.causal) {
        __syncthreads();  // every read of S_s / z_s rows [d0, d0 + DK) for this chunk is done
        float upd[TD][4] = {};
        gemm_acc<TD, 4, kC>(upd, ty, tx, [&](int m, int k) { return K_s[k * LDK + m]; },
                            [&](int k, int n) { return V_s[k * kLdV + n]; });
#pragma unroll
        for (int i = 0; i < TD; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) S_s[(d0 + ty + 16 * i) * kLdV + tx + 16 * j] += upd[i][j];
        if (a.normalize && tid < DK) {
          float s = 0.f;
          for (int t = 0; t < kC; ++t) s += K_s[t * LDK + tid];
          z_s[d0 + tid] += s;
        }
      }
    }
  }
}

// Backward pass 4 (dk and dv). Block (bh, seg, vt) with R_s = R[:, v0:v0+64], r_s = r entering its segment from
// the right (dS + sum over later tokens). Chunks are walked last to first. Per chunk:
//   P' = tril(G V^T) + c on the causal triangle (c and r are added by value tile 0 only: they do not depend on e);
//   per D sub-tile: dk_d = P'^T Q_d + V R_s[d0:]^T + r_s[d0:]; A += Q_d K_d^T; KR += K_d R_s[d0:];
//                   then R_s[d0:] += Q_d^T G, r_s += Q_d^T c;
//   dv = KR + tril(A)^T G (masked keys: K rows are zero, so dv = 0 there; dk is written as 0).
template <typename scalar_t, int DK>
__global__ void __launch_bounds__(kThreads, 2) la_bwd_dkdv_kernel(const ChunkArgs a) {
  constexpr int LDK = DK + 1;
  constexpr int TD = DK / 16;
  extern __shared__ float smem[];
  const ChunkSmem L = chunk_smem(a.Dp, LDK, true);
  float* __restrict__ R_s = smem + L.S;
  float* __restrict__ r_s = smem + L.z;
  float* __restrict__ Q_s = smem + L.Q;
  float* __restrict__ K_s = smem + L.K;
  float* __restrict__ V_s = smem + L.V;
  float* __restrict__ G_s = smem + L.G;
  float* __restrict__ P_s = smem + L.P;
  float* __restrict__ keep_s = smem + L.keep;
  float* __restrict__ rden_s = smem + L.rden;
  float* __restrict__ c_s = smem + L.c;

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y, vt = blockIdx.z;
  const int64_t b = bh / a.H, h = bh % a.H, hv = h / a.G;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), Dp = a.Dp;
  const int v0 = vt * kBV, nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;
  const bool with_c = a.normalize && vt == 0;

  const float* st = a.ws + (bh * (a.NS + 1) + (a.causal ? seg : a.NS)) * a.slot;
  for (int idx = tid; idx < Dp * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    R_s[d * kLdV + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads)
    r_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const scalar_t* qb = static_cast<const scalar_t*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const scalar_t* kb = static_cast<const scalar_t*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const scalar_t* vb = static_cast<const scalar_t*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  const scalar_t* gb = static_cast<const scalar_t*>(a.dout.data) + b * a.dout.s[0] + h * a.dout.s[1] + v0 * a.dout.s[3];
  const float* denb =
      a.normalize ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  const float* cb = a.normalize ? a.cbuf + bh * T : nullptr;
  scalar_t* dkb = static_cast<scalar_t*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1];
  scalar_t* dvb = static_cast<scalar_t*>(a.out2.data) + b * a.out2.s[0] + hv * a.out2.s[1] + v0 * a.out2.s[3];
  float* acck = a.acc ? a.acc + bh * T * a.D : nullptr;
  float* accv = a.acc2 ? a.acc2 + (b * a.Hv + hv) * T * a.Dv + v0 : nullptr;

  for (int c = a.cps - 1; c >= 0; --c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) continue;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with every shared tile and its state update is complete
    if (tid < kC) {
      keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
      rden_s[tid] = tid < nt ? (denb != nullptr ? 1.f / denb[(t0 + tid) * a.den.s[2]] : 1.f) : 0.f;
      c_s[tid] = (tid < nt && cb != nullptr) ? cb[t0 + tid] : 0.f;
    }
    __syncthreads();
    if (a.causal)  // non-causal: dk = V R^T + r and dv = K R need no G
      load_tile<scalar_t, kC, kBV>(G_s, kLdV, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, rden_s, nullptr);
    load_tile<scalar_t, kC, kBV>(V_s, kLdV, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, nullptr, keep_s);
    __syncthreads();
    if (a.causal) {
      float accP[4][4] = {};
      gemm_acc<4, 4, kBV>(accP, ty, tx, [&](int m, int k) { return G_s[m * kLdV + k]; },
                          [&](int k, int n) { return V_s[n * kLdV + k]; });
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int t = ty + 16 * i, s = tx + 16 * j;
          P_s[t * kLdC + s] = s <= t ? accP[i][j] + (with_c ? c_s[t] : 0.f) : 0.f;
        }
    }

    float accA[4][4] = {}, accKR[4][4] = {};
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // Q_s / K_s free; P_s written
      load_tile<scalar_t, kC, DK>(Q_s, LDK, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr,
                           nullptr);
      load_tile<scalar_t, kC, DK>(K_s, LDK, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, nullptr,
                           keep_s);
      __syncthreads();
      float dk[4][TD] = {};
      if (a.causal)  // dk[s][d] += sum_t P'[t][s] Q[t][d]
        gemm_acc<4, TD, kC>(dk, ty, tx, [&](int m, int k) { return P_s[k * kLdC + m]; },
                            [&](int k, int n) { return Q_s[k * LDK + n]; });
      // dk[s][d] += sum_e V[s][e] R[d0 + d][e]
      gemm_acc<4, TD, kBV>(dk, ty, tx, [&](int m, int k) { return V_s[m * kLdV + k]; },
                           [&](int k, int n) { return R_s[(d0 + n) * kLdV + k]; });
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int s = ty + 16 * i;
        const bool kept = keep_s[s] != 0.f;
#pragma unroll
        for (int j = 0; j < TD; ++j) {
          const int d = d0 + tx + 16 * j;
          const float x = with_c ? dk[i][j] + r_s[d] : dk[i][j];
          if (s < nt && d < D) {
            if (acck != nullptr) {
              if (kept) atomicAdd(acck + (t0 + s) * a.D + d, x);
            } else {
              Io<scalar_t>::store(dkb + (t0 + s) * a.out.s[2] + d * a.out.s[3], kept ? x : 0.f);
            }
          }
        }
      }
      if (a.causal)  // A[t][s] += sum_d Q[t][d] K[s][d]
        gemm_acc<4, 4, DK>(accA, ty, tx, [&](int m, int k) { return Q_s[m * LDK + k]; },
                           [&](int k, int n) { return K_s[n * LDK + k]; });
      // KR[s][e] += sum_d K[s][d] R[d0 + d][e]
      gemm_acc<4, 4, DK>(accKR, ty, tx, [&](int m, int k) { return K_s[m * LDK + k]; },
                         [&](int k, int n) { return R_s[(d0 + k) * kLdV + n]; });
      if (a.causal) {
        __syncthreads();  // every read of R_s / r_s rows [d0, d0 + DK) and of P_s for this chunk is done
        float upd[TD][4] = {};
        // upd[d][e] = sum_t Q[t][d] G[t][e]
        gemm_acc<TD, 4, kC>(upd, ty, tx, [&](int m, int k) { return Q_s[k * LDK + m]; },
                            [&](int k, int n) { return G_s[k * kLdV + n]; });
#pragma unroll
        for (int i = 0; i < TD; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) R_s[(d0 + ty + 16 * i) * kLdV + tx + 16 * j] += upd[i][j];
        if (a.normalize && tid < DK) {
          float s = 0.f;
          for (int t = 0; t < kC; ++t) s = fmaf(Q_s[t * LDK + tid], c_s[t], s);
          r_s[d0 + tid] += s;
        }
      }
    }

    if (a.causal) {
      // tril(A) into P_s: its last reader (the dk GEMM) finished before the state-update barrier above.
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int t = ty + 16 * i, s = tx + 16 * j;
          P_s[t * kLdC + s] = s <= t ? accA[i][j] : 0.f;
        }
      __syncthreads();
      // dv[s][e] += sum_t A[t][s] G[t][e]
      gemm_acc<4, 4, kC>(accKR, ty, tx, [&](int m, int k) { return P_s[k * kLdC + m]; },
                         [&](int k, int n) { return G_s[k * kLdV + n]; });
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int s = ty + 16 * i;
      if (s >= nt) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = tx + 16 * j;
        if (e >= nv) continue;
        if (accv != nullptr) atomicAdd(accv + (t0 + s) * a.Dv + e, accKR[i][j]);
        else Io<scalar_t>::store(dvb + (t0 + s) * a.out2.s[2] + e * a.out2.s[3], accKR[i][j]);
      }
    }
  }
}

// fp32 accumulator [B][H][T][D] (contiguous) -> strided output in the input dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(256) la_cast_kernel(const float* __restrict__ src, int64_t n, int64_t H,
                                                      int64_t T, int64_t D, LaView dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t d = i % D;
    int64_t r = i / D;
    const int64_t t = r % T;
    r /= T;
    const int64_t h = r % H, b = r / H;
    Io<scalar_t>::store(static_cast<scalar_t*>(dst.data) + b * dst.s[0] + h * dst.s[1] + t * dst.s[2] + d * dst.s[3], src[i]);
  }
}

// Decode step, one block per (b, h): S += k^T v and z += k in place (each element read and written by one
// thread), o = q S / (q . z + eps). Moves 8 D Dv bytes of state; warps split the D rows, lanes the Dv columns.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) la_step_kernel(const StepArgs a) {
  __shared__ float q_s[kMaxD];
  __shared__ float k_s[kMaxD];
  __shared__ float v_s[kMaxDv];
  __shared__ float red_s[kThreads / 32][32];
  __shared__ float den_s;
  constexpr int kWarps = kThreads / 32;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.H, h = bh % a.H, hv = h / a.G;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv);

  const scalar_t* qb = static_cast<const scalar_t*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const scalar_t* kb = static_cast<const scalar_t*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const scalar_t* vb = static_cast<const scalar_t*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1];
  for (int d = tid; d < D; d += kThreads) {
    q_s[d] = Io<scalar_t>::load(qb + d * a.q.s[2]);
    k_s[d] = Io<scalar_t>::load(kb + d * a.k.s[2]);
  }
  for (int e = tid; e < Dv; e += kThreads) v_s[e] = Io<scalar_t>::load(vb + e * a.v.s[2]);
  __syncthreads();

  float part = 0.f;
  if (a.normalize) {
    float* zb = static_cast<float*>(a.z.data) + b * a.z.s[0] + h * a.z.s[1];
    for (int d = tid; d < D; d += kThreads) {
      float* p = zb + d * a.z.s[2];
      const float zn = *p + k_s[d];
      *p = zn;
      part = fmaf(q_s[d], zn, part);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
  if (lane == 0) red_s[warp][0] = part;
  __syncthreads();
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red_s[w][0];
    den_s = s + a.eps;
  }
  __syncthreads();
  const float den = den_s;

  float* Sb = static_cast<float*>(a.S.data) + b * a.S.s[0] + h * a.S.s[1];
  scalar_t* ob = static_cast<scalar_t*>(a.o.data) + b * a.o.s[0] + h * a.o.s[1];
  for (int e0 = 0; e0 < Dv; e0 += 32) {
    const int e = e0 + lane;
    float acc = 0.f;
    if (e < Dv) {
      const float ve = v_s[e];
#pragma unroll 4
      for (int d = warp; d < D; d += kWarps) {
        float* p = Sb + d * a.S.s[2] + e * a.S.s[3];
        const float sn = fmaf(k_s[d], ve, *p);
        *p = sn;
        acc = fmaf(q_s[d], sn, acc);
      }
    }
    __syncthreads();  // red_s is free (den_s read, previous column group reduced)
    red_s[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && e < Dv) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += red_s[w][lane];
      Io<scalar_t>::store(ob + e * a.o.s[2], a.normalize ? s / den : s);
    }
  }
}

// ============================================================================================ host side
// Split of T: nchunks chunks of C tokens, NS segments of cps chunks each. NS is chosen so that the chunk kernels
// (B*H*nvt*NS blocks) fill the GPU about 4 times over, capped by the number of chunks and a 64 MiB state
// workspace. Pure function of the sizes and num_sms: the workspace query and the launch agree.
struct Plan {
  int64_t nchunks, slot;
  int cps, NS, nvt;
};

Plan make_plan(const LaSizes& n, int num_sms) {
  Plan p{};
  p.nvt = static_cast<int>(cdiv(n.Dv, kBV));
  p.slot = n.D * n.Dv + n.D;
  p.nchunks = lmax(1, cdiv(n.T, kC));
  const int64_t bh = lmax(1, n.B * n.H);
  const int64_t target = 4 * lmax(1, num_sms > 0 ? num_sms : 132);
  int64_t ns = cdiv(target, bh * p.nvt);
  const int64_t cap = (int64_t(1) << 24) / (bh * p.slot) - 1;  // (NS + 1) slots of bh * slot floats <= 64 MiB
  ns = lmin(ns, cap);
  ns = lmin(ns, p.nchunks);
  ns = lmin(ns, 32768);
  ns = lmax(ns, 1);
  p.cps = static_cast<int>(cdiv(p.nchunks, ns));
  p.NS = static_cast<int>(cdiv(p.nchunks, p.cps));
  return p;
}

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

struct WsLayout {
  size_t state, c, dq, dk, dv, total;  // byte offsets
};

WsLayout ws_layout(const LaSizes& n, const Plan& p, bool backward, bool normalize) {
  WsLayout L{};
  const size_t bh = static_cast<size_t>(n.B * n.H), f = sizeof(float);
  size_t o = 0;
  L.state = o;
  o += align256(bh * static_cast<size_t>(p.NS + 1) * static_cast<size_t>(p.slot) * f);
  if (backward) {
    L.c = o;
    o += align256(normalize ? bh * static_cast<size_t>(n.T) * f : 0);
    L.dq = o;
    o += align256(p.nvt > 1 ? bh * static_cast<size_t>(n.T * n.D) * f : 0);
    L.dk = o;
    o += align256(p.nvt > 1 ? bh * static_cast<size_t>(n.T * n.D) * f : 0);
    L.dv = o;
    o += align256(n.H != n.Hv ? static_cast<size_t>(n.B * n.Hv * n.T * n.Dv) * f : 0);
  }
  L.total = o;
  return L;
}

bool sizes_ok(const LaSizes& n) {
  return n.B >= 0 && n.H >= 0 && n.Hv >= 1 && n.H % n.Hv == 0 && n.T >= 0 && n.D >= 1 && n.D <= kMaxD &&
         n.Dv >= 1 && n.Dv <= kMaxDv;
}

float* at_offset(void* base, size_t off) {
  return reinterpret_cast<float*>(static_cast<unsigned char*>(base) + off);
}

template <typename scalar_t, int DK>
cudaError_t launch_seg_sum(const LaSizes& n, const Plan& p, LaView x, LaView y, int64_t ygroup, LaView mask,
                           LaView den, const float* wz, bool with_z, float* ws, cudaStream_t stream,
                           bool tensor_cores = false) {
  SegArgs s{};
  s.H = n.H; s.T = n.T; s.D = n.D; s.Dv = n.Dv; s.ygroup = ygroup;
  s.NS = p.NS; s.cps = p.cps; s.nvt = p.nvt;
  s.with_z = with_z;
  s.x = x; s.y = y; s.key_mask = mask; s.den = den;
  s.wz = wz;
  s.ws = ws; s.slot = p.slot;
  const dim3 grid(static_cast<unsigned>(n.B * n.H), static_cast<unsigned>(p.NS),
                  static_cast<unsigned>(cdiv(n.D, DK) * p.nvt));
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    if (tensor_cores) {
      la_seg_sum_mma_kernel<DK><<<grid, kThreads, 0, stream>>>(s);
      return cudaGetLastError();
    }
  }
  la_seg_sum_kernel<scalar_t, DK><<<grid, kThreads, 0, stream>>>(s);
  return cudaGetLastError();
}

cudaError_t launch_scan(const LaSizes& n, const Plan& p, bool with_z, bool reverse, float* ws, LaView init_S,
                        LaView init_z, LaView out_S, LaView out_z, cudaStream_t stream) {
  ScanArgs s{};
  s.H = n.H; s.D = n.D; s.Dv = n.Dv;
  s.NS = p.NS;
  s.with_z = with_z; s.reverse = reverse;
  s.ws = ws; s.slot = p.slot;
  s.init_S = init_S; s.init_z = init_z; s.out_S = out_S; s.out_z = out_z;
  const int64_t elems = n.D * n.Dv + (with_z ? n.D : 0);
  const dim3 grid(static_cast<unsigned>(n.B * n.H), static_cast<unsigned>(cdiv(elems, kScanThreads)));
  la_scan_kernel<<<grid, kScanThreads, 0, stream>>>(s);
  return cudaGetLastError();
}

template <typename Kernel>
cudaError_t launch_chunk(Kernel kernel, const LaSizes& n, const Plan& p, const ChunkArgs& args, size_t smem_bytes,
                         cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(n.B * n.H), static_cast<unsigned>(p.NS), static_cast<unsigned>(p.nvt));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

// A chunk pass: its tensor-core kernel where asked for (bf16 only) and fitting the GPU's shared memory, else the
// FMA one.
template <typename scalar_t>
cudaError_t launch_pass(bool tensor_cores, int max_smem_bytes, void (*mma)(ChunkArgs), size_t mma_bytes,
                        void (*fma)(ChunkArgs), size_t fma_bytes, const LaSizes& n, const Plan& p,
                        const ChunkArgs& args, cudaStream_t stream) {
  if (std::is_same_v<scalar_t, __nv_bfloat16> && tensor_cores && mma_bytes <= static_cast<size_t>(max_smem_bytes))
    return launch_chunk(mma, n, p, args, mma_bytes, stream);
  return launch_chunk(fma, n, p, args, fma_bytes, stream);
}

template <typename scalar_t>
cudaError_t launch_cast(const float* src, int64_t B, int64_t H, int64_t T_, int64_t D, LaView dst,
                        cudaStream_t stream) {
  const int64_t n = B * H * T_ * D;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = lmin(cdiv(n, 256), 65536);
  la_cast_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, n, H, T_, D, dst);
  return cudaGetLastError();
}

ChunkArgs chunk_args(const LaSizes& n, const Plan& p, int Dp, bool causal, bool normalize, float eps) {
  ChunkArgs c{};
  c.H = n.H; c.G = n.H / n.Hv; c.Hv = n.Hv; c.T = n.T; c.D = n.D; c.Dv = n.Dv;
  c.NS = p.NS; c.cps = p.cps; c.nvt = p.nvt; c.Dp = Dp;
  c.causal = causal; c.normalize = normalize; c.eps = eps;
  c.slot = p.slot;
  return c;
}

#define FA_RETURN_IF_ERROR(expr)            \
  do {                                      \
    const cudaError_t fa_err_ = (expr);     \
    if (fa_err_ != cudaSuccess) return fa_err_; \
  } while (0)

template <typename scalar_t, int DK>
cudaError_t fwd_run(const LaFwdParams& prm, const Plan& p, cudaStream_t stream) {
  const LaSizes& n = prm.n;
  const WsLayout W = ws_layout(n, p, false, prm.normalize);
  float* ws = at_offset(prm.workspace, W.state);
  const int Dp = static_cast<int>(cdiv(n.D, DK) * DK);
  // 1. per-segment sums of k^T v and k (masked keys contribute nothing)
  FA_RETURN_IF_ERROR((launch_seg_sum<scalar_t, DK>(n, p, prm.k, prm.v, n.H / n.Hv, prm.key_mask, LaView{}, nullptr,
                                            prm.normalize, ws, stream, prm.tensor_cores)));
  // 2. prefix over segments from (S0, z0); the total is the final state
  FA_RETURN_IF_ERROR(launch_scan(n, p, prm.normalize, false, ws, prm.S0, prm.normalize ? prm.z0 : LaView{}, prm.S,
                                 prm.normalize ? prm.z : LaView{}, stream));
  // 3. outputs, each segment from its entering state
  if (n.T == 0) return cudaSuccess;
  ChunkArgs c = chunk_args(n, p, Dp, prm.causal, prm.normalize, prm.eps);
  c.q = prm.q; c.k = prm.k; c.v = prm.v; c.key_mask = prm.key_mask;
  c.den = prm.den; c.out = prm.o;
  c.ws = ws;
  const size_t smem = static_cast<size_t>(chunk_smem(Dp, DK + 1, false).total) * sizeof(float);
  return launch_pass<scalar_t>(prm.tensor_cores, prm.max_smem_bytes, la_fwd_chunk_mma_kernel<DK>,
                               mma_smem_bytes(Dp, DK, kMmaFwd), la_fwd_chunk_kernel<scalar_t, DK>, smem, n, p, c,
                               stream);
}

template <typename scalar_t, int DK>
cudaError_t bwd_run(const LaBwdParams& prm, const Plan& p, cudaStream_t stream) {
  const LaSizes& n = prm.n;
  const bool nz = prm.normalize;
  const WsLayout W = ws_layout(n, p, true, nz);
  float* ws = at_offset(prm.workspace, W.state);
  float* cbuf = nz ? at_offset(prm.workspace, W.c) : nullptr;
  float* acc_dq = p.nvt > 1 ? at_offset(prm.workspace, W.dq) : nullptr;
  float* acc_dk = p.nvt > 1 ? at_offset(prm.workspace, W.dk) : nullptr;
  float* acc_dv = n.H != n.Hv ? at_offset(prm.workspace, W.dv) : nullptr;
  const int Dp = static_cast<int>(cdiv(n.D, DK) * DK);
  const size_t bhT = static_cast<size_t>(n.B * n.H * n.T);

  if (n.T > 0) {
    if (cbuf != nullptr && p.nvt > 1) FA_RETURN_IF_ERROR(cudaMemsetAsync(cbuf, 0, bhT * sizeof(float), stream));
    if (acc_dq != nullptr) FA_RETURN_IF_ERROR(cudaMemsetAsync(acc_dq, 0, bhT * n.D * sizeof(float), stream));
    if (acc_dk != nullptr) FA_RETURN_IF_ERROR(cudaMemsetAsync(acc_dk, 0, bhT * n.D * sizeof(float), stream));
    if (acc_dv != nullptr)
      FA_RETURN_IF_ERROR(cudaMemsetAsync(acc_dv, 0, static_cast<size_t>(n.B * n.Hv * n.T * n.Dv) * sizeof(float),
                                         stream));
    // 1. forward states entering each segment (recomputed)
    FA_RETURN_IF_ERROR((launch_seg_sum<scalar_t, DK>(n, p, prm.k, prm.v, n.H / n.Hv, prm.key_mask, LaView{}, nullptr, nz,
                                              ws, stream, prm.tensor_cores)));
    FA_RETURN_IF_ERROR(launch_scan(n, p, nz, false, ws, prm.S0, nz ? prm.z0 : LaView{}, LaView{}, LaView{}, stream));
    // 2. dq and c
    ChunkArgs c = chunk_args(n, p, Dp, prm.causal, nz, prm.eps);
    c.q = prm.q; c.k = prm.k; c.v = prm.v; c.key_mask = prm.key_mask;
    c.dout = prm.dout; c.den = prm.den;
    c.out = prm.dq;
    c.ws = ws; c.cbuf = cbuf; c.acc = acc_dq;
    const size_t smem = static_cast<size_t>(chunk_smem(Dp, DK + 1, true).total) * sizeof(float);
    FA_RETURN_IF_ERROR(launch_pass<scalar_t>(prm.tensor_cores, prm.max_smem_bytes, la_bwd_dq_mma_kernel<DK>,
                                             mma_smem_bytes(Dp, DK, kMmaDq), la_bwd_dq_kernel<scalar_t, DK>, smem,
                                             n, p, c, stream));
  }
  // 3. reverse states: per-segment sums of q^T g and c q, suffix over segments from (dS, dz); totals = dS0, dz0
  FA_RETURN_IF_ERROR((launch_seg_sum<scalar_t, DK>(n, p, prm.q, prm.dout, 1, LaView{}, nz ? prm.den : LaView{}, cbuf, nz,
                                            ws, stream, prm.tensor_cores)));
  FA_RETURN_IF_ERROR(launch_scan(n, p, nz, true, ws, prm.dS, nz ? prm.dz : LaView{}, prm.dS0,
                                 nz ? prm.dz0 : LaView{}, stream));
  if (n.T == 0) return cudaSuccess;
  // 4. dk and dv
  ChunkArgs c = chunk_args(n, p, Dp, prm.causal, nz, prm.eps);
  c.q = prm.q; c.k = prm.k; c.v = prm.v; c.key_mask = prm.key_mask;
  c.dout = prm.dout; c.den = prm.den;
  c.out = prm.dk; c.out2 = prm.dv;
  c.ws = ws; c.cbuf = cbuf; c.acc = acc_dk; c.acc2 = acc_dv;
  const size_t smem = static_cast<size_t>(chunk_smem(Dp, DK + 1, true).total) * sizeof(float);
  FA_RETURN_IF_ERROR(launch_pass<scalar_t>(prm.tensor_cores, prm.max_smem_bytes, la_bwd_dkdv_mma_kernel<DK>,
                                           mma_smem_bytes(Dp, DK, kMmaDkdv), la_bwd_dkdv_kernel<scalar_t, DK>, smem,
                                           n, p, c, stream));
  // 5. reductions across blocks -> outputs
  if (acc_dq != nullptr) FA_RETURN_IF_ERROR(launch_cast<scalar_t>(acc_dq, n.B, n.H, n.T, n.D, prm.dq, stream));
  if (acc_dk != nullptr) FA_RETURN_IF_ERROR(launch_cast<scalar_t>(acc_dk, n.B, n.H, n.T, n.D, prm.dk, stream));
  if (acc_dv != nullptr) FA_RETURN_IF_ERROR(launch_cast<scalar_t>(acc_dv, n.B, n.Hv, n.T, n.Dv, prm.dv, stream));
  return cudaSuccess;
}

// Runs fn<scalar_t, feature_subtile(tile)> for the smallest tile of FASTATTN_FEATURE_TILES that holds D.
#define FA_FWD_TILE(DT) \
  if (prm.n.D <= (DT)) return fwd_run<scalar_t, feature_subtile(DT)>(prm, p, stream);
#define FA_BWD_TILE(DT) \
  if (prm.n.D <= (DT)) return bwd_run<scalar_t, feature_subtile(DT)>(prm, p, stream);

template <typename scalar_t>
cudaError_t fwd_dispatch(const LaFwdParams& prm, const Plan& p, cudaStream_t stream) {
  FASTATTN_FEATURE_TILES(FA_FWD_TILE)
  return cudaErrorInvalidValue;
}

template <typename scalar_t>
cudaError_t bwd_dispatch(const LaBwdParams& prm, const Plan& p, cudaStream_t stream) {
  FASTATTN_FEATURE_TILES(FA_BWD_TILE)
  return cudaErrorInvalidValue;
}

#undef FA_FWD_TILE
#undef FA_BWD_TILE

}  // namespace

size_t linear_attn_fwd_workspace_bytes(const LaFwdParams& p) {
  if (!sizes_ok(p.n)) return 0;
  return ws_layout(p.n, make_plan(p.n, p.num_sms), false, p.normalize).total;
}

size_t linear_attn_bwd_workspace_bytes(const LaBwdParams& p) {
  if (!sizes_ok(p.n)) return 0;
  return ws_layout(p.n, make_plan(p.n, p.num_sms), true, p.normalize).total;
}

cudaError_t linear_attn_fwd(const LaFwdParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n)) return cudaErrorInvalidValue;
  if (p.n.B * p.n.H == 0) return cudaSuccess;
  const Plan plan = make_plan(p.n, p.num_sms);
  if (p.workspace == nullptr || p.workspace_bytes < ws_layout(p.n, plan, false, p.normalize).total)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case LaDtype::kFloat32: return fwd_dispatch<float>(p, plan, stream);
    case LaDtype::kFloat16: return fwd_dispatch<__half>(p, plan, stream);
    case LaDtype::kBFloat16: return fwd_dispatch<__nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t linear_attn_bwd(const LaBwdParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n)) return cudaErrorInvalidValue;
  if (p.n.B * p.n.H == 0) return cudaSuccess;
  if (p.normalize && p.n.T > 0 && p.den.data == nullptr) return cudaErrorInvalidValue;
  const Plan plan = make_plan(p.n, p.num_sms);
  if (p.workspace == nullptr || p.workspace_bytes < ws_layout(p.n, plan, true, p.normalize).total)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case LaDtype::kFloat32: return bwd_dispatch<float>(p, plan, stream);
    case LaDtype::kFloat16: return bwd_dispatch<__half>(p, plan, stream);
    case LaDtype::kBFloat16: return bwd_dispatch<__nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t linear_attn_step(const LaStepParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.Hv < 1 || p.H % p.Hv != 0 || p.D < 1 || p.D > kMaxD || p.Dv < 1 || p.Dv > kMaxDv)
    return cudaErrorInvalidValue;
  if (p.normalize && p.z.data == nullptr) return cudaErrorInvalidValue;
  if (p.B * p.H == 0) return cudaSuccess;
  StepArgs s{};
  s.H = p.H; s.G = p.H / p.Hv; s.D = p.D; s.Dv = p.Dv;
  s.normalize = p.normalize; s.eps = p.eps;
  s.q = p.q; s.k = p.k; s.v = p.v; s.S = p.S; s.z = p.z; s.o = p.o;
  const unsigned grid = static_cast<unsigned>(p.B * p.H);
  switch (p.dtype) {
    case LaDtype::kFloat32: la_step_kernel<float><<<grid, kThreads, 0, stream>>>(s); break;
    case LaDtype::kFloat16: la_step_kernel<__half><<<grid, kThreads, 0, stream>>>(s); break;
    case LaDtype::kBFloat16: la_step_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(s); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastattn
