// The counter hash behind seeded sketch matrices P (fastattn/ops/subspace_hvp/sketch.py documents the recipe;
// the C++ CPU kernel, the CUDA kernel and its glue share this header so every backend generates the same P).
// Plain C++, usable from host code and, under nvcc, from device code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__
#else
#define FASTATTN_HOST_DEVICE
#endif

namespace fastattn {

// lowbias32 integer finaliser.
FASTATTN_HOST_DEVICE inline uint32_t sketch_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of a seed (its low 32 bits).
FASTATTN_HOST_DEVICE inline uint32_t sketch_key(int64_t seed) {
  return sketch_mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
}

// First and second hash of entry (row, col) of P.
FASTATTN_HOST_DEVICE inline uint32_t sketch_h1(uint32_t key, int64_t row, int64_t col) {
  return sketch_mix32(static_cast<uint32_t>(col) ^ sketch_mix32(static_cast<uint32_t>(row) + key));
}

FASTATTN_HOST_DEVICE inline uint32_t sketch_h2(uint32_t h1) { return sketch_mix32(h1 ^ 0x85EBCA6Bu); }

// Entry (row, col) of P / scale in fp64: kind 1 gaussian (Box-Muller on h1, h2), 2 rademacher (sign bit of h1).
FASTATTN_HOST_DEVICE inline double sketch_value(uint32_t key, int64_t row, int64_t col, int64_t kind) {
  const uint32_t h1 = sketch_h1(key, row, col);
  if (kind == 1) {
    const double u1 = static_cast<double>((h1 >> 8) + 1u) * 5.9604644775390625e-08;
    const double u2 = static_cast<double>(sketch_h2(h1) >> 8) * 5.9604644775390625e-08;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
  }
  return 1.0 - 2.0 * static_cast<double>(h1 >> 31);
}

}  // namespace fastattn
