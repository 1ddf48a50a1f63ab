// Host emulation of what the tensor-core kernels use from CUDA, so that g++ can run them on a machine without a GPU
// (tests/test_cuda_emu.py). The real CUDA host headers give the types (dim3, __nv_bfloat16 with its host-side
// conversions); the qualifiers become plain C++ (__shared__ arrays function statics, the dynamic shared memory
// emu::smem_buffer); a thread block is kThreads std::threads meeting at a std::barrier;
// a WMMA fragment holds its whole 16 x 16 tile in every lane (the lanes of a warp compute identical copies and only
// lane 0 stores). Hardware fragment layouts are the library's business, not the kernel's, so they are not modelled:
// what this checks is the kernel's own indexing, masking, synchronisation and arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static   // one instance for the whole block (blocks run one at a time)
#undef __forceinline__
#define __forceinline__ inline
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline std::barrier<>* block_barrier = nullptr;
alignas(128) inline unsigned char smem_buffer[1 << 18];   // the block's dynamic shared memory
inline unsigned char* dynamic_smem() { return smem_buffer; }
inline void sync() { block_barrier->arrive_and_wait(); }

// Runs kernel() for every block of grid, one block at a time, each as `threads` threads.
template <typename F>
void launch(dim3 grid, unsigned threads, F kernel) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        block_barrier = &bar;
        std::vector<std::thread> team;
        for (unsigned t = 0; t < threads; ++t)
          team.emplace_back([&, t] {
            thread_idx = dim3(t, 0, 0);
            block_idx = dim3(x, y, z);
            kernel();
          });
        for (auto& th : team) th.join();
      }
}
}  // namespace emu

inline float atomicAdd(float* p, float x) { return std::atomic_ref<float>(*p).fetch_add(x); }

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define __syncthreads() emu::sync()
inline void __trap() { std::abort(); }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated: 16 x 16 x 16 only");
  float x[16][16];   // matrix_a: [m][k]; matrix_b: [k][n]; accumulator: [m][n]
};

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      f.x[m][k] = to_float(std::is_same_v<L, row_major> ? p[m * ldm + k] : p[k * ldm + m]);
}

template <typename T, typename L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n)
      f.x[k][n] = to_float(std::is_same_v<L, row_major> ? p[k * ldm + n] : p[n * ldm + k]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) f.x[m][n] = l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (emu::thread_idx.x % 32 != 0) return;   // one lane writes the warp's tile
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) (l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.x[m][n];
}

template <typename Frag>
void fill_fragment(Frag& f, float v) {
  for (auto& row : f.x)
    for (auto& e : row) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m][n];
      for (int k = 0; k < 16; ++k) s = std::fma(a.x[m][k], b.x[k][n], s);
      out[m][n] = s;
    }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) d.x[m][n] = out[m][n];
}
}  // namespace wmma
}  // namespace nvcuda
