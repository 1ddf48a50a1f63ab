// CPU kernels of chunked linear attention (forward, backward, decode step); math in
// fastattn/ops/linear_attn/README.md.
//
// Every (batch, query head) is one task of at::parallel_for. A task walks the sequence in chunks of kChunk tokens:
// it reads the chunk of q/k/v/do through their strides into contiguous accumulator-typed tiles whose dimensions are
// zero-padded to kPad, so that the heavy lifting is a handful of register-blocked GEMMs on padded tiles without tail
// handling (gemm() takes its left operand transposed; tiles are transposed in registers where needed). The state
// (S, z) lives in fp32 (fp64 for fp64 inputs) scratch of the task. While a chunk computes, the next chunk's rows are
// prefetched a few cache lines per micro-kernel call.
//
// The backward recomputes the states instead of storing one per chunk: pass A walks forward (prefix states S_t, z_t)
// and produces dq and c_t; pass B walks backward with the reverse sums (R, r) and produces dk and dv.
// Non-causal runs the same passes with the full sums computed first and no intra-chunk terms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastattn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int kChunk = 64;  // tokens per chunk
constexpr int kPad = 16;    // tile dimensions are zero-padded to a multiple of this
#ifdef __AVX512F__
constexpr int kRows = 16;  // rows per micro-kernel call: 16 rows x one 64-byte vector = 16 accumulator registers
#else
constexpr int kRows = 4;
#endif

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ----------------------------------------------------------------------------------------------------------------
// Micro-kernels on contiguous row-major tiles.

enum class Tri { none, lower, upper };  // a triangular operand (diagonal included)

// One 64-byte vector of T (GCC/Clang vector extension, narrower registers without AVX-512). Written out because
// left to itself the compiler vectorises the micro-kernel across rows (gathers) instead of across columns.
template <typename T>
struct Simd {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int width = 64 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(type));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(type)); }
};

// Software prefetch of the next chunk's input rows, spread over the GEMMs of the current chunk: gemm() issues a few
// cache lines before every micro-kernel call while a PrefetchScope is active on the thread. (One burst of
// prefetches per chunk only stalls on the memory system; interleaved with the FMAs the reads overlap compute.)
class Prefetcher {
 public:
  // Rows [0, rows) of `bytes` bytes each, `stride` bytes apart.
  void add(const void* base, int64_t stride, int rows, int64_t bytes) {
    if (count_ < kMaxRanges && rows > 0) ranges_[count_++] = {static_cast<const char*>(base), stride, rows, bytes};
  }
  void step(int lines) {
    for (; lines > 0 && range_ < count_; --lines) {
      const Range& r = ranges_[range_];
      __builtin_prefetch(r.base + row_ * r.stride + offset_, 0, 2);
      if ((offset_ += 64) < r.bytes) continue;
      offset_ = 0;
      if (++row_ < r.rows) continue;
      row_ = 0;
      ++range_;
    }
  }

 private:
  struct Range {
    const char* base;
    int64_t stride;
    int rows;
    int64_t bytes;
  };
  static constexpr int kMaxRanges = 4;
  Range ranges_[kMaxRanges];
  int count_ = 0, range_ = 0, row_ = 0;
  int64_t offset_ = 0;
};

thread_local Prefetcher* active_prefetcher = nullptr;

struct PrefetchScope {
  explicit PrefetchScope(Prefetcher* p) { active_prefetcher = p; }
  ~PrefetchScope() { active_prefetcher = nullptr; }
};

// C[kRows, W] (+)= X[p0:p1, kRows]^T Y[p0:p1, W] for one vector width W. X is the left operand stored transposed
// ("packed"), so each step is one vector load of Y and kRows FMAs broadcasting consecutive floats of one row of X;
// the kRows accumulators stay in registers.
template <typename T>
inline void micro_kernel(int p0, int p1, const T* __restrict X, int ldx, const T* __restrict Y, int ldy,
                         T* __restrict C, int ldc, bool accumulate) {
  using S = Simd<T>;
  typename S::type acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = accumulate ? S::load(C + r * ldc) : typename S::type{};
  for (int p = p0; p < p1; ++p) {
    const typename S::type y = S::load(Y + static_cast<int64_t>(p) * ldy);
    const T* x = X + static_cast<int64_t>(p) * ldx;
    for (int r = 0; r < kRows; ++r) acc[r] += x[r] * y;
  }
  for (int r = 0; r < kRows; ++r) S::store(C + r * ldc, acc[r]);
}

// C[M, N] (+)= X[K, M]^T Y[K, N]: every GEMM here takes its left operand A = X^T in transposed storage. M, N are
// multiples of kPad. a_tri: A is triangular, so each row block of C reduces only over A's nonzeros.
// c_tri: only the blocks of C that touch that triangle are computed (the others are left as they are; callers
// apply keep_triangle afterwards).
template <typename T>
void gemm(int M, int N, int K, const T* X, int ldx, const T* Y, int ldy, T* C, int ldc, bool accumulate,
          Tri a_tri = Tri::none, Tri c_tri = Tri::none) {
  constexpr int NB = Simd<T>::width;
  static_assert(kPad % NB == 0 && kPad % kRows == 0, "tiles must split into whole micro-kernel blocks");
  Prefetcher* prefetcher = active_prefetcher;
  const int lines = std::max(4, K / 4);  // about one line per 64 FMA cycles
  for (int i = 0; i < M; i += kRows) {
    const int p0 = a_tri == Tri::upper ? i : 0;
    const int p1 = a_tri == Tri::lower ? std::min(K, i + kRows) : K;
    const int j0 = c_tri == Tri::upper ? i / NB * NB : 0;
    const int j1 = c_tri == Tri::lower ? std::min(N, round_up(i + kRows, NB)) : N;
    for (int j = j0; j < j1; j += NB) {
      if (prefetcher) prefetcher->step(lines);
      micro_kernel<T>(p0, p1, X + i, ldx, Y + j, ldy, C + static_cast<int64_t>(i) * ldc + j, ldc, accumulate);
    }
  }
}

// Zeroes X[i, j] outside the triangle (j <= i for lower, j >= i for upper) of the n x n top-left block.
template <typename T>
void keep_triangle(T* X, int n, int ld, Tri tri) {
  for (int i = 0; i < n; ++i) {
    T* x = X + static_cast<int64_t>(i) * ld;
    if (tri == Tri::lower)
      std::fill(x + i + 1, x + n, T(0));
    else
      std::fill(x, x + i, T(0));
  }
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FASTATTN_HAS_SHUFFLE 1
#endif
#endif

#ifdef FASTATTN_HAS_SHUFFLE
// One butterfly stage of a W x W register transpose: rows a = i and b = i + s (bit s of i clear) swap their
// off-diagonal s-wide blocks: a' = [a_lo, b_lo] and b' = [a_hi, b_hi] for every 2s-wide block.
template <int s, typename V, size_t... J>
inline V swap_lo(const V& a, const V& b, std::index_sequence<J...>) {
  constexpr int W = sizeof...(J);
  return __builtin_shufflevector(a, b, ((J & s) ? W + J - s : J)...);
}
template <int s, typename V, size_t... J>
inline V swap_hi(const V& a, const V& b, std::index_sequence<J...>) {
  constexpr int W = sizeof...(J);
  return __builtin_shufflevector(a, b, ((J & s) ? W + J : J + s)...);
}
template <typename T, int s>
inline void transpose_stages(typename Simd<T>::type* rows) {
  constexpr int W = Simd<T>::width;
  if constexpr (s > 0) {
    for (int i = 0; i < W; ++i) {
      if (i & s) continue;
      const auto a = rows[i], b = rows[i + s];
      rows[i] = swap_lo<s>(a, b, std::make_index_sequence<W>{});
      rows[i + s] = swap_hi<s>(a, b, std::make_index_sequence<W>{});
    }
    transpose_stages<T, s / 2>(rows);
  }
}
#endif

// dst[j, i] = src[i, j] for a rows x cols block, both multiples of kPad.
template <typename T>
void transpose(const T* src, int rows, int cols, int lds, T* dst, int ldd) {
#ifdef FASTATTN_HAS_SHUFFLE
  using S = Simd<T>;
  constexpr int W = S::width;
  for (int i0 = 0; i0 < rows; i0 += W)
    for (int j0 = 0; j0 < cols; j0 += W) {
      typename S::type r[W];
      for (int i = 0; i < W; ++i) r[i] = S::load(src + static_cast<int64_t>(i0 + i) * lds + j0);
      transpose_stages<T, W / 2>(r);
      for (int j = 0; j < W; ++j) S::store(dst + static_cast<int64_t>(j0 + j) * ldd + i0, r[j]);
    }
#else
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) dst[static_cast<int64_t>(j) * ldd + i] = src[static_cast<int64_t>(i) * lds + j];
#endif
}

// a . b for n a multiple of kPad (padded tile rows), accumulated in one vector of partial sums: a scalar loop would
// be one serial chain (the compiler may not reassociate floating-point sums).
template <typename T>
inline T dot(const T* a, const T* b, int n) {
  using S = Simd<T>;
  typename S::type acc{};
  for (int j = 0; j < n; j += S::width) acc += S::load(a + j) * S::load(b + j);
  T s = 0;
  for (int j = 0; j < S::width; ++j) s += acc[j];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int n) {
  for (int j = 0; j < n; ++j) y[j] += alpha * x[j];
}

// Aligned, zero-initialised scratch blocks owned by one task, freed together.
template <typename T>
class Arena {
 public:
  T* take(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "fastattn: cannot allocate ", bytes, " bytes of scratch");
    std::memset(p, 0, bytes);
    blocks_.emplace_back(p);
    return p;
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<T, Free>> blocks_;
};

// ----------------------------------------------------------------------------------------------------------------
// Strided tensors and tile I/O.

// A [B, H, T, D]-like tensor read through its strides; 3-D [B, H, T] tensors have sd = 0.
template <typename T>
struct View {
  T* data = nullptr;
  int64_t sb = 0, sh = 0, st = 0, sd = 0;

  View() = default;
  explicit View(const Tensor& t) : data(static_cast<T*>(t.data_ptr())) {
    sb = t.stride(0);
    sh = t.stride(1);
    st = t.stride(2);
    sd = t.dim() > 3 ? t.stride(3) : 0;
  }
  static View optional(const OptTensor& t) { return t.has_value() ? View(*t) : View(); }
  explicit operator bool() const { return data != nullptr; }
  T* row(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

struct Chunk {
  int64_t t0;  // first token
  int rows;    // real tokens
  int n;       // rows rounded up to kPad: the extent used by the GEMMs
};

inline Chunk chunk_at(int64_t index, int64_t T) {
  const int64_t t0 = index * kChunk;
  const int rows = static_cast<int>(std::min<int64_t>(kChunk, T - t0));
  return {t0, rows, round_up(rows, kPad)};
}

// dst[i, j] = scale[i] * src[i, j] for i < rows, j < cols (scale nullptr: 1; a zero scale writes a zero row even
// where src is not finite, as if the token were absent); zeros elsewhere in dst[:n, :ld].
template <typename acc_t, typename in_t>
void load_tile(const in_t* src, int64_t st, int64_t sd, int rows, int cols, const acc_t* scale, acc_t* dst, int n,
               int ld) {
  for (int i = 0; i < n; ++i) {
    acc_t* d = dst + static_cast<int64_t>(i) * ld;
    const acc_t s = i < rows ? (scale ? scale[i] : acc_t(1)) : acc_t(0);
    int j = 0;
    if (s != acc_t(0)) {
      const in_t* x = src + i * st;
      if (sd == 1)
        for (; j < cols; ++j) d[j] = s * static_cast<acc_t>(x[j]);
      else
        for (; j < cols; ++j) d[j] = s * static_cast<acc_t>(x[j * sd]);
    }
    std::fill(d + j, d + ld, acc_t(0));
  }
}

// dst[i, j] = scale[i] * src[i, j] for i < rows, j < cols, rounded to out_t.
template <typename out_t, typename acc_t>
void store_tile(const acc_t* src, int ld, int rows, int cols, const acc_t* scale, out_t* dst, int64_t st,
                int64_t sd) {
  for (int i = 0; i < rows; ++i) {
    const acc_t* x = src + static_cast<int64_t>(i) * ld;
    const acc_t s = scale ? scale[i] : acc_t(1);
    out_t* d = dst + i * st;
    if (sd == 1)
      for (int j = 0; j < cols; ++j) d[j] = static_cast<out_t>(s * x[j]);
    else
      for (int j = 0; j < cols; ++j) d[j * sd] = static_cast<out_t>(s * x[j]);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// The problem of one call and what a task of it reads.

struct Dims {
  int64_t B = 0, H = 0, Hv = 0, T = 0, group = 1;
  int D = 0, Dv = 0, Dp = 0, Dvp = 0;  // Dp, Dvp: padded tile widths
  int64_t chunks = 0;
};

inline Dims make_dims(const Tensor& q, const Tensor& v) {
  Dims d;
  d.B = q.size(0);
  d.H = q.size(1);
  d.T = q.size(2);
  d.D = static_cast<int>(q.size(3));
  d.Hv = v.size(1);
  d.Dv = static_cast<int>(v.size(3));
  d.group = d.Hv > 0 ? d.H / d.Hv : 1;
  d.Dp = round_up(d.D, kPad);
  d.Dvp = round_up(d.Dv, kPad);
  d.chunks = (d.T + kChunk - 1) / kChunk;
  return d;
}

template <typename scalar_t>
struct Problem {
  using acc_t = acc_type<scalar_t>;
  Dims dims;
  View<const scalar_t> q, k, v, dout;  // dout: the gradient of o (backward only)
  View<const acc_t> S0, z0, den;       // S0 rows are d, columns e; z0 and den are 3-D
  const bool* mask = nullptr;          // key_mask [B, T]
  int64_t mask_sb = 0, mask_st = 0;
  bool causal = true, normalize = true;
  acc_t eps = 0;
};

// Loads the chunk tiles of one (b, h) task; masked keys become zero rows.
template <typename scalar_t>
struct HeadReader {
  using acc_t = acc_type<scalar_t>;
  const Problem<scalar_t>& p;
  int64_t b, h, hv;

  HeadReader(const Problem<scalar_t>& prob, int64_t b_, int64_t h_)
      : p(prob), b(b_), h(h_), hv(h_ / prob.dims.group) {}

  void q(const Chunk& c, acc_t* dst) const {
    load_tile(p.q.row(b, h, c.t0), p.q.st, p.q.sd, c.rows, p.dims.D, (const acc_t*)nullptr, dst, c.n, p.dims.Dp);
  }
  // keep[i] = 1 for a real key, 0 for a masked one.
  void k(const Chunk& c, acc_t* dst, acc_t* keep) const {
    for (int i = 0; i < c.rows; ++i) keep[i] = !p.mask || p.mask[b * p.mask_sb + (c.t0 + i) * p.mask_st];
    load_tile(p.k.row(b, h, c.t0), p.k.st, p.k.sd, c.rows, p.dims.D, keep, dst, c.n, p.dims.Dp);
  }
  void v(const Chunk& c, acc_t* dst) const {
    load_tile(p.v.row(b, hv, c.t0), p.v.st, p.v.sd, c.rows, p.dims.Dv, (const acc_t*)nullptr, dst, c.n, p.dims.Dvp);
  }
  // g_t = do_t / den_t (normalized) or do_t; den_out receives den_t.
  void g(const Chunk& c, acc_t* dst, acc_t* den_out, acc_t* rden) const {
    const acc_t* scale = nullptr;
    if (p.normalize) {
      for (int i = 0; i < c.rows; ++i) {
        den_out[i] = p.den.row(b, h, c.t0 + i)[0];
        rden[i] = acc_t(1) / den_out[i];
      }
      scale = rden;
    }
    load_tile(p.dout.row(b, h, c.t0), p.dout.st, p.dout.sd, c.rows, p.dims.Dv, scale, dst, c.n, p.dims.Dvp);
  }
  // S (padded [Dp, Dvp], or transposed [Dvp, Dp]) and z from S0, z0; zeros when absent.
  void initial_state(acc_t* S, bool transposed, acc_t* z) const {
    const Dims& d = p.dims;
    if (p.S0) {
      for (int i = 0; i < d.D; ++i) {
        const acc_t* s = p.S0.row(b, h, i);
        for (int j = 0; j < d.Dv; ++j) (transposed ? S[j * d.Dp + i] : S[i * d.Dvp + j]) = s[j * p.S0.sd];
      }
    }
    if (p.normalize && p.z0) {
      const acc_t* z0 = p.z0.row(b, h, 0);
      for (int i = 0; i < d.D; ++i) z[i] = z0[i * p.z0.st];
    }
  }
  // Runs body(chunk) over all chunks (from the last when reverse) while the inputs of the next chunk are
  // prefetched: q and do (qg), k and v (kv).
  template <typename Body>
  void sweep(bool reverse, bool qg, bool kv, Body&& body) const {
    const int64_t chunks = p.dims.chunks;
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t n = reverse ? chunks - 1 - i : i;
      Prefetcher next;
      if (i + 1 < chunks) {
        const Chunk c = chunk_at(reverse ? n - 1 : n + 1, p.dims.T);
        if (qg) add_rows(next, p.q, h, c, p.dims.D);
        if (qg && p.dout) add_rows(next, p.dout, h, c, p.dims.Dv);
        if (kv) add_rows(next, p.k, h, c, p.dims.D);
        if (kv) add_rows(next, p.v, hv, c, p.dims.Dv);
      }
      PrefetchScope scope(&next);
      body(chunk_at(n, p.dims.T));
    }
  }
  template <typename T>
  void add_rows(Prefetcher& pf, const View<T>& x, int64_t head, const Chunk& c, int cols) const {
    pf.add(x.row(b, head, c.t0), x.st * static_cast<int64_t>(sizeof(T)), c.rows,
           ((cols - 1) * x.sd + 1) * static_cast<int64_t>(sizeof(T)));
  }
};

inline bool poison_outputs() {
  const char* env = std::getenv("FASTATTN_POISON");
  return env != nullptr && std::string(env) == "1";
}

inline Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  Tensor t = at::empty(sizes, opts);
  if (poison && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// [B, H, T, last] laid out like `like` (physically [B, T, H, last] when like is a transposed "bthd" view).
inline Tensor new_output_like(const Tensor& like, int64_t last, at::ScalarType dtype, bool poison) {
  const auto opts = like.options().dtype(dtype);
  const int64_t B = like.size(0), H = like.size(1), T = like.size(2);
  if (like.stride(1) < like.stride(2)) return new_output({B, T, H, last}, opts, poison).transpose(1, 2);
  return new_output({B, H, T, last}, opts, poison);
}

// ----------------------------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
struct ForwardOut {
  using acc_t = acc_type<scalar_t>;
  View<scalar_t> o;
  acc_t *S, *z, *den;  // contiguous [B, H, D, Dv], [B, H, D], [B, H, T]
};

template <typename scalar_t>
void forward_head(const Problem<scalar_t>& p, const ForwardOut<scalar_t>& out, int64_t b, int64_t h) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.dims;
  const HeadReader<scalar_t> in(p, b, h);
  const int Dp = d.Dp, Dvp = d.Dvp;
  Arena<acc_t> arena;
  acc_t* Q = arena.take(kChunk * Dp);
  acc_t* Qt = arena.take(Dp * kChunk);
  acc_t* K = arena.take(kChunk * Dp);
  acc_t* Kt = arena.take(Dp * kChunk);
  acc_t* V = arena.take(kChunk * Dvp);
  acc_t* At = arena.take(kChunk * kChunk);  // transposed causal scores: At[s, t] = k_s . q_t for s <= t
  acc_t* num = arena.take(kChunk * Dvp);
  acc_t* S = arena.take(static_cast<int64_t>(Dp) * Dvp);
  acc_t* z = arena.take(Dp);
  acc_t* den = arena.take(kChunk);
  acc_t* rden = arena.take(kChunk);
  acc_t* keep = arena.take(kChunk);
  in.initial_state(S, /*transposed=*/false, z);

  auto load_kv = [&](const Chunk& c) {
    in.k(c, K, keep);
    in.v(c, V);
  };
  auto accumulate_state = [&](const Chunk& c) {  // S += K^T V, z += K^T 1
    gemm(Dp, Dvp, c.n, K, Dp, V, Dvp, S, Dvp, /*accumulate=*/true);
    if (p.normalize)
      for (int i = 0; i < c.rows; ++i) axpy(acc_t(1), K + i * Dp, z, Dp);
  };

  if (!p.causal) {  // every query sees the full sums
    in.sweep(/*reverse=*/false, /*qg=*/false, /*kv=*/true, [&](const Chunk& c) {
      load_kv(c);
      accumulate_state(c);
    });
  }
  in.sweep(/*reverse=*/false, /*qg=*/true, /*kv=*/p.causal, [&](const Chunk& c) {
    in.q(c, Q);
    transpose(Q, c.n, Dp, Dp, Qt, kChunk);
    if (p.causal) {  // intra-chunk: num = tril(Q K^T) V
      load_kv(c);
      transpose(K, c.n, Dp, Dp, Kt, kChunk);
      gemm(c.n, c.n, Dp, Kt, kChunk, Qt, kChunk, At, kChunk, false, Tri::none, Tri::upper);
      keep_triangle(At, c.n, kChunk, Tri::upper);
      gemm(c.n, Dvp, c.n, At, kChunk, V, Dvp, num, Dvp, false, Tri::lower);
    }
    gemm(c.n, Dvp, Dp, Qt, kChunk, S, Dvp, num, Dvp, /*accumulate=*/p.causal);  // inter-chunk: num += Q S_prev
    if (p.normalize) {  // den_t = q_t . z_prev + sum_{s <= t} k_s . q_t + eps
      std::fill(den, den + c.n, p.eps);
      for (int j = 0; j < d.D; ++j) axpy(z[j], Qt + j * kChunk, den, c.n);
      if (p.causal)
        for (int s = 0; s < c.rows; ++s) axpy(acc_t(1), At + s * kChunk, den, c.n);
      for (int i = 0; i < c.rows; ++i) rden[i] = acc_t(1) / den[i];
      std::copy(den, den + c.rows, out.den + (b * d.H + h) * d.T + c.t0);
    }
    store_tile(num, Dvp, c.rows, d.Dv, p.normalize ? rden : nullptr, out.o.row(b, h, c.t0), out.o.st, out.o.sd);
    if (p.causal) accumulate_state(c);
  });

  acc_t* S_out = out.S + (b * d.H + h) * d.D * d.Dv;
  for (int i = 0; i < d.D; ++i) std::copy(S + i * Dvp, S + i * Dvp + d.Dv, S_out + i * d.Dv);
  if (p.normalize) std::copy(z, z + d.D, out.z + (b * d.H + h) * d.D);
}

// ----------------------------------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t>
struct BackwardOut {
  using acc_t = acc_type<scalar_t>;
  View<scalar_t> dq, dk;
  View<scalar_t> dv;       // [B, Hv, T, Dv] when every value head has one query head, else unused
  View<acc_t> dv_partial;  // [B, H, T, Dv] per query head contributions (GQA), reduced afterwards
  View<const acc_t> dS, dz;
  acc_t *dS0, *dz0;  // contiguous [B, H, D, Dv], [B, H, D]
};

template <typename scalar_t>
void backward_head(const Problem<scalar_t>& p, const BackwardOut<scalar_t>& out, int64_t b, int64_t h) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.dims;
  const HeadReader<scalar_t> in(p, b, h);
  const int Dp = d.Dp, Dvp = d.Dvp;
  Arena<acc_t> arena;
  acc_t* Q = arena.take(kChunk * Dp);
  acc_t* Qt = arena.take(Dp * kChunk);
  acc_t* K = arena.take(kChunk * Dp);
  acc_t* Kt = arena.take(Dp * kChunk);
  acc_t* V = arena.take(kChunk * Dvp);
  acc_t* Vt = arena.take(Dvp * kChunk);
  acc_t* G = arena.take(kChunk * Dvp);
  acc_t* Gt = arena.take(Dvp * kChunk);
  acc_t* W = arena.take(kChunk * kChunk);  // intra-chunk score tile
  acc_t* dQK = arena.take(kChunk * Dp);    // dq (pass A) or dk (pass B) of the chunk
  acc_t* dV = arena.take(kChunk * Dvp);
  acc_t* state = arena.take(static_cast<int64_t>(Dp) * Dvp);   // S^T [Dvp, Dp] in pass A, R [Dp, Dvp] in pass B
  acc_t* stateT = arena.take(static_cast<int64_t>(Dp) * Dvp);  // R^T [Dvp, Dp] in pass B
  acc_t* z = arena.take(Dp);                                   // z in pass A, r in pass B
  acc_t* c_all = arena.take(d.T);                              // c_t of the whole sequence
  acc_t* den = arena.take(kChunk);
  acc_t* rden = arena.take(kChunk);
  acc_t* keep = arena.take(kChunk);
  const int64_t bh = b * d.H + h;
  auto load_kv = [&](const Chunk& c) {
    in.k(c, K, keep);
    in.v(c, V);
  };
  auto load_qg = [&](const Chunk& c) {
    in.q(c, Q);
    in.g(c, G, den, rden);
  };

  // ---- pass A, forward order: u_t = S_t g_t, c_t = -(q_t . u_t) / den_t, dq_t = u_t + c_t z_t.
  acc_t* St = state;
  in.initial_state(St, /*transposed=*/true, z);
  auto accumulate_state = [&](const Chunk& c, bool with_z) {  // S^T += V^T K, z += K^T 1
    gemm(Dvp, Dp, c.n, V, Dvp, K, Dp, St, Dp, /*accumulate=*/true);
    if (with_z && p.normalize)
      for (int i = 0; i < c.rows; ++i) axpy(acc_t(1), K + i * Dp, z, Dp);
  };
  if (!p.causal) {
    in.sweep(/*reverse=*/false, /*qg=*/false, /*kv=*/true, [&](const Chunk& c) {
      load_kv(c);
      accumulate_state(c, true);
    });
  }
  in.sweep(/*reverse=*/false, /*qg=*/true, /*kv=*/p.causal, [&](const Chunk& c) {
    load_qg(c);
    transpose(G, c.n, Dvp, Dvp, Gt, kChunk);
    if (p.causal) {  // U = M K with M = tril(G V^T), built transposed: Mt[s, t] = v_s . g_t for s <= t
      load_kv(c);
      transpose(V, c.n, Dvp, Dvp, Vt, kChunk);
      gemm(c.n, c.n, Dvp, Vt, kChunk, Gt, kChunk, W, kChunk, false, Tri::none, Tri::upper);
      keep_triangle(W, c.n, kChunk, Tri::upper);
      gemm(c.n, Dp, c.n, W, kChunk, K, Dp, dQK, Dp, false, Tri::lower);
    }
    gemm(c.n, Dp, Dvp, Gt, kChunk, St, Dp, dQK, Dp, /*accumulate=*/p.causal);  // U += G S_prev^T
    if (p.normalize) {
      // c_t from the fp32 u_t (never from a rounded o): do_t . o_t = q_t . u_t.
      for (int i = 0; i < c.rows; ++i) {
        acc_t* u = dQK + i * Dp;
        if (p.causal) axpy(acc_t(1), K + i * Dp, z, Dp);  // z becomes z_t, the prefix including token t
        const acc_t ci = -dot(Q + i * Dp, u, Dp) * rden[i];
        c_all[c.t0 + i] = ci;
        axpy(ci, z, u, Dp);
      }
    }
    store_tile(dQK, Dp, c.rows, d.D, (const acc_t*)nullptr, out.dq.row(b, h, c.t0), out.dq.st, out.dq.sd);
    if (p.causal) accumulate_state(c, /*with_z=*/false);  // z was advanced token by token above
  });

  // ---- pass B, reverse order: R_s = dS + sum_{t>=s} q_t^T g_t, r_s = dz + sum_{t>=s} c_t q_t,
  // dk_s = R_s v_s + r_s, dv_s = R_s^T k_s.
  acc_t* R = state;
  acc_t* Rt = stateT;
  acc_t* r = z;
  std::fill(R, R + static_cast<int64_t>(Dp) * Dvp, acc_t(0));
  std::fill(r, r + Dp, acc_t(0));
  if (out.dS)
    for (int i = 0; i < d.D; ++i)
      for (int j = 0; j < d.Dv; ++j) R[i * Dvp + j] = out.dS.row(b, h, i)[j * out.dS.sd];
  if (p.normalize && out.dz)
    for (int i = 0; i < d.D; ++i) r[i] = out.dz.row(b, h, 0)[i * out.dz.st];
  auto accumulate_reverse = [&](const Chunk& c) {  // R += Q^T G, r += Q^T c
    gemm(Dp, Dvp, c.n, Q, Dp, G, Dvp, R, Dvp, /*accumulate=*/true);
    if (p.normalize)
      for (int i = 0; i < c.rows; ++i) axpy(c_all[c.t0 + i], Q + i * Dp, r, Dp);
  };
  if (!p.causal) {
    in.sweep(/*reverse=*/false, /*qg=*/true, /*kv=*/false, [&](const Chunk& c) {
      load_qg(c);
      accumulate_reverse(c);
    });
  }
  in.sweep(/*reverse=*/true, /*qg=*/true, /*kv=*/true, [&](const Chunk& c) {
    load_qg(c);
    load_kv(c);
    transpose(K, c.n, Dp, Dp, Kt, kChunk);
    transpose(V, c.n, Dvp, Dvp, Vt, kChunk);
    if (p.causal) {
      transpose(Q, c.n, Dp, Dp, Qt, kChunk);
      transpose(G, c.n, Dvp, Dvp, Gt, kChunk);
      // dk = P^T Q with P[t, s] = g_t . v_s + c_t for s <= t (the value augmented by a 1, g by c).
      gemm(c.n, c.n, Dvp, Gt, kChunk, Vt, kChunk, W, kChunk, false, Tri::none, Tri::lower);
      keep_triangle(W, c.n, kChunk, Tri::lower);
      if (p.normalize)
        for (int t = 0; t < c.rows; ++t) {
          const acc_t ct = c_all[c.t0 + t];
          acc_t* w = W + t * kChunk;
          for (int s = 0; s <= t; ++s) w[s] += ct;
        }
      gemm(c.n, Dp, c.n, W, kChunk, Q, Dp, dQK, Dp, false, Tri::upper);
      // dv = A^T G with A[t, s] = q_t . k_s for s <= t
      gemm(c.n, c.n, Dp, Qt, kChunk, Kt, kChunk, W, kChunk, false, Tri::none, Tri::lower);
      keep_triangle(W, c.n, kChunk, Tri::lower);
      gemm(c.n, Dvp, c.n, W, kChunk, G, Dvp, dV, Dvp, false, Tri::upper);
    }
    transpose(R, Dp, Dvp, Dvp, Rt, Dp);
    gemm(c.n, Dp, Dvp, Vt, kChunk, Rt, Dp, dQK, Dp, /*accumulate=*/p.causal);  // dk += V R_next^T
    gemm(c.n, Dvp, Dp, Kt, kChunk, R, Dvp, dV, Dvp, /*accumulate=*/p.causal);   // dv += K R_next
    for (int i = 0; i < c.rows; ++i) {
      acc_t* dk = dQK + i * Dp;
      if (keep[i] == acc_t(0))
        std::fill(dk, dk + Dp, acc_t(0));
      else if (p.normalize)
        axpy(acc_t(1), r, dk, Dp);
    }
    store_tile(dQK, Dp, c.rows, d.D, (const acc_t*)nullptr, out.dk.row(b, h, c.t0), out.dk.st, out.dk.sd);
    if (out.dv_partial)
      store_tile(dV, Dvp, c.rows, d.Dv, (const acc_t*)nullptr, out.dv_partial.row(b, h, c.t0), out.dv_partial.st,
                 out.dv_partial.sd);
    else
      store_tile(dV, Dvp, c.rows, d.Dv, (const acc_t*)nullptr, out.dv.row(b, h, c.t0), out.dv.st, out.dv.sd);
    if (p.causal) accumulate_reverse(c);
  });

  acc_t* dS0 = out.dS0 + bh * d.D * d.Dv;
  for (int i = 0; i < d.D; ++i) std::copy(R + i * Dvp, R + i * Dvp + d.Dv, dS0 + i * d.Dv);
  if (p.normalize) std::copy(r, r + d.D, out.dz0 + bh * d.D);
}

// dv[b, hv] = sum of dv_partial over the query heads of group hv, rounded once.
template <typename scalar_t>
void reduce_value_grads(const Dims& d, const View<acc_type<scalar_t>>& part, const View<scalar_t>& dv) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, d.B * d.Hv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(d.Dv);
    for (int64_t bhv = begin; bhv < end; ++bhv) {
      const int64_t b = bhv / d.Hv, hv = bhv % d.Hv;
      for (int64_t t = 0; t < d.T; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t g = 0; g < d.group; ++g) axpy(acc_t(1), part.row(b, hv * d.group + g, t), sum.data(), d.Dv);
        scalar_t* o = dv.row(b, hv, t);
        for (int j = 0; j < d.Dv; ++j) o[j * dv.sd] = static_cast<scalar_t>(sum[j]);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------------------------
// Argument checks (the Python interface validates properly; these keep misuse from C++ from reading out of bounds).

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastattn CPU linear_attn: ", name, " must be a CPU tensor, got ", t.device());
}

void check_state(const OptTensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK(t->sizes() == shape, "fastattn CPU linear_attn: ", name, " must have shape ", shape, ", got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "fastattn CPU linear_attn: ", name, " must be ", dtype, ", got ",
              t->scalar_type());
}

at::ScalarType state_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& key_mask) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastattn CPU linear_attn: q, k, v must be 4-D");
  TORCH_CHECK(k.sizes() == q.sizes(), "fastattn CPU linear_attn: k must have q's shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastattn CPU linear_attn: q, k, v must share one dtype");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2), "fastattn CPU linear_attn: v must be [B, Hv, T, Dv]");
  TORCH_CHECK(v.size(1) > 0 && q.size(1) % v.size(1) == 0, "fastattn CPU linear_attn: H must be a multiple of Hv");
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, "fastattn CPU linear_attn: D and Dv must be positive");
  if (key_mask.has_value()) {
    check_cpu(*key_mask, "key_mask");
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == q.size(0) &&
                    key_mask->size(1) == q.size(2),
                "fastattn CPU linear_attn: key_mask must be a [B, T] bool tensor");
  }
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& S0,
                               const OptTensor& z0, const OptTensor& key_mask, bool causal, bool normalize,
                               double eps) {
  using acc_t = acc_type<scalar_t>;
  Problem<scalar_t> p;
  p.dims = make_dims(q, v);
  p.q = View<const scalar_t>(q);
  p.k = View<const scalar_t>(k);
  p.v = View<const scalar_t>(v);
  p.S0 = View<const acc_t>::optional(S0);
  if (normalize) p.z0 = View<const acc_t>::optional(z0);
  if (key_mask.has_value()) {
    p.mask = key_mask->data_ptr<bool>();
    p.mask_sb = key_mask->stride(0);
    p.mask_st = key_mask->stride(1);
  }
  p.causal = causal;
  p.normalize = normalize;
  p.eps = static_cast<acc_t>(eps);
  return p;
}

// ----------------------------------------------------------------------------------------------------------------
// Ops.

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const OptTensor& S0, const OptTensor& z0,
                                                           const OptTensor& key_mask, bool causal, bool normalize,
                                                           double eps) {
  check_inputs(q, k, v, key_mask);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  const auto sdt = state_dtype(q.scalar_type());
  check_state(S0, "S0", {B, H, D, Dv}, sdt);
  check_state(z0, "z0", {B, H, D}, sdt);
  const bool poison = poison_outputs();
  const auto sopts = q.options().dtype(sdt);
  Tensor o = new_output_like(q, Dv, q.scalar_type(), poison);
  Tensor S = new_output({B, H, D, Dv}, sopts, poison);
  Tensor z = normalize ? new_output({B, H, D}, sopts, poison) : at::empty({0}, sopts);
  Tensor den = normalize ? new_output({B, H, T}, sopts, poison) : at::empty({0}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn::linear_attn_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_problem<scalar_t>(q, k, v, S0, z0, key_mask, causal, normalize, eps);
    ForwardOut<scalar_t> out{View<scalar_t>(o), S.data_ptr<acc_t>(), normalize ? z.data_ptr<acc_t>() : nullptr,
                             normalize ? den.data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) forward_head(p, out, bh / H, bh % H);
    });
  });
  return {o, S, z, den};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attn_bwd(
    const Tensor& dout, const OptTensor& dS, const OptTensor& dz, const Tensor& q, const Tensor& k, const Tensor& v,
    const OptTensor& den, const OptTensor& S0, const OptTensor& z0, const OptTensor& key_mask, bool causal,
    bool normalize, double eps) {
  check_inputs(q, k, v, key_mask);
  const int64_t B = q.size(0), H = q.size(1), Hv = v.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  const auto sdt = state_dtype(q.scalar_type());
  check_cpu(dout, "do");
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == B && dout.size(1) == H && dout.size(2) == T && dout.size(3) == Dv,
              "fastattn CPU linear_attn: do must be [B, H, T, Dv]");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fastattn CPU linear_attn: do must have q's dtype");
  check_state(dS, "dS", {B, H, D, Dv}, sdt);
  check_state(dz, "dz", {B, H, D}, sdt);
  check_state(S0, "S0", {B, H, D, Dv}, sdt);
  check_state(z0, "z0", {B, H, D}, sdt);
  if (normalize) {
    TORCH_CHECK(den.has_value(), "fastattn CPU linear_attn: den (saved by the forward) is required when normalize");
    check_state(den, "den", {B, H, T}, sdt);
  }
  const bool poison = poison_outputs();
  const auto sopts = q.options().dtype(sdt);
  Tensor dq = new_output_like(q, D, q.scalar_type(), poison);
  Tensor dk = new_output_like(k, D, q.scalar_type(), poison);
  Tensor dv = new_output_like(v, Dv, q.scalar_type(), poison);
  Tensor dS0 = new_output({B, H, D, Dv}, sopts, poison);
  Tensor dz0 = normalize ? new_output({B, H, D}, sopts, poison) : at::empty({0}, sopts);
  const bool gqa = H != Hv;
  Tensor dv_partial = gqa ? new_output({B, H, T, Dv}, sopts, poison) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn::linear_attn_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    auto p = make_problem<scalar_t>(q, k, v, S0, z0, key_mask, causal, normalize, eps);
    p.dout = View<const scalar_t>(dout);
    if (normalize) p.den = View<const acc_t>(*den);
    BackwardOut<scalar_t> out;
    out.dq = View<scalar_t>(dq);
    out.dk = View<scalar_t>(dk);
    out.dv = View<scalar_t>(dv);
    if (gqa) out.dv_partial = View<acc_t>(dv_partial);
    out.dS = View<const acc_t>::optional(dS);
    if (normalize) out.dz = View<const acc_t>::optional(dz);
    out.dS0 = dS0.data_ptr<acc_t>();
    out.dz0 = normalize ? dz0.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) backward_head(p, out, bh / H, bh % H);
    });
    if (gqa) reduce_value_grads<scalar_t>(p.dims, out.dv_partial, out.dv);
  });
  return {dq, dk, dv, dS0, dz0};
}

// One decode token: S += k^T v, z += k, o = q S / (q . z + eps), state updated in place.
Tensor linear_attn_step(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& S, const OptTensor& z,
                        bool normalize, double eps) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  check_cpu(S, "S");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0),
              "fastattn CPU linear_attn_step: q, k must be [B, H, D] and v [B, Hv, Dv]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastattn CPU linear_attn_step: q, k, v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hv = v.size(1), Dv = v.size(2);
  TORCH_CHECK(Hv > 0 && H % Hv == 0, "fastattn CPU linear_attn_step: H must be a multiple of Hv");
  const auto sdt = state_dtype(q.scalar_type());
  check_state(S, "S", {B, H, D, Dv}, sdt);
  if (normalize) {
    TORCH_CHECK(z.has_value(), "fastattn CPU linear_attn_step: z is required when normalize");
    check_state(z, "z", {B, H, D}, sdt);
  }
  Tensor o = new_output({B, H, Dv}, q.options(), poison_outputs());
  const int64_t group = H / Hv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn::linear_attn_step", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    acc_t* Sp = S.data_ptr<acc_t>();
    acc_t* zp = normalize ? z->data_ptr<acc_t>() : nullptr;
    scalar_t* op = o.data_ptr<scalar_t>();
    const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), Ss = S.strides(), os = o.strides();
    const auto zs = normalize ? z->strides() : qs;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D * Dv));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> vrow(Dv), orow(Dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const scalar_t* qr = qp + b * qs[0] + h * qs[1];
        const scalar_t* kr = kp + b * ks[0] + h * ks[1];
        const scalar_t* vr = vp + b * vs[0] + (h / group) * vs[1];
        for (int64_t j = 0; j < Dv; ++j) vrow[j] = static_cast<acc_t>(vr[j * vs[2]]);
        std::fill(orow.begin(), orow.end(), acc_t(0));
        acc_t qz = 0;
        for (int64_t i = 0; i < D; ++i) {
          const acc_t ki = static_cast<acc_t>(kr[i * ks[2]]), qi = static_cast<acc_t>(qr[i * qs[2]]);
          acc_t* s = Sp + b * Ss[0] + h * Ss[1] + i * Ss[2];
          for (int64_t j = 0; j < Dv; ++j) {
            s[j * Ss[3]] += ki * vrow[j];
            orow[j] += qi * s[j * Ss[3]];
          }
          if (normalize) {
            acc_t& zi = zp[b * zs[0] + h * zs[1] + i * zs[2]];
            zi += ki;
            qz += qi * zi;
          }
        }
        const acc_t scale = normalize ? acc_t(1) / (qz + static_cast<acc_t>(eps)) : acc_t(1);
        scalar_t* orow_out = op + b * os[0] + h * os[1];
        for (int64_t j = 0; j < Dv; ++j) orow_out[j * os[2]] = static_cast<scalar_t>(orow[j] * scale);
      }
    });
  });
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("linear_attn_fwd", &linear_attn_fwd);
  m.impl("linear_attn_bwd", &linear_attn_bwd);
  m.impl("linear_attn_step", &linear_attn_step);
}

}  // namespace fastattn
