// Linear attention on tensor cores (bf16 inputs): the forward's chunk pass and segment sums and the backward's dq
// and dk / dv passes, included by linear_attn.cu. Besides the CUDA compile they build on the host with tests/cuda_emu/ (WMMA and the thread block
// emulated by g++), whose test runs them against an fp64 reference.
#pragma once

#include <cuda_bf16.h>
#ifndef FASTATTN_CUDA_EMU
#include <mma.h>
#endif

#include <cstddef>
#include <cstdint>

#include "linear_attn_common.cuh"

namespace fastattn {
namespace cuda {
namespace {

// Pass 3 of the forward on tensor cores (bf16 inputs; opt-in: LaFwdParams::tensor_cores). The same math and
// block layout as la_fwd_chunk_kernel, with every block product a WMMA (16 x 16 x 16 bf16 fragments, fp32
// accumulators) on bf16 tiles in shared memory: A = Q K^T and the update K^T V are exact bf16 products; the fp32
// operands (the state S for O += Q S, the masked scores A for O += A V) are split into bf16 hi + lo parts (two
// products, ~16 bits), as the Triton kernels do. The 8 warps share the C x 64 outputs (A and O: warp w owns 16-row
// tile row w / 2 and 16-column tiles 2 (w % 2), 2 (w % 2) + 1) and the DK x 64 state update (tile t to warp t % 8).
// Shared memory (bytes): S fp32 Dp x 68, z Dp, the DK-row slice of S as bf16 hi / lo (DK x 72 each), Q and K
// C x (DK + 8), V C x 72, A (and then O) fp32 C x 68, A's bf16 hi / lo C x 72, three per-token vectors.
constexpr int kLdH = kBV + 8;   // bf16 row pitch: a multiple of 8 elements (WMMA), staggered banks
constexpr int kLdF = kBV + 4;   // fp32 row pitch: a multiple of 4 elements (WMMA)

struct MmaSmem {
  size_t S, z, Shi, Slo, Q, K, V, A, Ahi, Alo, keep, qz, rs, total;
};
__host__ __device__ __forceinline__ size_t align128(size_t x) { return (x + 127) / 128 * 128; }
__host__ __device__ __forceinline__ MmaSmem mma_smem(int Dp, int DK) {
  MmaSmem L{};
  size_t o = 0;
  const size_t h = sizeof(__nv_bfloat16), f = sizeof(float);
  L.S = o;    o = align128(o + static_cast<size_t>(Dp) * kLdF * f);
  L.z = o;    o = align128(o + static_cast<size_t>(Dp) * f);
  L.Shi = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Slo = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Q = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.K = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.V = o;    o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.A = o;    o = align128(o + static_cast<size_t>(kC) * kLdF * f);
  L.Ahi = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.Alo = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.keep = o; o = align128(o + kC * f);
  L.qz = o;   o = align128(o + kC * f);
  L.rs = o;   o = align128(o + kC * f);
  L.total = o;
  return L;
}

// Copies a ROWS x COLS tile of a strided bf16 matrix into bf16 shared memory with row pitch ld (a multiple of 8),
// zeros outside nrows x ncols and in rows with keep[r] == 0 (keep: shared memory or nullptr). Rows of contiguous,
// 16-byte aligned elements with ncols a multiple of 8 move 8 elements (16 bytes) a load.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile_bf16(__nv_bfloat16* __restrict__ dst, int ld,
                                               const __nv_bfloat16* __restrict__ src, int64_t row_stride,
                                               int64_t col_stride, int nrows, int ncols, const float* keep) {
  constexpr int kVec = 8;
  if (col_stride == 1 && ncols % kVec == 0 && row_stride % kVec == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    for (int idx = threadIdx.x; idx < ROWS * COLS / kVec; idx += kThreads) {
      const int r = idx / (COLS / kVec), c = idx % (COLS / kVec) * kVec;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows && c < ncols && (keep == nullptr || keep[r] != 0.f))
        x = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
    }
    return;
  }
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = idx / COLS, c = idx % COLS;
    const bool in = r < nrows && c < ncols && (keep == nullptr || keep[r] != 0.f);
    dst[r * ld + c] = in ? src[r * row_stride + c * col_stride] : __float2bfloat16_rn(0.f);
  }
}

#ifdef FASTATTN_CUDA_EMU
using emu::dynamic_smem;   // the host emulation's block-wide buffer (tests/cuda_emu/emu.h)
#else
// The block's dynamic shared memory, 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  return smem_raw;
}
#endif

// (hi, lo) bf16 parts of x: hi + lo holds ~16 bits of x.
__device__ __forceinline__ void split_bf16(float x, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  *hi = h;
  *lo = __float2bfloat16_rn(x - __bfloat162float(h));
}

template <int DK>
__global__ void __launch_bounds__(kThreads, 1) la_fwd_chunk_mma_kernel(const ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80+; the host never launches this kernel on older GPUs
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
  using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
  using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr int LDQ = DK + 8;
  constexpr int kWarps = kThreads / 32;
  unsigned char* smem_raw = dynamic_smem();
  const MmaSmem L = mma_smem(a.Dp, DK);
  float* __restrict__ S_s = reinterpret_cast<float*>(smem_raw + L.S);
  float* __restrict__ z_s = reinterpret_cast<float*>(smem_raw + L.z);
  bf16* __restrict__ Shi = reinterpret_cast<bf16*>(smem_raw + L.Shi);
  bf16* __restrict__ Slo = reinterpret_cast<bf16*>(smem_raw + L.Slo);
  bf16* __restrict__ Q_s = reinterpret_cast<bf16*>(smem_raw + L.Q);
  bf16* __restrict__ K_s = reinterpret_cast<bf16*>(smem_raw + L.K);
  bf16* __restrict__ V_s = reinterpret_cast<bf16*>(smem_raw + L.V);
  float* __restrict__ A_s = reinterpret_cast<float*>(smem_raw + L.A);
  bf16* __restrict__ Ahi = reinterpret_cast<bf16*>(smem_raw + L.Ahi);
  bf16* __restrict__ Alo = reinterpret_cast<bf16*>(smem_raw + L.Alo);
  float* __restrict__ keep_s = reinterpret_cast<float*>(smem_raw + L.keep);
  float* __restrict__ qz_s = reinterpret_cast<float*>(smem_raw + L.qz);
  float* __restrict__ rs_s = reinterpret_cast<float*>(smem_raw + L.rs);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // this warp's output tiles: row tr, columns tc and tc + 1
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
    S_s[d * kLdF + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads) z_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const bf16* qb = static_cast<const bf16*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const bf16* kb = static_cast<const bf16*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const bf16* vb = static_cast<const bf16*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  bf16* ob = static_cast<bf16*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1] + v0 * a.out.s[3];
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  float* denb = (a.normalize && vt == 0) ? static_cast<float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1]
                                         : nullptr;
  const bool vec_out = a.out.s[3] == 1 && nv % 8 == 0 && a.out.s[2] % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(ob) % 16 == 0;

  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with keep_s, V_s, A_s and the per-token vectors
    if (tid < kC)
      keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
    __syncthreads();
    if (a.causal) load_tile_bf16<kC, kBV>(V_s, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, keep_s);

    FragC accA[2], accO[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(accA[j], 0.f);
      wmma::fill_fragment(accO[j], 0.f);
    }
    float qz = 0.f;   // q_t . z_enter for t = tid (tid < C)
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // the previous sub-tile's Q_s, K_s, Shi, Slo reads and state update are done
      load_tile_bf16<kC, DK>(Q_s, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
      if (a.causal)
        load_tile_bf16<kC, DK>(K_s, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, keep_s);
      for (int idx = tid; idx < DK * kBV; idx += kThreads) {   // S rows [d0, d0 + DK) entering this chunk
        const int d = idx / kBV, e = idx % kBV;
        split_bf16(S_s[(d0 + d) * kLdF + e], Shi + d * kLdH + e, Slo + d * kLdH + e);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < DK; kk += 16) {
        FragA fq;
        wmma::load_matrix_sync(fq, Q_s + tr * 16 * LDQ + kk, LDQ);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n0 = (tc + j) * 16;
          if (a.causal) {   // A[t][s] += sum_d Q[t][d] K[s][d]: K_s read as the column-major K^T
            FragBT fk;
            wmma::load_matrix_sync(fk, K_s + n0 * LDQ + kk, LDQ);
            wmma::mma_sync(accA[j], fq, fk, accA[j]);
          }
          FragB fs;   // O[t][e] += sum_d Q[t][d] (S_hi + S_lo)[d0 + d][e]
          wmma::load_matrix_sync(fs, Shi + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accO[j], fq, fs, accO[j]);
          wmma::load_matrix_sync(fs, Slo + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accO[j], fq, fs, accO[j]);
        }
      }
      if (a.normalize && tid < kC) {
        for (int d = 0; d < DK; ++d) qz = fmaf(__bfloat162float(Q_s[tid * LDQ + d]), z_s[d0 + d], qz);
      }
      if (a.causal) {
        __syncthreads();  // z_s rows [d0, d0 + DK) are read (qz) before their update
        // S[d0 + d][e] += sum_t K[t][d] V[t][e]: K_s read as the column-major K^T, the fp32 tile updated in place
        for (int t = warp; t < (DK / 16) * (kBV / 16); t += kWarps) {
          const int m0 = (t / (kBV / 16)) * 16, n0 = (t % (kBV / 16)) * 16;
          FragC fsum;
          wmma::load_matrix_sync(fsum, S_s + (d0 + m0) * kLdF + n0, kLdF, wmma::mem_row_major);
#pragma unroll
          for (int kk = 0; kk < kC; kk += 16) {
            FragAT fkt;
            FragB fv;
            wmma::load_matrix_sync(fkt, K_s + kk * LDQ + m0, LDQ);
            wmma::load_matrix_sync(fv, V_s + kk * kLdH + n0, kLdH);
            wmma::mma_sync(fsum, fkt, fv, fsum);
          }
          wmma::store_matrix_sync(S_s + (d0 + m0) * kLdF + n0, fsum, kLdF, wmma::mem_row_major);
        }
        if (a.normalize && tid < DK) {
          float s = 0.f;
          for (int t = 0; t < kC; ++t) s += __bfloat162float(K_s[t * LDQ + tid]);
          z_s[d0 + tid] += s;
        }
      }
    }
    if (tid < kC) qz_s[tid] = qz;

    if (a.causal) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(A_s + tr * 16 * kLdF + (tc + j) * 16, accA[j], kLdF, wmma::mem_row_major);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {   // tril(A) as bf16 hi + lo
        const int t = idx / kC, s2 = idx % kC;
        split_bf16(s2 <= t ? A_s[t * kLdF + s2] : 0.f, Ahi + t * kLdH + s2, Alo + t * kLdH + s2);
      }
      if (tid < kC) {
        float r = 0.f;
        for (int s2 = 0; s2 <= tid; ++s2) r += A_s[tid * kLdF + s2];
        rs_s[tid] = r;   // sum_{s<=t} q_t . k_s
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {   // O[t][e] += sum_s (A_hi + A_lo)[t][s] V[s][e]
        FragA fh, fl;
        wmma::load_matrix_sync(fh, Ahi + tr * 16 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fl, Alo + tr * 16 * kLdH + kk, kLdH);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          FragB fv;
          wmma::load_matrix_sync(fv, V_s + kk * kLdH + (tc + j) * 16, kLdH);
          wmma::mma_sync(accO[j], fh, fv, accO[j]);
          wmma::mma_sync(accO[j], fl, fv, accO[j]);
        }
      }
      __syncthreads();  // A_s is read (row sums) before O overwrites it
    } else if (tid < kC) {
      rs_s[tid] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(A_s + tr * 16 * kLdF + (tc + j) * 16, accO[j], kLdF, wmma::mem_row_major);
    __syncthreads();
    if (vec_out) {   // 8 outputs (16 bytes) a store
      for (int idx = tid; idx < kC * kBV / 8; idx += kThreads) {
        const int t = idx / (kBV / 8), e = idx % (kBV / 8) * 8;
        if (t >= nt || e >= nv) continue;
        const float dn = qz_s[t] + rs_s[t] + a.eps;
        alignas(16) __nv_bfloat16 pack[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = A_s[t * kLdF + e + i];
          pack[i] = __float2bfloat16_rn(a.normalize ? x / dn : x);
        }
        *reinterpret_cast<uint4*>(ob + (t0 + t) * a.out.s[2] + e) = *reinterpret_cast<const uint4*>(pack);
      }
    } else {
      for (int idx = tid; idx < kC * kBV; idx += kThreads) {
        const int t = idx / kBV, e = idx % kBV;
        if (t >= nt || e >= nv) continue;
        const float x = A_s[t * kLdF + e];
        ob[(t0 + t) * a.out.s[2] + e * a.out.s[3]] =
            __float2bfloat16_rn(a.normalize ? x / (qz_s[t] + rs_s[t] + a.eps) : x);
      }
    }
    if (denb != nullptr && tid < nt) denb[(t0 + tid) * a.den.s[2]] = qz_s[tid] + rs_s[tid] + a.eps;
  }
#endif
}

// Pass 1 of the forward on tensor cores (bf16; the forward's use only: no den, no z weights). Block (bh, seg,
// dtile * nvt + vtile), as la_seg_sum_kernel: out[d][e] = sum_t keep_t x_t[d] y_t[e], out_z[d] = sum_t keep_t
// x_t[d], over the segment's chunks; X^T Y as exact bf16 products into fp32 fragments, tile t of the DK x 64 sum
// to warp t % 8 (DK = 64: two a warp). Static shared memory: X C x (DK + 8), Y C x 72 (bf16), the sum's fp32
// staging DK x 68, the keep flags.
template <int DK>
__global__ void __launch_bounds__(kThreads) la_seg_sum_mma_kernel(const SegArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDX = DK + 8;
  constexpr int kTiles = (DK / 16) * (kBV / 16);
  constexpr int kWarps = kThreads / 32;
  constexpr int kPer = (kTiles + kWarps - 1) / kWarps;   // accumulator tiles a warp holds (1 or 2)
  __shared__ __align__(128) bf16 X_s[kC * LDX];
  __shared__ __align__(128) bf16 Y_s[kC * kLdH];
  __shared__ __align__(128) float O_s[DK * kLdF];
  __shared__ float keep_s[kC];

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y;
  const int dtile = blockIdx.z / a.nvt, vtile = blockIdx.z % a.nvt;
  const int64_t b = bh / a.H, h = bh % a.H, hy = h / a.ygroup;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv);
  const int d0 = dtile * DK, v0 = vtile * kBV;
  const int nd = imin(DK, D - d0), nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;
  const bf16* xb = static_cast<const bf16*>(a.x.data) + b * a.x.s[0] + h * a.x.s[1] + d0 * a.x.s[3];
  const bf16* yb = static_cast<const bf16*>(a.y.data) + b * a.y.s[0] + hy * a.y.s[1] + v0 * a.y.s[3];
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  const bool do_z = a.with_z && vtile == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) wmma::fill_fragment(acc[i], 0.f);
  float zacc = 0.f;
  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk's tiles are no longer read
    if (tid < kC) keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
    __syncthreads();
    load_tile_bf16<kC, DK>(X_s, LDX, xb + t0 * a.x.s[2], a.x.s[2], a.x.s[3], nt, nd, keep_s);
    load_tile_bf16<kC, kBV>(Y_s, kLdH, yb + t0 * a.y.s[2], a.y.s[2], a.y.s[3], nt, nv, keep_s);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {   // sum[d][e] += sum_t X[t][d] Y[t][e]: X_s read as the column-major X^T
      const int t = warp + i * kWarps;
      if (t >= kTiles) break;
      const int m0 = t / (kBV / 16) * 16, n0 = t % (kBV / 16) * 16;
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fx;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fy;
        wmma::load_matrix_sync(fx, X_s + kk * LDX + m0, LDX);
        wmma::load_matrix_sync(fy, Y_s + kk * kLdH + n0, kLdH);
        wmma::mma_sync(acc[i], fx, fy, acc[i]);
      }
    }
    if (do_z && tid < DK) {
      for (int t = 0; t < kC; ++t) zacc += __bfloat162float(X_s[t * LDX + tid]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int t = warp + i * kWarps;
    if (t >= kTiles) break;
    wmma::store_matrix_sync(O_s + t / (kBV / 16) * 16 * kLdF + t % (kBV / 16) * 16, acc[i], kLdF,
                            wmma::mem_row_major);
  }
  __syncthreads();
  float* out = a.ws + (bh * (a.NS + 1) + seg) * a.slot;
  for (int idx = tid; idx < DK * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    if (d < nd && e < nv) out[static_cast<int64_t>(d0 + d) * Dv + v0 + e] = O_s[d * kLdF + e];
  }
  if (do_z && tid < nd) out[static_cast<int64_t>(D) * Dv + d0 + tid] = zacc;
#endif
}

// Shared memory of la_bwd_dq_mma_kernel (bytes): S fp32 Dp x 68 and z Dp (the forward state entering the
// segment), the DK-row slice of S as bf16 hi / lo, Q and K C x (DK + 8), do and V C x 72 (bf16), P fp32 C x 68
// and its bf16 hi / lo, the two fp32 parts of u C x (DK + 4), four per-token vectors.
struct MmaDqSmem {
  size_t S, z, Shi, Slo, Q, K, Do, V, P, Phi, Plo, U1, U2, keep, rden, c, qu, total;
};
__host__ __device__ __forceinline__ MmaDqSmem mma_dq_smem(int Dp, int DK) {
  MmaDqSmem L{};
  size_t o = 0;
  const size_t h = sizeof(__nv_bfloat16), f = sizeof(float);
  L.S = o;    o = align128(o + static_cast<size_t>(Dp) * kLdF * f);
  L.z = o;    o = align128(o + static_cast<size_t>(Dp) * f);
  L.Shi = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Slo = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Q = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.K = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.Do = o;   o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.V = o;    o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.P = o;    o = align128(o + static_cast<size_t>(kC) * kLdF * f);
  L.Phi = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.Plo = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.U1 = o;   o = align128(o + static_cast<size_t>(kC) * (DK + 4) * f);
  L.U2 = o;   o = align128(o + static_cast<size_t>(kC) * (DK + 4) * f);
  L.keep = o; o = align128(o + kC * f);
  L.rden = o; o = align128(o + kC * f);
  L.c = o;    o = align128(o + kC * f);
  L.qu = o;   o = align128(o + kC * f);
  L.total = o;
  return L;
}

// u = P K_d (P fp32 as hi + lo) into U1 and do S_d^T (the slice of S as hi + lo) into U2, C x DK, for the
// warp's tiles (tile t to warp t % 8); the caller combines u = U1 + U2 / den. causal false: U1 is not written.
template <int DK>
__device__ __forceinline__ void dq_u_tiles(bool causal, const __nv_bfloat16* Phi, const __nv_bfloat16* Plo,
                                           const __nv_bfloat16* K_s, const __nv_bfloat16* Do_s,
                                           const __nv_bfloat16* Shi, const __nv_bfloat16* Slo, float* U1, float* U2) {
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDQ = DK + 8, LDU = DK + 4, kTiles = (kC / 16) * (DK / 16), kWarps = kThreads / 32;
  const int warp = threadIdx.x >> 5;
  for (int t = warp; t < kTiles; t += kWarps) {
    const int m0 = t / (DK / 16) * 16, n0 = t % (DK / 16) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (causal) {   // U1[t][d] = sum_s P[t][s] K[s][d]
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fh, fl;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fk;
        wmma::load_matrix_sync(fh, Phi + m0 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fl, Plo + m0 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fk, K_s + kk * LDQ + n0, LDQ);
        wmma::mma_sync(acc, fh, fk, acc);
        wmma::mma_sync(acc, fl, fk, acc);
      }
      wmma::store_matrix_sync(U1 + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
    }
    wmma::fill_fragment(acc, 0.f);   // U2[t][d] = sum_e do[t][e] S[d0 + d][e]: the S slice read as column-major S^T
#pragma unroll
    for (int kk = 0; kk < kBV; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fd;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fh, fl;
      wmma::load_matrix_sync(fd, Do_s + m0 * kLdH + kk, kLdH);
      wmma::load_matrix_sync(fh, Shi + n0 * kLdH + kk, kLdH);
      wmma::load_matrix_sync(fl, Slo + n0 * kLdH + kk, kLdH);
      wmma::mma_sync(acc, fd, fh, acc);
      wmma::mma_sync(acc, fd, fl, acc);
    }
    wmma::store_matrix_sync(U2 + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
  }
}

// Backward pass 2 (dq and c) on tensor cores (bf16; opt-in: LaBwdParams::tensor_cores), the math of
// la_bwd_dq_kernel: G = do / den is kept as bf16 do with 1/den applied per row after each product, so every
// product has an exact bf16 side; P = tril(G V^T) (+ c on the triangle in loop 2) and the state slice S_d enter
// the products as bf16 hi + lo. Loop 1 (normalize): c_t = -(q_t . u_t) / den_t, u = P K_d + G S_d^T; loop 2:
// dq_d = P K_d + G S_d^T + c z_d, then S_d += K_d^T V and z_d += K_d^T 1.
template <int DK>
__global__ void __launch_bounds__(kThreads, 1) la_bwd_dq_mma_kernel(const ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDQ = DK + 8, LDU = DK + 4, kWarps = kThreads / 32;
  unsigned char* smem_raw = dynamic_smem();
  const MmaDqSmem L = mma_dq_smem(a.Dp, DK);
  float* __restrict__ S_s = reinterpret_cast<float*>(smem_raw + L.S);
  float* __restrict__ z_s = reinterpret_cast<float*>(smem_raw + L.z);
  bf16* __restrict__ Shi = reinterpret_cast<bf16*>(smem_raw + L.Shi);
  bf16* __restrict__ Slo = reinterpret_cast<bf16*>(smem_raw + L.Slo);
  bf16* __restrict__ Q_s = reinterpret_cast<bf16*>(smem_raw + L.Q);
  bf16* __restrict__ K_s = reinterpret_cast<bf16*>(smem_raw + L.K);
  bf16* __restrict__ Do_s = reinterpret_cast<bf16*>(smem_raw + L.Do);
  bf16* __restrict__ V_s = reinterpret_cast<bf16*>(smem_raw + L.V);
  float* __restrict__ P_s = reinterpret_cast<float*>(smem_raw + L.P);
  bf16* __restrict__ Phi = reinterpret_cast<bf16*>(smem_raw + L.Phi);
  bf16* __restrict__ Plo = reinterpret_cast<bf16*>(smem_raw + L.Plo);
  float* __restrict__ U1 = reinterpret_cast<float*>(smem_raw + L.U1);
  float* __restrict__ U2 = reinterpret_cast<float*>(smem_raw + L.U2);
  float* __restrict__ keep_s = reinterpret_cast<float*>(smem_raw + L.keep);
  float* __restrict__ rden_s = reinterpret_cast<float*>(smem_raw + L.rden);
  float* __restrict__ c_s = reinterpret_cast<float*>(smem_raw + L.c);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // P's tiles: row tr, columns tc and tc + 1
  const int64_t bh = blockIdx.x;
  const int seg = blockIdx.y, vt = blockIdx.z;
  const int64_t b = bh / a.H, h = bh % a.H, hv = h / a.G;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv), Dp = a.Dp;
  const int v0 = vt * kBV, nv = imin(kBV, Dv - v0);
  const int64_t T = a.T;

  const float* st = a.ws + (bh * (a.NS + 1) + (a.causal ? seg : a.NS)) * a.slot;
  for (int idx = tid; idx < Dp * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    S_s[d * kLdF + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads) z_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const bf16* qb = static_cast<const bf16*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const bf16* kb = static_cast<const bf16*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const bf16* vb = static_cast<const bf16*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  const bf16* gb = static_cast<const bf16*>(a.dout.data) + b * a.dout.s[0] + h * a.dout.s[1] + v0 * a.dout.s[3];
  const float* denb = a.normalize ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  bf16* dqb = static_cast<bf16*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1];
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
      c_s[tid] = 0.f;
    }
    __syncthreads();
    load_tile_bf16<kC, kBV>(Do_s, kLdH, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, nullptr);
    if (a.causal) load_tile_bf16<kC, kBV>(V_s, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, keep_s);
    __syncthreads();
    if (a.causal) {   // P[t][s] = tril(do_t . v_s) / den_t: do_s V^T with V_s read as the column-major V^T
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < kBV; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fd;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fv;
          wmma::load_matrix_sync(fd, Do_s + tr * 16 * kLdH + kk, kLdH);
          wmma::load_matrix_sync(fv, V_s + (tc + j) * 16 * kLdH + kk, kLdH);
          wmma::mma_sync(acc, fd, fv, acc);
        }
        wmma::store_matrix_sync(P_s + tr * 16 * kLdF + (tc + j) * 16, acc, kLdF, wmma::mem_row_major);
      }
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int t = idx / kC, s2 = idx % kC;
        const float x = s2 <= t ? P_s[t * kLdF + s2] * rden_s[t] : 0.f;
        P_s[t * kLdF + s2] = x;
        split_bf16(x, Phi + t * kLdH + s2, Plo + t * kLdH + s2);
      }
    }

    if (a.normalize) {   // loop 1: c_t = -(q_t . u_t) / den_t from the fp32 u (never from the rounded o)
      float qu = 0.f;    // for t = tid (tid < C)
      for (int d0 = 0; d0 < D; d0 += DK) {
        const int nd = imin(DK, D - d0);
        __syncthreads();  // Q_s, K_s, the S slice and U are free; P's parts are written
        load_tile_bf16<kC, DK>(Q_s, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
        if (a.causal)
          load_tile_bf16<kC, DK>(K_s, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, keep_s);
        for (int idx = tid; idx < DK * kBV; idx += kThreads) {
          const int d = idx / kBV, e = idx % kBV;
          split_bf16(S_s[(d0 + d) * kLdF + e], Shi + d * kLdH + e, Slo + d * kLdH + e);
        }
        __syncthreads();
        dq_u_tiles<DK>(a.causal, Phi, Plo, K_s, Do_s, Shi, Slo, U1, U2);
        __syncthreads();
        if (tid < kC) {
          const float r = rden_s[tid];
          for (int d = 0; d < DK; ++d) {
            const float u = (a.causal ? U1[tid * LDU + d] : 0.f) + r * U2[tid * LDU + d];
            qu = fmaf(__bfloat162float(Q_s[tid * LDQ + d]), u, qu);
          }
        }
      }
      if (tid < kC) {
        const float ct = -qu * rden_s[tid];   // 0 for rows t >= nt (rden 0)
        c_s[tid] = ct;
        if (tid < nt) {
          if (a.nvt == 1) cb[t0 + tid] = ct;
          else atomicAdd(cb + t0 + tid, ct);
        }
      }
      __syncthreads();  // c_s visible; loop 1 no longer reads P's parts
      if (a.causal) {
        for (int idx = tid; idx < kC * kC; idx += kThreads) {
          const int t = idx / kC, s2 = idx % kC;
          if (s2 <= t) split_bf16(P_s[t * kLdF + s2] + c_s[t], Phi + t * kLdH + s2, Plo + t * kLdH + s2);
        }
      }
    }

    // loop 2: dq = P K + G S^T + c z_enter, then the state update
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // K_s, the S slice and U are free; P's parts (with c) and c_s are visible
      if (a.causal)
        load_tile_bf16<kC, DK>(K_s, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, keep_s);
      for (int idx = tid; idx < DK * kBV; idx += kThreads) {
        const int d = idx / kBV, e = idx % kBV;
        split_bf16(S_s[(d0 + d) * kLdF + e], Shi + d * kLdH + e, Slo + d * kLdH + e);
      }
      __syncthreads();
      dq_u_tiles<DK>(a.causal, Phi, Plo, K_s, Do_s, Shi, Slo, U1, U2);
      __syncthreads();
      for (int idx = tid; idx < kC * DK; idx += kThreads) {
        const int t = idx / DK, d = idx % DK;
        if (t >= nt || d >= nd) continue;
        const float x = (a.causal ? U1[t * LDU + d] : 0.f) + rden_s[t] * U2[t * LDU + d] + c_s[t] * z_s[d0 + d];
        if (accb != nullptr) atomicAdd(accb + (t0 + t) * a.D + d0 + d, x);
        else dqb[(t0 + t) * a.out.s[2] + (d0 + d) * a.out.s[3]] = __float2bfloat16_rn(x);
      }
      if (a.causal) {
        __syncthreads();  // every read of the S slice's rows and of z_s[d0 ..] for this chunk is done
        for (int t = warp; t < (DK / 16) * (kBV / 16); t += kWarps) {   // S_d += K_d^T V
          const int m0 = (t / (kBV / 16)) * 16, n0 = (t % (kBV / 16)) * 16;
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> fsum;
          wmma::load_matrix_sync(fsum, S_s + (d0 + m0) * kLdF + n0, kLdF, wmma::mem_row_major);
#pragma unroll
          for (int kk = 0; kk < kC; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fkt;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fv;
            wmma::load_matrix_sync(fkt, K_s + kk * LDQ + m0, LDQ);
            wmma::load_matrix_sync(fv, V_s + kk * kLdH + n0, kLdH);
            wmma::mma_sync(fsum, fkt, fv, fsum);
          }
          wmma::store_matrix_sync(S_s + (d0 + m0) * kLdF + n0, fsum, kLdF, wmma::mem_row_major);
        }
        if (a.normalize && tid < DK) {
          float s2 = 0.f;
          for (int t = 0; t < kC; ++t) s2 += __bfloat162float(K_s[t * LDQ + tid]);
          z_s[d0 + tid] += s2;
        }
      }
    }
  }
#endif
}

// Shared memory of la_bwd_dkdv_mma_kernel (bytes): R fp32 Dp x 68 and r Dp (the reverse state entering the
// segment from the right), the DK-row slice of R as bf16 hi / lo, Q and K C x (DK + 8), do and V C x 72 (bf16),
// P' (later tril(A) / den) fp32 C x 68 and its bf16 hi / lo, G = do / den as bf16 hi / lo, dk's tile C x (DK + 4)
// fp32, three per-token vectors.
struct MmaDkdvSmem {
  size_t R, r, Rhi, Rlo, Q, K, Do, V, P, Phi, Plo, Ghi, Glo, U, keep, rden, c, total;
};
__host__ __device__ __forceinline__ MmaDkdvSmem mma_dkdv_smem(int Dp, int DK) {
  MmaDkdvSmem L{};
  size_t o = 0;
  const size_t h = sizeof(__nv_bfloat16), f = sizeof(float);
  L.R = o;    o = align128(o + static_cast<size_t>(Dp) * kLdF * f);
  L.r = o;    o = align128(o + static_cast<size_t>(Dp) * f);
  L.Rhi = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Rlo = o;  o = align128(o + static_cast<size_t>(DK) * kLdH * h);
  L.Q = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.K = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 8) * h);
  L.Do = o;   o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.V = o;    o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.P = o;    o = align128(o + static_cast<size_t>(kC) * kLdF * f);
  L.Phi = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.Plo = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.Ghi = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.Glo = o;  o = align128(o + static_cast<size_t>(kC) * kLdH * h);
  L.U = o;    o = align128(o + static_cast<size_t>(kC) * (DK + 4) * f);
  L.keep = o; o = align128(o + kC * f);
  L.rden = o; o = align128(o + kC * f);
  L.c = o;    o = align128(o + kC * f);
  L.total = o;
  return L;
}

// Backward pass 4 (dk and dv) on tensor cores (bf16; opt-in: LaBwdParams::tensor_cores), the math of
// la_bwd_dkdv_kernel, chunks walked last to first: P' = tril(G V^T) + c on the triangle; per D sub-tile
// dk_d = P'^T Q_d + V R_d^T + r_d, A += Q_d K_d^T, KR += K_d R_d, then R_d += Q_d^T G, r_d += Q_d^T c;
// dv = KR + (tril(A) / den)^T do. G V^T is do V^T with 1/den per row after; P', R_d, G and tril(A) / den enter
// the products as bf16 hi + lo, against exact bf16 sides (Q, K, V, do).
template <int DK>
__global__ void __launch_bounds__(kThreads, 1) la_bwd_dkdv_mma_kernel(const ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
  using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
  using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr int LDQ = DK + 8, LDU = DK + 4, kWarps = kThreads / 32;
  unsigned char* smem_raw = dynamic_smem();
  const MmaDkdvSmem L = mma_dkdv_smem(a.Dp, DK);
  float* __restrict__ R_s = reinterpret_cast<float*>(smem_raw + L.R);
  float* __restrict__ r_s = reinterpret_cast<float*>(smem_raw + L.r);
  bf16* __restrict__ Rhi = reinterpret_cast<bf16*>(smem_raw + L.Rhi);
  bf16* __restrict__ Rlo = reinterpret_cast<bf16*>(smem_raw + L.Rlo);
  bf16* __restrict__ Q_s = reinterpret_cast<bf16*>(smem_raw + L.Q);
  bf16* __restrict__ K_s = reinterpret_cast<bf16*>(smem_raw + L.K);
  bf16* __restrict__ Do_s = reinterpret_cast<bf16*>(smem_raw + L.Do);
  bf16* __restrict__ V_s = reinterpret_cast<bf16*>(smem_raw + L.V);
  float* __restrict__ P_s = reinterpret_cast<float*>(smem_raw + L.P);
  bf16* __restrict__ Phi = reinterpret_cast<bf16*>(smem_raw + L.Phi);
  bf16* __restrict__ Plo = reinterpret_cast<bf16*>(smem_raw + L.Plo);
  bf16* __restrict__ Ghi = reinterpret_cast<bf16*>(smem_raw + L.Ghi);
  bf16* __restrict__ Glo = reinterpret_cast<bf16*>(smem_raw + L.Glo);
  float* __restrict__ U_s = reinterpret_cast<float*>(smem_raw + L.U);
  float* __restrict__ keep_s = reinterpret_cast<float*>(smem_raw + L.keep);
  float* __restrict__ rden_s = reinterpret_cast<float*>(smem_raw + L.rden);
  float* __restrict__ c_s = reinterpret_cast<float*>(smem_raw + L.c);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // the C x C and C x 64 tiles: row tr, columns tc and tc + 1
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
    R_s[d * kLdF + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = tid; d < Dp; d += kThreads) r_s[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;

  const bf16* qb = static_cast<const bf16*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
  const bf16* kb = static_cast<const bf16*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
  const bf16* vb = static_cast<const bf16*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
  const bf16* gb = static_cast<const bf16*>(a.dout.data) + b * a.dout.s[0] + h * a.dout.s[1] + v0 * a.dout.s[3];
  const float* denb = a.normalize ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const unsigned char* mb =
      a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  const float* cb = a.normalize ? a.cbuf + bh * T : nullptr;
  bf16* dkb = static_cast<bf16*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1];
  bf16* dvb = static_cast<bf16*>(a.out2.data) + b * a.out2.s[0] + hv * a.out2.s[1] + v0 * a.out2.s[3];
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
    if (a.causal) load_tile_bf16<kC, kBV>(Do_s, kLdH, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, nullptr);
    load_tile_bf16<kC, kBV>(V_s, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, keep_s);
    __syncthreads();
    if (a.causal) {   // P'[t][s] = tril(do_t . v_s / den_t + c_t), G = do / den: both as bf16 hi + lo
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < kBV; kk += 16) {
          FragA fd;
          FragBT fv;
          wmma::load_matrix_sync(fd, Do_s + tr * 16 * kLdH + kk, kLdH);
          wmma::load_matrix_sync(fv, V_s + (tc + j) * 16 * kLdH + kk, kLdH);
          wmma::mma_sync(acc, fd, fv, acc);
        }
        wmma::store_matrix_sync(P_s + tr * 16 * kLdF + (tc + j) * 16, acc, kLdF, wmma::mem_row_major);
      }
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int t = idx / kC, s2 = idx % kC;
        const float x = s2 <= t ? P_s[t * kLdF + s2] * rden_s[t] + (with_c ? c_s[t] : 0.f) : 0.f;
        split_bf16(x, Phi + t * kLdH + s2, Plo + t * kLdH + s2);
        if (s2 < kBV)
          split_bf16(__bfloat162float(Do_s[t * kLdH + s2]) * rden_s[t], Ghi + t * kLdH + s2, Glo + t * kLdH + s2);
      }
    }

    FragC accA[2], accKR[2];   // A = Q K^T (C x C) and KR then dv (C x 64): tiles (tr, tc + j)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(accA[j], 0.f);
      wmma::fill_fragment(accKR[j], 0.f);
    }
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // Q_s, K_s, the R slice and U_s are free; P's and G's parts are written
      load_tile_bf16<kC, DK>(Q_s, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
      load_tile_bf16<kC, DK>(K_s, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, keep_s);
      for (int idx = tid; idx < DK * kBV; idx += kThreads) {
        const int d = idx / kBV, e = idx % kBV;
        split_bf16(R_s[(d0 + d) * kLdF + e], Rhi + d * kLdH + e, Rlo + d * kLdH + e);
      }
      __syncthreads();
      for (int t = warp; t < (kC / 16) * (DK / 16); t += kWarps) {   // dk tile: P'^T Q_d + V R_d^T
        const int m0 = t / (DK / 16) * 16, n0 = t % (DK / 16) * 16;
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
        if (a.causal) {
#pragma unroll
          for (int kk = 0; kk < kC; kk += 16) {   // sum_t P'[t][s] Q[t][d]: P' read as the column-major P'^T
            FragAT fh, fl;
            FragB fq;
            wmma::load_matrix_sync(fh, Phi + kk * kLdH + m0, kLdH);
            wmma::load_matrix_sync(fl, Plo + kk * kLdH + m0, kLdH);
            wmma::load_matrix_sync(fq, Q_s + kk * LDQ + n0, LDQ);
            wmma::mma_sync(acc, fh, fq, acc);
            wmma::mma_sync(acc, fl, fq, acc);
          }
        }
#pragma unroll
        for (int kk = 0; kk < kBV; kk += 16) {   // sum_e V[s][e] R[d0 + d][e]: the R slice read as column-major R^T
          FragA fv;
          FragBT fh, fl;
          wmma::load_matrix_sync(fv, V_s + m0 * kLdH + kk, kLdH);
          wmma::load_matrix_sync(fh, Rhi + n0 * kLdH + kk, kLdH);
          wmma::load_matrix_sync(fl, Rlo + n0 * kLdH + kk, kLdH);
          wmma::mma_sync(acc, fv, fh, acc);
          wmma::mma_sync(acc, fv, fl, acc);
        }
        wmma::store_matrix_sync(U_s + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
      }
#pragma unroll
      for (int kk = 0; kk < DK; kk += 16) {
        FragA fq, fk;
        wmma::load_matrix_sync(fq, Q_s + tr * 16 * LDQ + kk, LDQ);
        wmma::load_matrix_sync(fk, K_s + tr * 16 * LDQ + kk, LDQ);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n0 = (tc + j) * 16;
          if (a.causal) {   // A[t][s] += sum_d Q[t][d] K[s][d]: K_s read as the column-major K^T
            FragBT fkt;
            wmma::load_matrix_sync(fkt, K_s + n0 * LDQ + kk, LDQ);
            wmma::mma_sync(accA[j], fq, fkt, accA[j]);
          }
          FragB fh, fl;   // KR[s][e] += sum_d K[s][d] R[d0 + d][e]
          wmma::load_matrix_sync(fh, Rhi + kk * kLdH + n0, kLdH);
          wmma::load_matrix_sync(fl, Rlo + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accKR[j], fk, fh, accKR[j]);
          wmma::mma_sync(accKR[j], fk, fl, accKR[j]);
        }
      }
      __syncthreads();  // dk's tiles are in U_s
      for (int idx = tid; idx < kC * DK; idx += kThreads) {
        const int s2 = idx / DK, d = idx % DK;
        if (s2 >= nt || d >= nd) continue;
        const bool kept = keep_s[s2] != 0.f;
        const float x = U_s[s2 * LDU + d] + (with_c ? r_s[d0 + d] : 0.f);
        if (acck != nullptr) {
          if (kept) atomicAdd(acck + (t0 + s2) * a.D + d0 + d, x);
        } else {
          dkb[(t0 + s2) * a.out.s[2] + (d0 + d) * a.out.s[3]] = __float2bfloat16_rn(kept ? x : 0.f);
        }
      }
      if (a.causal) {
        __syncthreads();  // every read of r_s[d0 ..] for this chunk is done
        for (int t = warp; t < (DK / 16) * (kBV / 16); t += kWarps) {   // R_d += Q_d^T G
          const int m0 = (t / (kBV / 16)) * 16, n0 = (t % (kBV / 16)) * 16;
          FragC fsum;
          wmma::load_matrix_sync(fsum, R_s + (d0 + m0) * kLdF + n0, kLdF, wmma::mem_row_major);
#pragma unroll
          for (int kk = 0; kk < kC; kk += 16) {
            FragAT fqt;
            FragB fh, fl;
            wmma::load_matrix_sync(fqt, Q_s + kk * LDQ + m0, LDQ);
            wmma::load_matrix_sync(fh, Ghi + kk * kLdH + n0, kLdH);
            wmma::load_matrix_sync(fl, Glo + kk * kLdH + n0, kLdH);
            wmma::mma_sync(fsum, fqt, fh, fsum);
            wmma::mma_sync(fsum, fqt, fl, fsum);
          }
          wmma::store_matrix_sync(R_s + (d0 + m0) * kLdF + n0, fsum, kLdF, wmma::mem_row_major);
        }
        if (a.normalize && tid < DK) {
          float s2 = 0.f;
          for (int t = 0; t < kC; ++t) s2 = fmaf(__bfloat162float(Q_s[t * LDQ + tid]), c_s[t], s2);
          r_s[d0 + tid] += s2;
        }
      }
    }

    if (a.causal) {   // dv += (tril(A) / den)^T do
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(P_s + tr * 16 * kLdF + (tc + j) * 16, accA[j], kLdF, wmma::mem_row_major);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int t = idx / kC, s2 = idx % kC;
        split_bf16(s2 <= t ? P_s[t * kLdF + s2] * rden_s[t] : 0.f, Phi + t * kLdH + s2, Plo + t * kLdH + s2);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {   // sum_t A'[t][s] do[t][e]: A' read as the column-major A'^T
        FragAT fh, fl;
        wmma::load_matrix_sync(fh, Phi + kk * kLdH + tr * 16, kLdH);
        wmma::load_matrix_sync(fl, Plo + kk * kLdH + tr * 16, kLdH);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          FragB fd;
          wmma::load_matrix_sync(fd, Do_s + kk * kLdH + (tc + j) * 16, kLdH);
          wmma::mma_sync(accKR[j], fh, fd, accKR[j]);
          wmma::mma_sync(accKR[j], fl, fd, accKR[j]);
        }
      }
    }
    __syncthreads();  // P_s is free for dv's tiles
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(P_s + tr * 16 * kLdF + (tc + j) * 16, accKR[j], kLdF, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < kC * kBV; idx += kThreads) {
      const int s2 = idx / kBV, e = idx % kBV;
      if (s2 >= nt || e >= nv) continue;
      const float x = P_s[s2 * kLdF + e];
      if (accv != nullptr) atomicAdd(accv + (t0 + s2) * a.Dv + e, x);
      else dvb[(t0 + s2) * a.out2.s[2] + e * a.out2.s[3]] = __float2bfloat16_rn(x);
    }
  }
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn
