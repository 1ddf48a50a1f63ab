// Fused GLM subspace Hessian: (P g, P H P^T) for f(x) = loss_scale sum_i loss(a_i . x; y_i) + lam sum_j reg(x_j).
//
// Block b of the grid owns partial slot b and walks the steps r = b, b + G, ...:
//   data steps r < RA: kHvpRows rows of A. Phase 1 forms B = A_rows P^T in shared memory (column chunks of kCols,
//     k-loop over n through shared tiles of A and P^T, a 4 x 8 register tile per thread) and z = A_rows x.
//   reg steps r >= RA: kHvpRows coordinates j, B rows = P[:, j]^T, z = x_j.
//   Phase 2: w = loss''(z) (reg''), v = loss'(z) (reg'). Phase 3: slot += B^T diag(w) B (8 x 8 register tiles of a
//   128 x 128 output tile per pass) and slot_g += B^T v.
// B never leaves shared memory; slots are summed by the glue in a fixed order, so results are deterministic.
// P is read through its strides, or generated from the seed key with the hash of sketch.py. fp32 throughout.
#include "subspace_hvp.h"

#include "../sketch_hash.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBK = 32;               // k-step of phase 1
constexpr int kCols = 256;            // B columns per phase-1 chunk (32 thread columns x 8)
constexpr int kPsPitch = kCols + 1;   // padded: conflict-free transposed stores of P tiles
constexpr int kRows = kHvpRows;

// P[row, col] (row < s, col < n checked by the caller).
__device__ __forceinline__ float p_entry(const HvpGlmParams& p, int64_t row, int64_t col) {
  if (p.sketch == 0) return p.P[row * p.sPs + col * p.sPn];
  const uint32_t h1 = sketch_h1(p.key, row, col);
  if (p.sketch == 1) {
    const uint32_t h2 = sketch_h2(h1);
    const float u1 = static_cast<float>((h1 >> 8) + 1u) * 5.9604644775390625e-08f;
    const float u2 = static_cast<float>(h2 >> 8) * 5.9604644775390625e-08f;
    return p.scale * sqrtf(-2.f * logf(u1)) * cosf(6.283185307179586f * u2);
  }
  return p.scale * (1.f - 2.f * static_cast<float>(h1 >> 31));
}

__device__ __forceinline__ float sigmoidf(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ void loss_d(int code, float z, float y, float& d1, float& d2) {
  if (code == 0) {
    d1 = z - y;
    d2 = 1.f;
  } else {
    const float sg = sigmoidf(z), q = sg * (1.f - sg);
    if (code == 1) {
      d1 = sg - y;
      d2 = q;
    } else {
      d1 = (sg - y) * q;
      d2 = q * (q + (sg - y) * (1.f - 2.f * sg));
    }
  }
}

__device__ __forceinline__ void reg_d(int code, float x, float& d1, float& d2) {
  if (code == 1) {
    d1 = x;
    d2 = 1.f;
  } else if (code == 2) {
    const float q = 1.f + x * x;
    d1 = 2.f * x / (q * q);
    d2 = (2.f - 6.f * x * x) / (q * q * q);
  } else {
    d1 = 0.f;
    d2 = 0.f;
  }
}

__host__ __device__ inline int64_t pitch_of(int64_t s) { return (s + 31) / 32 * 32; }

__global__ void __launch_bounds__(kThreads) glm_gram_kernel(const HvpGlmParams p) {
  extern __shared__ float smem[];
  const int64_t s = p.s, sp = pitch_of(s);
  float* Bs = smem;                          // [kRows][sp]
  float* As = Bs + kRows * sp;               // [kRows][kBK]
  float* Ps = As + kRows * kBK;              // [kBK][kPsPitch]: P^T chunk
  float* xs = Ps + kBK * kPsPitch;           // [kBK]
  float* zs = xs + kBK;                      // [kRows]
  float* w1 = zs + kRows;                    // [kRows] loss' / reg'
  float* w2 = w1 + kRows;                    // [kRows] loss'' / reg''
  const int t = threadIdx.x;
  const int64_t RA = (p.m + kRows - 1) / kRows;
  const int64_t R = RA + (p.reg_active ? (p.n + kRows - 1) / kRows : 0);
  float* gp = p.GP + static_cast<int64_t>(blockIdx.x) * s * s;
  float* pg = p.PG + static_cast<int64_t>(blockIdx.x) * s;

  for (int64_t r = blockIdx.x; r < R; r += p.G) {
    if (r < RA) {
      const int64_t row0 = r * kRows;
      const int tr = t / 32, tc = t % 32;    // thread tile: rows tr*4 + i, columns tc + 32 j of the chunk
      float zacc = 0.f;                      // z partial of row t / 8, k-slice (t % 8) * 4 .. + 4
      for (int64_t c0 = 0; c0 < s; c0 += kCols) {
        float acc[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
        for (int64_t k0 = 0; k0 < p.n; k0 += kBK) {
          for (int e = t; e < kRows * kBK; e += kThreads) {
            const int i = e / kBK, kk = e % kBK;
            const int64_t row = row0 + i, col = k0 + kk;
            As[e] = (row < p.m && col < p.n) ? p.A[row * p.sAm + col * p.sAn] : 0.f;
          }
          for (int e = t; e < kBK * kCols; e += kThreads) {
            const int kk = e % kBK, cc = e / kBK;
            const int64_t prow = c0 + cc, col = k0 + kk;
            Ps[kk * kPsPitch + cc] = (prow < s && col < p.n) ? p_entry(p, prow, col) : 0.f;
          }
          if (c0 == 0 && t < kBK) xs[t] = (k0 + t < p.n) ? p.x[k0 + t] : 0.f;
          __syncthreads();
          if (c0 == 0) {
            const float* a = As + (t / 8) * kBK + (t % 8) * 4;
            const float* xk = xs + (t % 8) * 4;
            zacc += a[0] * xk[0] + a[1] * xk[1] + a[2] * xk[2] + a[3] * xk[3];
          }
#pragma unroll 4
          for (int kk = 0; kk < kBK; ++kk) {
            float a[4], b[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[(tr * 4 + i) * kBK + kk];
#pragma unroll
            for (int j = 0; j < 8; ++j) b[j] = Ps[kk * kPsPitch + tc + 32 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
          }
          __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int64_t c = c0 + tc + 32 * j;
            if (c < sp) Bs[(tr * 4 + i) * sp + c] = c < s ? acc[i][j] : 0.f;
          }
      }
      // the 8 lanes t % 8 of one row are adjacent in a warp
      zacc += __shfl_xor_sync(0xffffffffu, zacc, 4);
      zacc += __shfl_xor_sync(0xffffffffu, zacc, 2);
      zacc += __shfl_xor_sync(0xffffffffu, zacc, 1);
      if (t % 8 == 0) zs[t / 8] = zacc;
      __syncthreads();
      if (t < kRows) {
        const int64_t row = row0 + t;
        float d1 = 0.f, d2 = 0.f;
        if (row < p.m) {
          loss_d(p.loss, zs[t], p.y[row], d1, d2);
          d1 *= p.loss_scale;
          d2 *= p.loss_scale;
        }
        w1[t] = d1;
        w2[t] = d2;
      }
    } else {
      const int64_t col0 = (r - RA) * kRows;
      for (int64_t e = t; e < kRows * sp; e += kThreads) {
        const int64_t i = e / sp, c = e % sp, col = col0 + i;
        Bs[e] = (c < s && col < p.n) ? p_entry(p, c, col) : 0.f;
      }
      if (t < kRows) {
        const int64_t col = col0 + t;
        float d1 = 0.f, d2 = 0.f;
        if (col < p.n) {
          reg_d(p.reg, p.x[col], d1, d2);
          d1 *= p.lam;
          d2 *= p.lam;
        }
        w1[t] = d1;
        w2[t] = d2;
      }
    }
    __syncthreads();

    // Phase 3: slot += B^T diag(w2) B over 128 x 128 output tiles; thread (ty, tx) owns rows ty + 16 i, cols tx + 16 j.
    const int ty = t / 16, tx = t % 16;
    for (int64_t a0 = 0; a0 < s; a0 += 128) {
      for (int64_t b0 = 0; b0 < s; b0 += 128) {
        float acc[8][8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
        for (int k = 0; k < kRows; ++k) {
          const float* brow = Bs + k * sp;
          const float wk = w2[k];
          float u[8], v[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int64_t c = a0 + ty + 16 * i;
            u[i] = c < sp ? wk * brow[c] : 0.f;
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int64_t c = b0 + tx + 16 * j;
            v[j] = c < sp ? brow[c] : 0.f;
          }
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(u[i], v[j], acc[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t ra = a0 + ty + 16 * i;
          if (ra >= s) continue;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int64_t cb = b0 + tx + 16 * j;
            if (cb < s) gp[ra * s + cb] += acc[i][j];
          }
        }
      }
    }
    for (int64_t c = t; c < s; c += kThreads) {
      float acc = 0.f;
      for (int k = 0; k < kRows; ++k) acc = fmaf(w1[k], Bs[k * sp + c], acc);
      pg[c] += acc;
    }
    __syncthreads();   // Bs, w1, w2 are rewritten by the next step
  }
}

__global__ void sketch_fill_kernel(float* out, int64_t s, int64_t n, int64_t so, int kind, uint32_t key,
                                   double scale) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= s * n) return;
  const int64_t i = e / n, j = e % n;
  out[i * so + j] = static_cast<float>(scale * sketch_value(key, i, j, kind));
}

}  // namespace

cudaError_t sketch_fill_launch(float* out, int64_t s, int64_t n, int64_t row_stride, int kind, int64_t seed,
                               double scale, cudaStream_t stream) {
  if (s * n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (s * n + threads - 1) / threads;
  sketch_fill_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(out, s, n, row_stride, kind,
                                                                            sketch_key(seed), scale);
  return cudaGetLastError();
}

size_t subspace_hvp_glm_smem_bytes(int64_t s) {
  return sizeof(float) * static_cast<size_t>(kRows * pitch_of(s) + kRows * kBK + kBK * kPsPitch + kBK + 3 * kRows);
}

cudaError_t subspace_hvp_glm_launch(const HvpGlmParams& p, cudaStream_t stream) {
  if (p.s < 1 || p.s > kHvpMaxS || p.G < 1) return cudaErrorInvalidValue;
  const size_t smem = subspace_hvp_glm_smem_bytes(p.s);
  cudaError_t err = cudaFuncSetAttribute(glm_gram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  glm_gram_kernel<<<p.G, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastattn
