// Feature-dim tiles of the linear-attention CUDA kernels: the ONE list shared by the kernel instantiations
// (csrc/cuda/linear_attn.cu), the torch glue (csrc/cuda/linear_attn_glue.cpp exposes it as
// torch.ops.fastattn.cuda_feature_tiles()) and the Python verifier (fastattn/ops/linear_attn/cuda.py).
//
// A call with feature dim D runs the smallest tile >= D. The tile fixes the D sub-tile width of the kernels,
// min(tile, 64): the D axis is walked in sub-tiles of that width, padded with zeros inside the kernel (masked
// loads; inputs are never padded or copied on the host). So D = 9 runs 16-wide sub-tiles, D = 37 runs 64-wide
// ones, D = 130 runs three 64-wide ones. The largest tile is the largest supported D (the fp32 state of a block,
// D x 64 values, lives in shared memory: 512 rows are the most that fit next to the chunk tiles).
//
// Keep the list ascending, every entry a multiple of 16 and at most 512. Tiles above 64 share one compiled
// kernel per (kernel, dtype), so the list costs at most 3 instantiations per (kernel, dtype).
#pragma once

#define FASTATTN_FEATURE_TILES(X) X(16) X(32) X(64) X(128) X(256) X(512)

namespace fastattn {
namespace cuda {

#define FASTATTN_TILE_ENTRY_(DT) DT,
constexpr int kFeatureTiles[] = {FASTATTN_FEATURE_TILES(FASTATTN_TILE_ENTRY_)};
#undef FASTATTN_TILE_ENTRY_

constexpr int kNumFeatureTiles = static_cast<int>(sizeof(kFeatureTiles) / sizeof(kFeatureTiles[0]));
constexpr int kMaxFeatureTile = kFeatureTiles[kNumFeatureTiles - 1];

// D sub-tile width of the kernels serving a tile (16, 32 or 64).
constexpr int feature_subtile(int tile) { return tile < 64 ? tile : 64; }

constexpr bool feature_tiles_valid() {
  for (int i = 0; i < kNumFeatureTiles; ++i) {
    if (kFeatureTiles[i] % 16 != 0 || kFeatureTiles[i] > 512) return false;
    if (i > 0 && kFeatureTiles[i] <= kFeatureTiles[i - 1]) return false;
  }
  return kNumFeatureTiles > 0;
}
static_assert(feature_tiles_valid(), "FASTATTN_FEATURE_TILES must be ascending multiples of 16, at most 512");

}  // namespace cuda
}  // namespace fastattn
