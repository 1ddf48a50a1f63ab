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

// Tile row pitches in shared memory.
constexpr int kLdH = kBV + 8;   // bf16 row pitch: a multiple of 8 elements (WMMA), staggered banks
constexpr int kLdF = kBV + 4;   // fp32 row pitch: a multiple of 4 elements (WMMA)

__host__ __device__ __forceinline__ size_t align128(size_t x) { return (x + 127) / 128 * 128; }

enum MmaPass { kMmaFwd = 0, kMmaDq = 1, kMmaDkdv = 2 };

// The shared-memory tiles of a tensor-core chunk pass, carved from the block's dynamic shared memory in 128-byte
// aligned pieces (pieces a pass does not use are empty). base nullptr: sizes only (bytes).
struct MmaTiles {
  float* S;          // the state (S, or R in the dk / dv pass), fp32 Dp x kLdF
  float* z;          // its z (or r), Dp
  __nv_bfloat16* Shi;   // the state's DK-row slice as bf16 hi / lo, DK x kLdH
  __nv_bfloat16* Slo;
  __nv_bfloat16* Q;     // C x (DK + 8)
  __nv_bfloat16* K;
  __nv_bfloat16* Do;    // do, C x kLdH (backward)
  __nv_bfloat16* V;
  float* P;          // C x C scores fp32 (forward: A = Q K^T; backward: P), C x kLdF
  __nv_bfloat16* Phi;   // their bf16 hi / lo, C x kLdH
  __nv_bfloat16* Plo;
  __nv_bfloat16* Ghi;   // do / den as bf16 hi / lo (dk / dv pass)
  __nv_bfloat16* Glo;
  float* U1;         // C x (DK + 4) products (backward; U2: dq pass)
  float* U2;
  float* keep;       // per-token vectors, C each: keep flags, 1 / den, c (forward: row sums of tril(A)),
  float* rden;       // qu (forward: q . z_enter)
  float* c;
  float* qu;
  size_t bytes;
};
__host__ __device__ __forceinline__ MmaTiles mma_tiles(unsigned char* base, int Dp, int DK, int pass) {
  MmaTiles t{};
  size_t o = 0;
  auto take = [&](size_t n) {
    const size_t at = o;
    o = align128(o + n);
    return base != nullptr ? base + at : nullptr;
  };
  auto f32 = [&](size_t n) { return reinterpret_cast<float*>(take(n * sizeof(float))); };
  auto b16 = [&](size_t n) { return reinterpret_cast<__nv_bfloat16*>(take(n * sizeof(__nv_bfloat16))); };
  const size_t state = static_cast<size_t>(Dp) * kLdF, slice = static_cast<size_t>(DK) * kLdH;
  const size_t chunk = static_cast<size_t>(kC) * (DK + 8), wide = static_cast<size_t>(kC) * kLdH;
  const size_t prod = static_cast<size_t>(kC) * (DK + 4);
  const bool bwd = pass != kMmaFwd;
  t.S = f32(state);
  t.z = f32(Dp);
  t.Shi = b16(slice);
  t.Slo = b16(slice);
  t.Q = b16(chunk);
  t.K = b16(chunk);
  t.Do = b16(bwd ? wide : 0);
  t.V = b16(wide);
  t.P = f32(static_cast<size_t>(kC) * kLdF);
  t.Phi = b16(wide);
  t.Plo = b16(wide);
  t.Ghi = b16(pass == kMmaDkdv ? wide : 0);
  t.Glo = b16(pass == kMmaDkdv ? wide : 0);
  t.U1 = f32(bwd ? prod : 0);
  t.U2 = f32(pass == kMmaDq ? prod : 0);
  t.keep = f32(kC);
  t.rden = f32(kC);
  t.c = f32(kC);
  t.qu = f32(kC);
  t.bytes = o;
  return t;
}
__host__ __device__ __forceinline__ size_t mma_smem_bytes(int Dp, int DK, int pass) {
  return mma_tiles(nullptr, Dp, DK, pass).bytes;
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

using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
using FragAT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
using FragBT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
constexpr int kWarps = kThreads / 32;

// The state entering the block's segment (slot seg, or NS, the total, when non-causal) into t.S / t.z, zero outside
// [0, D) x [0, nv): the padded rows and columns stay zero through the updates.
__device__ __forceinline__ void load_state(const MmaTiles& t, const ChunkArgs& a, int64_t bh, int seg, int v0,
                                           int nv) {
  const float* st = a.ws + (bh * (a.NS + 1) + (a.causal ? seg : a.NS)) * a.slot;
  const int D = static_cast<int>(a.D), Dv = static_cast<int>(a.Dv);
  for (int idx = threadIdx.x; idx < a.Dp * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    t.S[d * kLdF + e] = (d < D && e < nv) ? st[static_cast<int64_t>(d) * Dv + v0 + e] : 0.f;
  }
  for (int d = threadIdx.x; d < a.Dp; d += kThreads)
    t.z[d] = (a.normalize && d < D) ? st[static_cast<int64_t>(D) * Dv + d] : 0.f;
}

// The chunk's per-token vectors: keep (a real, unmasked token), 1 / den (0 past the chunk's end; 1 without den)
// and c (from cb, else 0).
__device__ __forceinline__ void token_flags(const MmaTiles& t, const ChunkArgs& a, int64_t t0, int nt,
                                            const unsigned char* mb, const float* denb, const float* cb) {
  const int i = threadIdx.x;
  if (i >= kC) return;
  t.keep[i] = (i < nt && (mb == nullptr || mb[(t0 + i) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
  t.rden[i] = i < nt ? (denb != nullptr ? 1.f / denb[(t0 + i) * a.den.s[2]] : 1.f) : 0.f;
  t.c[i] = (i < nt && cb != nullptr) ? cb[t0 + i] : 0.f;
}

// Rows [d0, d0 + DK) of the fp32 state as bf16 hi / lo (DK x kLdH).
template <int DK>
__device__ __forceinline__ void split_slice(const MmaTiles& t, int d0) {
  for (int idx = threadIdx.x; idx < DK * kBV; idx += kThreads) {
    const int d = idx / kBV, e = idx % kBV;
    split_bf16(t.S[(d0 + d) * kLdF + e], t.Shi + d * kLdH + e, t.Slo + d * kLdH + e);
  }
}

// S[d0 + m][n] += sum_t X[t][m] (B1 + B2)[t][n] over the chunk (X C x (DK + 8) read as the column-major X^T; B1, B2
// C x kLdH, B2 optional), tile t of the DK x 64 update to warp t % 8; and z[d0 + d] += sum_t X[t][d] w_t (w: 1
// when nullptr).
template <int DK>
__device__ __forceinline__ void update_state(const MmaTiles& t, int d0, const __nv_bfloat16* X,
                                             const __nv_bfloat16* B1, const __nv_bfloat16* B2, bool with_z,
                                             const float* w) {
  namespace wmma = nvcuda::wmma;
  constexpr int LDX = DK + 8;
  for (int i = threadIdx.x >> 5; i < (DK / 16) * (kBV / 16); i += kWarps) {
    const int m0 = (i / (kBV / 16)) * 16, n0 = (i % (kBV / 16)) * 16;
    FragC sum;
    wmma::load_matrix_sync(sum, t.S + (d0 + m0) * kLdF + n0, kLdF, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < kC; kk += 16) {
      FragAT fx;
      FragB fb;
      wmma::load_matrix_sync(fx, X + kk * LDX + m0, LDX);
      wmma::load_matrix_sync(fb, B1 + kk * kLdH + n0, kLdH);
      wmma::mma_sync(sum, fx, fb, sum);
      if (B2 != nullptr) {
        wmma::load_matrix_sync(fb, B2 + kk * kLdH + n0, kLdH);
        wmma::mma_sync(sum, fx, fb, sum);
      }
    }
    wmma::store_matrix_sync(t.S + (d0 + m0) * kLdF + n0, sum, kLdF, wmma::mem_row_major);
  }
  if (with_z && static_cast<int>(threadIdx.x) < DK) {
    float acc = 0.f;
    for (int i = 0; i < kC; ++i)
      acc = fmaf(__bfloat162float(X[i * LDX + threadIdx.x]), w != nullptr ? w[i] : 1.f, acc);
    t.z[d0 + threadIdx.x] += acc;
  }
}

// The warp's two C x C (or C x 64) output tiles (row tr, columns tc, tc + 1) of an fp32 C x kLdF array.
__device__ __forceinline__ void store_pair(float* dst, const FragC (&acc)[2], int tr, int tc) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
    nvcuda::wmma::store_matrix_sync(dst + tr * 16 * kLdF + (tc + j) * 16, acc[j], kLdF, nvcuda::wmma::mem_row_major);
}

// t.P = do V^T (C x C; the backward's scores before 1 / den and the triangle), V read as the column-major V^T.
__device__ __forceinline__ void scores_do_v(const MmaTiles& t, int tr, int tc) {
  namespace wmma = nvcuda::wmma;
  FragC acc[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int kk = 0; kk < kBV; kk += 16) {
      FragA fd;
      FragBT fv;
      wmma::load_matrix_sync(fd, t.Do + tr * 16 * kLdH + kk, kLdH);
      wmma::load_matrix_sync(fv, t.V + (tc + j) * 16 * kLdH + kk, kLdH);
      wmma::mma_sync(acc[j], fd, fv, acc[j]);
    }
  }
  store_pair(t.P, acc, tr, tc);
}

// A tensor-core chunk pass's block: (bh, segment, value tile) from the grid, and the bases of its bf16 inputs at
// its (batch, head) (v and do at the value tile's first column), the key mask at its batch row.
struct MmaBlock {
  int64_t bh, b, h, hv;
  int seg, vt, v0, nv;
  const __nv_bfloat16 *q, *k, *v, *g;   // g: do (nullptr in the forward)
  const unsigned char* mask;
  __device__ explicit MmaBlock(const ChunkArgs& a)
      : bh(blockIdx.x), b(bh / a.H), h(bh % a.H), hv(h / a.G), seg(blockIdx.y), vt(blockIdx.z), v0(vt * kBV),
        nv(imin(kBV, static_cast<int>(a.Dv) - v0)) {
    using bf16 = __nv_bfloat16;
    q = static_cast<const bf16*>(a.q.data) + b * a.q.s[0] + h * a.q.s[1];
    k = static_cast<const bf16*>(a.k.data) + b * a.k.s[0] + h * a.k.s[1];
    v = static_cast<const bf16*>(a.v.data) + b * a.v.s[0] + hv * a.v.s[1] + v0 * a.v.s[3];
    g = a.dout.data ? static_cast<const bf16*>(a.dout.data) + b * a.dout.s[0] + h * a.dout.s[1] + v0 * a.dout.s[3]
                    : nullptr;
    mask = a.key_mask.data ? static_cast<const unsigned char*>(a.key_mask.data) + b * a.key_mask.s[0] : nullptr;
  }
};

// Pass 3 of the forward on tensor cores (bf16 inputs; opt-in: LaFwdParams::tensor_cores). The same math and
// block layout as la_fwd_chunk_kernel, with every block product a WMMA (16 x 16 x 16 bf16 fragments, fp32
// accumulators) on bf16 tiles in shared memory: A = Q K^T and the update K^T V are exact bf16 products; the fp32
// operands (the state S for O += Q S, the masked scores A for O += A V) are split into bf16 hi + lo parts (two
// products, ~16 bits), as the Triton kernels do. The 8 warps share the C x 64 outputs (A and O: warp w owns 16-row
// tile row w / 2 and 16-column tiles 2 (w % 2), 2 (w % 2) + 1) and the DK x 64 state update (tile t to warp t % 8).
template <int DK>
__global__ void __launch_bounds__(kThreads, 1) la_fwd_chunk_mma_kernel(const ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80+; the host never launches this kernel on older GPUs
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDQ = DK + 8;
  const MmaTiles t = mma_tiles(dynamic_smem(), a.Dp, DK, kMmaFwd);
  float* const A_s = t.P;   // the scores, then O

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // this warp's output tiles: row tr, columns tc and tc + 1
  const MmaBlock blk(a);
  const int seg = blk.seg, v0 = blk.v0, nv = blk.nv;
  const int D = static_cast<int>(a.D);
  const int64_t T = a.T;
  load_state(t, a, blk.bh, seg, v0, nv);
  const bf16 *qb = blk.q, *kb = blk.k, *vb = blk.v;
  const unsigned char* mb = blk.mask;
  bf16* ob = static_cast<bf16*>(a.out.data) + blk.b * a.out.s[0] + blk.h * a.out.s[1] + v0 * a.out.s[3];
  float* denb = (a.normalize && blk.vt == 0)
                    ? static_cast<float*>(a.den.data) + blk.b * a.den.s[0] + blk.h * a.den.s[1] : nullptr;
  const bool vec_out = a.out.s[3] == 1 && nv % 8 == 0 && a.out.s[2] % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(ob) % 16 == 0;

  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with the flags, V, A / O and the per-token vectors
    token_flags(t, a, t0, nt, mb, nullptr, nullptr);
    __syncthreads();
    if (a.causal) load_tile_bf16<kC, kBV>(t.V, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, t.keep);

    FragC accA[2], accO[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(accA[j], 0.f);
      wmma::fill_fragment(accO[j], 0.f);
    }
    float qz = 0.f;   // q_t . z_enter for t = tid (tid < C)
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // the previous sub-tile's Q, K, state slice reads and state update are done
      load_tile_bf16<kC, DK>(t.Q, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
      if (a.causal)
        load_tile_bf16<kC, DK>(t.K, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, t.keep);
      split_slice<DK>(t, d0);   // S rows [d0, d0 + DK) entering this chunk
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < DK; kk += 16) {
        FragA fq;
        wmma::load_matrix_sync(fq, t.Q + tr * 16 * LDQ + kk, LDQ);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n0 = (tc + j) * 16;
          if (a.causal) {   // A[t][s] += sum_d Q[t][d] K[s][d]: K read as the column-major K^T
            FragBT fk;
            wmma::load_matrix_sync(fk, t.K + n0 * LDQ + kk, LDQ);
            wmma::mma_sync(accA[j], fq, fk, accA[j]);
          }
          FragB fs;   // O[t][e] += sum_d Q[t][d] (S_hi + S_lo)[d0 + d][e]
          wmma::load_matrix_sync(fs, t.Shi + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accO[j], fq, fs, accO[j]);
          wmma::load_matrix_sync(fs, t.Slo + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accO[j], fq, fs, accO[j]);
        }
      }
      if (a.normalize && tid < kC) {
        for (int d = 0; d < DK; ++d) qz = fmaf(__bfloat162float(t.Q[tid * LDQ + d]), t.z[d0 + d], qz);
      }
      if (a.causal) {
        __syncthreads();  // z rows [d0, d0 + DK) are read (qz) before their update
        update_state<DK>(t, d0, t.K, t.V, nullptr, a.normalize, nullptr);   // S_d += K_d^T V, z_d += K_d^T 1
      }
    }
    if (tid < kC) t.qu[tid] = qz;

    if (a.causal) {
      store_pair(A_s, accA, tr, tc);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {   // tril(A) as bf16 hi + lo
        const int i = idx / kC, s2 = idx % kC;
        split_bf16(s2 <= i ? A_s[i * kLdF + s2] : 0.f, t.Phi + i * kLdH + s2, t.Plo + i * kLdH + s2);
      }
      if (tid < kC) {
        float r = 0.f;
        for (int s2 = 0; s2 <= tid; ++s2) r += A_s[tid * kLdF + s2];
        t.c[tid] = r;   // sum_{s<=t} q_t . k_s
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {   // O[t][e] += sum_s (A_hi + A_lo)[t][s] V[s][e]
        FragA fh, fl;
        wmma::load_matrix_sync(fh, t.Phi + tr * 16 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fl, t.Plo + tr * 16 * kLdH + kk, kLdH);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          FragB fv;
          wmma::load_matrix_sync(fv, t.V + kk * kLdH + (tc + j) * 16, kLdH);
          wmma::mma_sync(accO[j], fh, fv, accO[j]);
          wmma::mma_sync(accO[j], fl, fv, accO[j]);
        }
      }
      __syncthreads();  // A is read (row sums) before O overwrites it
    } else if (tid < kC) {
      t.c[tid] = 0.f;
    }
    store_pair(A_s, accO, tr, tc);
    __syncthreads();
    if (vec_out) {   // 8 outputs (16 bytes) a store
      for (int idx = tid; idx < kC * kBV / 8; idx += kThreads) {
        const int i = idx / (kBV / 8), e = idx % (kBV / 8) * 8;
        if (i >= nt || e >= nv) continue;
        const float dn = t.qu[i] + t.c[i] + a.eps;
        alignas(16) bf16 pack[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float x = A_s[i * kLdF + e + j];
          pack[j] = __float2bfloat16_rn(a.normalize ? x / dn : x);
        }
        *reinterpret_cast<uint4*>(ob + (t0 + i) * a.out.s[2] + e) = *reinterpret_cast<const uint4*>(pack);
      }
    } else {
      for (int idx = tid; idx < kC * kBV; idx += kThreads) {
        const int i = idx / kBV, e = idx % kBV;
        if (i >= nt || e >= nv) continue;
        const float x = A_s[i * kLdF + e];
        ob[(t0 + i) * a.out.s[2] + e * a.out.s[3]] =
            __float2bfloat16_rn(a.normalize ? x / (t.qu[i] + t.c[i] + a.eps) : x);
      }
    }
    if (denb != nullptr && tid < nt) denb[(t0 + tid) * a.den.s[2]] = t.qu[tid] + t.c[tid] + a.eps;
  }
#endif
}

// Pass 1 of forward and backward on tensor cores (bf16). Block (bh, seg, dtile * nvt + vtile), as
// la_seg_sum_kernel: out[d][e] = sum_t keep_t x_t[d] y_t[e] / den_t, out_z[d] = sum_t keep_t x_t[d] w_t, over the
// segment's chunks; X^T Y into fp32 fragments, tile t of the DK x 64 sum to warp t % 8 (DK = 64: two a warp). Without
// den (the forward's k^T v) the products are exact bf16 ones; with den (the backward's q^T (do / den)) Y / den
// enters as bf16 hi + lo. Static shared memory: X C x (DK + 8), Y (hi) and its lo C x 72 (bf16), the sum's fp32
// staging DK x 68, the per-token flags.
template <int DK>
__global__ void __launch_bounds__(kThreads) la_seg_sum_mma_kernel(const SegArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDX = DK + 8;
  constexpr int kTiles = (DK / 16) * (kBV / 16);
  constexpr int kPer = (kTiles + kWarps - 1) / kWarps;   // accumulator tiles a warp holds (1 or 2)
  __shared__ __align__(128) bf16 X_s[kC * LDX];
  __shared__ __align__(128) bf16 Y_s[kC * kLdH];
  __shared__ __align__(128) bf16 Ylo_s[kC * kLdH];
  __shared__ __align__(128) float O_s[DK * kLdF];
  __shared__ float keep_s[kC];
  __shared__ float rmul_s[kC];
  __shared__ float w_s[kC];

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
  const float* denb = a.den.data ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const float* wb = a.wz ? a.wz + bh * T : nullptr;

  FragC acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) wmma::fill_fragment(acc[i], 0.f);
  float zacc = 0.f;
  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk's tiles are no longer read
    if (tid < kC) {
      keep_s[tid] = (tid < nt && (mb == nullptr || mb[(t0 + tid) * a.key_mask.s[1]] != 0)) ? 1.f : 0.f;
      rmul_s[tid] = (tid < nt && denb != nullptr) ? 1.f / denb[(t0 + tid) * a.den.s[2]] : 1.f;
      w_s[tid] = (tid < nt && wb != nullptr) ? wb[t0 + tid] : 1.f;
    }
    __syncthreads();
    load_tile_bf16<kC, DK>(X_s, LDX, xb + t0 * a.x.s[2], a.x.s[2], a.x.s[3], nt, nd, keep_s);
    load_tile_bf16<kC, kBV>(Y_s, kLdH, yb + t0 * a.y.s[2], a.y.s[2], a.y.s[3], nt, nv, keep_s);
    if (denb != nullptr) {   // Y / den as bf16 hi (in place) + lo
      __syncthreads();
      for (int idx = tid; idx < kC * kBV; idx += kThreads) {
        const int i = idx / kBV, e = idx % kBV;
        split_bf16(__bfloat162float(Y_s[i * kLdH + e]) * rmul_s[i], Y_s + i * kLdH + e, Ylo_s + i * kLdH + e);
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {   // sum[d][e] += sum_t X[t][d] Y[t][e]: X read as the column-major X^T
      const int j = warp + i * kWarps;
      if (j >= kTiles) break;
      const int m0 = j / (kBV / 16) * 16, n0 = j % (kBV / 16) * 16;
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {
        FragAT fx;
        FragB fy;
        wmma::load_matrix_sync(fx, X_s + kk * LDX + m0, LDX);
        wmma::load_matrix_sync(fy, Y_s + kk * kLdH + n0, kLdH);
        wmma::mma_sync(acc[i], fx, fy, acc[i]);
        if (denb != nullptr) {
          wmma::load_matrix_sync(fy, Ylo_s + kk * kLdH + n0, kLdH);
          wmma::mma_sync(acc[i], fx, fy, acc[i]);
        }
      }
    }
    if (do_z && tid < DK) {
      for (int i = 0; i < kC; ++i) zacc = fmaf(__bfloat162float(X_s[i * LDX + tid]), w_s[i], zacc);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int j = warp + i * kWarps;
    if (j >= kTiles) break;
    wmma::store_matrix_sync(O_s + j / (kBV / 16) * 16 * kLdF + j % (kBV / 16) * 16, acc[i], kLdF,
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

// acc += X[m0 .. m0 + 16)[e] (S_hi + S_lo)[n0 .. n0 + 16)[e] summed over the 64 value columns e: a C x kLdH bf16
// operand (do, V) times the transposed state slice (read as the column-major S^T).
__device__ __forceinline__ void mma_slice_t(FragC& acc, const MmaTiles& t, const __nv_bfloat16* X, int m0, int n0) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < kBV; kk += 16) {
    FragA fx;
    FragBT fh, fl;
    wmma::load_matrix_sync(fx, X + m0 * kLdH + kk, kLdH);
    wmma::load_matrix_sync(fh, t.Shi + n0 * kLdH + kk, kLdH);
    wmma::load_matrix_sync(fl, t.Slo + n0 * kLdH + kk, kLdH);
    wmma::mma_sync(acc, fx, fh, acc);
    wmma::mma_sync(acc, fx, fl, acc);
  }
}

// dq's u = P K_d (P as hi + lo) into U1 and do S_d^T (the state slice as hi + lo) into U2, C x DK, tile t to warp
// t % 8; the caller combines u = U1 + U2 / den. causal false: U1 is not written.
template <int DK>
__device__ __forceinline__ void dq_u_tiles(const MmaTiles& t, bool causal) {
  namespace wmma = nvcuda::wmma;
  constexpr int LDQ = DK + 8, LDU = DK + 4, kTiles = (kC / 16) * (DK / 16);
  for (int i = threadIdx.x >> 5; i < kTiles; i += kWarps) {
    const int m0 = i / (DK / 16) * 16, n0 = i % (DK / 16) * 16;
    FragC acc;
    if (causal) {   // U1[t][d] = sum_s P[t][s] K[s][d]
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {
        FragA fh, fl;
        FragB fk;
        wmma::load_matrix_sync(fh, t.Phi + m0 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fl, t.Plo + m0 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(fk, t.K + kk * LDQ + n0, LDQ);
        wmma::mma_sync(acc, fh, fk, acc);
        wmma::mma_sync(acc, fl, fk, acc);
      }
      wmma::store_matrix_sync(t.U1 + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
    }
    wmma::fill_fragment(acc, 0.f);   // U2[t][d] = sum_e do[t][e] S[d0 + d][e]
    mma_slice_t(acc, t, t.Do, m0, n0);
    wmma::store_matrix_sync(t.U2 + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
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
  using bf16 = __nv_bfloat16;
  constexpr int LDQ = DK + 8, LDU = DK + 4;
  const MmaTiles t = mma_tiles(dynamic_smem(), a.Dp, DK, kMmaDq);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // P's tiles: row tr, columns tc and tc + 1
  const MmaBlock blk(a);
  const int seg = blk.seg, nv = blk.nv;
  const int D = static_cast<int>(a.D);
  const int64_t T = a.T;
  load_state(t, a, blk.bh, seg, blk.v0, nv);
  const bf16 *qb = blk.q, *kb = blk.k, *vb = blk.v, *gb = blk.g;
  const unsigned char* mb = blk.mask;
  const float* denb =
      a.normalize ? static_cast<const float*>(a.den.data) + blk.b * a.den.s[0] + blk.h * a.den.s[1] : nullptr;
  bf16* dqb = static_cast<bf16*>(a.out.data) + blk.b * a.out.s[0] + blk.h * a.out.s[1];
  float* accb = a.acc ? a.acc + blk.bh * T * a.D : nullptr;
  float* cb = a.normalize ? a.cbuf + blk.bh * T : nullptr;

  for (int c = 0; c < a.cps; ++c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) break;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with every shared tile and its state update is complete
    token_flags(t, a, t0, nt, mb, denb, nullptr);   // c starts at 0
    __syncthreads();
    load_tile_bf16<kC, kBV>(t.Do, kLdH, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, nullptr);
    if (a.causal) load_tile_bf16<kC, kBV>(t.V, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, t.keep);
    __syncthreads();
    if (a.causal) {   // P[t][s] = tril(do_t . v_s) / den_t, fp32 and as bf16 hi + lo
      scores_do_v(t, tr, tc);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int i = idx / kC, s2 = idx % kC;
        const float x = s2 <= i ? t.P[i * kLdF + s2] * t.rden[i] : 0.f;
        t.P[i * kLdF + s2] = x;
        split_bf16(x, t.Phi + i * kLdH + s2, t.Plo + i * kLdH + s2);
      }
    }

    if (a.normalize) {   // loop 1: c_t = -(q_t . u_t) / den_t from the fp32 u (never from the rounded o)
      float qu = 0.f;    // for t = tid (tid < C)
      for (int d0 = 0; d0 < D; d0 += DK) {
        const int nd = imin(DK, D - d0);
        __syncthreads();  // Q, K, the state slice and U are free; P's parts are written
        load_tile_bf16<kC, DK>(t.Q, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
        if (a.causal)
          load_tile_bf16<kC, DK>(t.K, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, t.keep);
        split_slice<DK>(t, d0);
        __syncthreads();
        dq_u_tiles<DK>(t, a.causal);
        __syncthreads();
        if (tid < kC) {
          const float r = t.rden[tid];
          for (int d = 0; d < DK; ++d) {
            const float u = (a.causal ? t.U1[tid * LDU + d] : 0.f) + r * t.U2[tid * LDU + d];
            qu = fmaf(__bfloat162float(t.Q[tid * LDQ + d]), u, qu);
          }
        }
      }
      if (tid < kC) {
        const float ct = -qu * t.rden[tid];   // 0 for rows t >= nt (rden 0)
        t.c[tid] = ct;
        if (tid < nt) {
          if (a.nvt == 1) cb[t0 + tid] = ct;
          else atomicAdd(cb + t0 + tid, ct);
        }
      }
      __syncthreads();  // c visible; loop 1 no longer reads P's parts
      if (a.causal) {
        for (int idx = tid; idx < kC * kC; idx += kThreads) {
          const int i = idx / kC, s2 = idx % kC;
          if (s2 <= i) split_bf16(t.P[i * kLdF + s2] + t.c[i], t.Phi + i * kLdH + s2, t.Plo + i * kLdH + s2);
        }
      }
    }

    // loop 2: dq = P K + G S^T + c z_enter, then the state update
    for (int d0 = 0; d0 < D; d0 += DK) {
      const int nd = imin(DK, D - d0);
      __syncthreads();  // K, the state slice and U are free; P's parts (with c) and c are visible
      if (a.causal)
        load_tile_bf16<kC, DK>(t.K, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, t.keep);
      split_slice<DK>(t, d0);
      __syncthreads();
      dq_u_tiles<DK>(t, a.causal);
      __syncthreads();
      for (int idx = tid; idx < kC * DK; idx += kThreads) {
        const int i = idx / DK, d = idx % DK;
        if (i >= nt || d >= nd) continue;
        const float x = (a.causal ? t.U1[i * LDU + d] : 0.f) + t.rden[i] * t.U2[i * LDU + d] + t.c[i] * t.z[d0 + d];
        if (accb != nullptr) atomicAdd(accb + (t0 + i) * a.D + d0 + d, x);
        else dqb[(t0 + i) * a.out.s[2] + (d0 + d) * a.out.s[3]] = __float2bfloat16_rn(x);
      }
      if (a.causal) {
        __syncthreads();  // every read of the slice's rows and of z[d0 ..] for this chunk is done
        update_state<DK>(t, d0, t.K, t.V, nullptr, a.normalize, nullptr);   // S_d += K_d^T V, z_d += K_d^T 1
      }
    }
  }
#endif
}

// Backward pass 4 (dk and dv) on tensor cores (bf16; opt-in: LaBwdParams::tensor_cores), the math of
// la_bwd_dkdv_kernel, chunks walked last to first, with R in t.S and r in t.z: P' = tril(G V^T) + c on the
// triangle; per D sub-tile dk_d = P'^T Q_d + V R_d^T + r_d, A += Q_d K_d^T, KR += K_d R_d, then R_d += Q_d^T G,
// r_d += Q_d^T c; dv = KR + (tril(A) / den)^T do. G V^T is do V^T with 1/den per row after; P', R_d, G and
// tril(A) / den enter the products as bf16 hi + lo, against exact bf16 sides (Q, K, V, do).
template <int DK>
__global__ void __launch_bounds__(kThreads, 1) la_bwd_dkdv_mma_kernel(const ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using bf16 = __nv_bfloat16;
  constexpr int LDQ = DK + 8, LDU = DK + 4;
  const MmaTiles t = mma_tiles(dynamic_smem(), a.Dp, DK, kMmaDkdv);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tr = warp >> 1, tc = (warp & 1) * 2;   // the C x C and C x 64 tiles: row tr, columns tc and tc + 1
  const MmaBlock blk(a);
  const int seg = blk.seg, nv = blk.nv;
  const int D = static_cast<int>(a.D);
  const int64_t T = a.T, b = blk.b, h = blk.h, hv = blk.hv;
  const bool with_c = a.normalize && blk.vt == 0;
  load_state(t, a, blk.bh, seg, blk.v0, nv);
  const bf16 *qb = blk.q, *kb = blk.k, *vb = blk.v, *gb = blk.g;
  const unsigned char* mb = blk.mask;
  const float* denb = a.normalize ? static_cast<const float*>(a.den.data) + b * a.den.s[0] + h * a.den.s[1] : nullptr;
  const float* cb = a.normalize ? a.cbuf + blk.bh * T : nullptr;
  bf16* dkb = static_cast<bf16*>(a.out.data) + b * a.out.s[0] + h * a.out.s[1];
  bf16* dvb = static_cast<bf16*>(a.out2.data) + b * a.out2.s[0] + hv * a.out2.s[1] + blk.v0 * a.out2.s[3];
  float* acck = a.acc ? a.acc + blk.bh * T * a.D : nullptr;
  float* accv = a.acc2 ? a.acc2 + (b * a.Hv + hv) * T * a.Dv + blk.v0 : nullptr;

  for (int c = a.cps - 1; c >= 0; --c) {
    const int64_t t0 = (static_cast<int64_t>(seg) * a.cps + c) * kC;
    if (t0 >= T) continue;
    const int nt = static_cast<int>(lmin(kC, T - t0));
    __syncthreads();  // the previous chunk is done with every shared tile and its state update is complete
    token_flags(t, a, t0, nt, mb, denb, cb);
    __syncthreads();
    if (a.causal)
      load_tile_bf16<kC, kBV>(t.Do, kLdH, gb + t0 * a.dout.s[2], a.dout.s[2], a.dout.s[3], nt, nv, nullptr);
    load_tile_bf16<kC, kBV>(t.V, kLdH, vb + t0 * a.v.s[2], a.v.s[2], a.v.s[3], nt, nv, t.keep);
    __syncthreads();
    if (a.causal) {   // P'[t][s] = tril(do_t . v_s / den_t + c_t), G = do / den: both as bf16 hi + lo
      scores_do_v(t, tr, tc);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int i = idx / kC, s2 = idx % kC;
        const float x = s2 <= i ? t.P[i * kLdF + s2] * t.rden[i] + (with_c ? t.c[i] : 0.f) : 0.f;
        split_bf16(x, t.Phi + i * kLdH + s2, t.Plo + i * kLdH + s2);
        split_bf16(__bfloat162float(t.Do[i * kLdH + s2]) * t.rden[i], t.Ghi + i * kLdH + s2, t.Glo + i * kLdH + s2);
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
      __syncthreads();  // Q, K, the R slice and U are free; P's and G's parts are written
      load_tile_bf16<kC, DK>(t.Q, LDQ, qb + t0 * a.q.s[2] + d0 * a.q.s[3], a.q.s[2], a.q.s[3], nt, nd, nullptr);
      load_tile_bf16<kC, DK>(t.K, LDQ, kb + t0 * a.k.s[2] + d0 * a.k.s[3], a.k.s[2], a.k.s[3], nt, nd, t.keep);
      split_slice<DK>(t, d0);
      __syncthreads();
      for (int i = warp; i < (kC / 16) * (DK / 16); i += kWarps) {   // dk tile: P'^T Q_d + V R_d^T
        const int m0 = i / (DK / 16) * 16, n0 = i % (DK / 16) * 16;
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
        if (a.causal) {
#pragma unroll
          for (int kk = 0; kk < kC; kk += 16) {   // sum_t P'[t][s] Q[t][d]: P' read as the column-major P'^T
            FragAT fh, fl;
            FragB fq;
            wmma::load_matrix_sync(fh, t.Phi + kk * kLdH + m0, kLdH);
            wmma::load_matrix_sync(fl, t.Plo + kk * kLdH + m0, kLdH);
            wmma::load_matrix_sync(fq, t.Q + kk * LDQ + n0, LDQ);
            wmma::mma_sync(acc, fh, fq, acc);
            wmma::mma_sync(acc, fl, fq, acc);
          }
        }
        mma_slice_t(acc, t, t.V, m0, n0);   // sum_e V[s][e] R[d0 + d][e]
        wmma::store_matrix_sync(t.U1 + m0 * LDU + n0, acc, LDU, wmma::mem_row_major);
      }
#pragma unroll
      for (int kk = 0; kk < DK; kk += 16) {
        FragA fq, fk;
        wmma::load_matrix_sync(fq, t.Q + tr * 16 * LDQ + kk, LDQ);
        wmma::load_matrix_sync(fk, t.K + tr * 16 * LDQ + kk, LDQ);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n0 = (tc + j) * 16;
          if (a.causal) {   // A[t][s] += sum_d Q[t][d] K[s][d]: K read as the column-major K^T
            FragBT fkt;
            wmma::load_matrix_sync(fkt, t.K + n0 * LDQ + kk, LDQ);
            wmma::mma_sync(accA[j], fq, fkt, accA[j]);
          }
          FragB fh, fl;   // KR[s][e] += sum_d K[s][d] R[d0 + d][e]
          wmma::load_matrix_sync(fh, t.Shi + kk * kLdH + n0, kLdH);
          wmma::load_matrix_sync(fl, t.Slo + kk * kLdH + n0, kLdH);
          wmma::mma_sync(accKR[j], fk, fh, accKR[j]);
          wmma::mma_sync(accKR[j], fk, fl, accKR[j]);
        }
      }
      __syncthreads();  // dk's tiles are in U1
      for (int idx = tid; idx < kC * DK; idx += kThreads) {
        const int s2 = idx / DK, d = idx % DK;
        if (s2 >= nt || d >= nd) continue;
        const bool kept = t.keep[s2] != 0.f;
        const float x = t.U1[s2 * LDU + d] + (with_c ? t.z[d0 + d] : 0.f);
        if (acck != nullptr) {
          if (kept) atomicAdd(acck + (t0 + s2) * a.D + d0 + d, x);
        } else {
          dkb[(t0 + s2) * a.out.s[2] + (d0 + d) * a.out.s[3]] = __float2bfloat16_rn(kept ? x : 0.f);
        }
      }
      if (a.causal) {
        __syncthreads();  // every read of r[d0 ..] for this chunk is done
        update_state<DK>(t, d0, t.Q, t.Ghi, t.Glo, a.normalize, t.c);   // R_d += Q_d^T G, r_d += Q_d^T c
      }
    }

    if (a.causal) {   // dv += (tril(A) / den)^T do
      store_pair(t.P, accA, tr, tc);
      __syncthreads();
      for (int idx = tid; idx < kC * kC; idx += kThreads) {
        const int i = idx / kC, s2 = idx % kC;
        split_bf16(s2 <= i ? t.P[i * kLdF + s2] * t.rden[i] : 0.f, t.Phi + i * kLdH + s2, t.Plo + i * kLdH + s2);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {   // sum_t A'[t][s] do[t][e]: A' read as the column-major A'^T
        FragAT fh, fl;
        wmma::load_matrix_sync(fh, t.Phi + kk * kLdH + tr * 16, kLdH);
        wmma::load_matrix_sync(fl, t.Plo + kk * kLdH + tr * 16, kLdH);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          FragB fd;
          wmma::load_matrix_sync(fd, t.Do + kk * kLdH + (tc + j) * 16, kLdH);
          wmma::mma_sync(accKR[j], fh, fd, accKR[j]);
          wmma::mma_sync(accKR[j], fl, fd, accKR[j]);
        }
      }
    }
    __syncthreads();  // P is free for dv's tiles
    store_pair(t.P, accKR, tr, tc);
    __syncthreads();
    for (int idx = tid; idx < kC * kBV; idx += kThreads) {
      const int s2 = idx / kBV, e = idx % kBV;
      if (s2 >= nt || e >= nv) continue;
      const float x = t.P[s2 * kLdF + e];
      if (accv != nullptr) atomicAdd(accv + (t0 + s2) * a.Dv + e, x);
      else dvb[(t0 + s2) * a.out2.s[2] + e * a.out2.s[3]] = __float2bfloat16_rn(x);
    }
  }
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn
