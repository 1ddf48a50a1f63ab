// CPU kernels of seq_logps (math: fastattn/ops/seq_logps/reference.py).
//
// The response tokens (mask True) are walked in chunks of token_chunk rows and the vocabulary in chunks of
// vocab_chunk columns. Each logits tile is one at::mm_out (MKL/oneDNN GEMM) into a reused accumulator-typed
// buffer, followed by ONE fused pass per row while the row is in cache: the forward updates the online
// logsumexp (running max and rescaled sum) and picks the label logit; the backward overwrites the tile with the
// scaled softmax gradient g (onehot - p) and two addmm_ calls accumulate dh += G W and dW += G^T h. The chunked
// torch backend needs four to five memory passes over every tile (amax, subtract, exp, sum, ...) for the same.
//
// fp32 accumulation for fp16/bf16/fp32 inputs (fp64 for fp64): exp is a degree-7 polynomial on 16-wide
// vectors for fp32 (relative error ~1e-7, a few ulp) and std::exp for fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace fastattn {
namespace {

using at::Tensor;

// Default tiles: 1024 x 4096 (16 MiB fp32). Smaller, cache-resident tiles (256 x 2048) were no faster on two
// cores and much slower when the cores are shared: every tile costs two parallel regions (GEMM, fused pass).
constexpr int64_t kTokenChunk = 1024;
constexpr int64_t kVocabChunk = 4096;
constexpr int kW = 16;

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

// e^x = 2^n 2^f with n = round(x log2 e), |f| <= 1/2; 2^f by its Taylor polynomial of degree 7 (error < 5e-9).
// x is clamped to [-87, 88] so that 2^n stays a normal float: e^-87 ~ 1.6e-38 stands in for 0 (underflow).
inline vf exp_vec(vf x) {
  const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf t = x * 1.4426950408889634f;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf n = (t + magic) - magic;
  const vf f = t - n;
  vf p = vf{} + 1.5252733804059841e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284770e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_one(float x) {
  vf v = vf{} + x;
  return exp_vec(v)[0];
}

inline double exp_one(double x) { return std::exp(x); }

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// max of x[0:n]
template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// sum_j exp(x[j] - m)
float row_sum_exp(const float* x, int64_t n, float m) {
  int64_t j = 0;
  vf acc = vf{};
  for (; j + kW <= n; j += kW) acc += exp_vec(load(x + j) - m);
  float s = 0.0f;
  for (int i = 0; i < kW; ++i) s += acc[i];
  for (; j < n; ++j) s += exp_one(x[j] - m);
  return s;
}

double row_sum_exp(const double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - m);
  return s;
}

// x[j] <- -g exp(x[j] - l): the softmax part of g (onehot - p)
void row_neg_scaled_softmax(float* x, int64_t n, float l, float g) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) store(x + j, exp_vec(load(x + j) - l) * -g);
  for (; j < n; ++j) x[j] = -g * exp_one(x[j] - l);
}

void row_neg_scaled_softmax(double* x, int64_t n, double l, double g) {
  for (int64_t j = 0; j < n; ++j) x[j] = -g * std::exp(x[j] - l);
}

struct Rows {
  Tensor idx, b, t, labels;  // [N] flat index, batch, time, label of every response token
};

Rows response_rows(const Tensor& mask, const Tensor& labels, int64_t T) {
  Rows r;
  r.idx = mask.reshape({-1}).nonzero().squeeze(-1);
  r.b = at::floor_divide(r.idx, T);
  r.t = r.idx - r.b * T;
  r.labels = labels.reshape({-1}).index_select(0, r.idx).contiguous();
  return r;
}

void check(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const Tensor& mask) {
  TORCH_CHECK(hidden.dim() == 3 && weight.dim() == 2 && hidden.size(2) == weight.size(1),
              "seq_logps: hidden [B, T, d] and weight [V, d] expected");
  TORCH_CHECK(labels.scalar_type() == at::kLong && mask.scalar_type() == at::kBool,
              "seq_logps: labels int64 and mask bool expected");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "seq_logps: CPU tensors expected");
}

template <typename acc_t>
std::tuple<Tensor, Tensor> fwd_impl(const Tensor& hidden, const Tensor& weight, const Rows& rows, int64_t tc,
                                    int64_t vc) {
  const int64_t B = hidden.size(0), T = hidden.size(1), V = weight.size(0);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = hidden.options().dtype(acc);
  Tensor logps = at::zeros({B}, opts);
  Tensor lse_flat = at::zeros({B * T}, opts);
  const int64_t N = rows.idx.numel();
  if (N == 0) return {logps, lse_flat.view({B, T})};
  const Tensor w = weight.to(acc).contiguous();
  const int64_t tc_ = std::min(tc, N), vc_ = std::min(vc, V);
  Tensor buf = at::empty({tc_ * vc_}, opts);
  Tensor lse_rows = at::empty({N}, opts), logp_rows = at::empty({N}, opts);
  const int64_t* lab = rows.labels.data_ptr<int64_t>();
  for (int64_t s = 0; s < N; s += tc_) {
    const int64_t n = std::min(tc_, N - s);
    const Tensor h = hidden.index({rows.b.narrow(0, s, n), rows.t.narrow(0, s, n)}).to(acc).contiguous();
    std::vector<acc_t> m(n, -std::numeric_limits<acc_t>::infinity()), sum(n, 0), tgt(n, 0);
    for (int64_t v0 = 0; v0 < V; v0 += vc_) {
      const int64_t vn = std::min(vc_, V - v0);
      Tensor tile = buf.narrow(0, 0, n * vn).view({n, vn});
      at::mm_out(tile, h, w.narrow(0, v0, vn).t());
      const acc_t* x = tile.data_ptr<acc_t>();
      at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const acc_t* xr = x + r * vn;
          const acc_t m_new = std::max(m[r], row_max(xr, vn));
          // the running sum is rescaled to the new max (exp(-inf) = 0 on the first tile)
          sum[r] = sum[r] * exp_one(m[r] - m_new) + row_sum_exp(xr, vn, m_new);
          m[r] = m_new;
          const int64_t j = lab[s + r] - v0;
          if (j >= 0 && j < vn) tgt[r] = xr[j];
        }
      });
    }
    acc_t* lse_p = lse_rows.data_ptr<acc_t>() + s;
    acc_t* lp_p = logp_rows.data_ptr<acc_t>() + s;
    for (int64_t r = 0; r < n; ++r) {
      lse_p[r] = m[r] + std::log(sum[r]);
      lp_p[r] = tgt[r] - lse_p[r];
    }
  }
  lse_flat.index_put_({rows.idx}, lse_rows);
  logps.index_add_(0, rows.b, logp_rows);
  return {logps, lse_flat.view({B, T})};
}

template <typename acc_t>
std::tuple<Tensor, Tensor> bwd_impl(const Tensor& grad, const Tensor& hidden, const Tensor& weight,
                                    const Rows& rows, const Tensor& lse, int64_t tc, int64_t vc) {
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2), V = weight.size(0);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = hidden.options().dtype(acc);
  Tensor dh_flat = at::zeros({B * T, d}, hidden.options());
  Tensor dw = at::zeros({V, d}, opts);
  const int64_t N = rows.idx.numel();
  if (N == 0) return {dh_flat.view({B, T, d}), dw.to(weight.scalar_type())};
  const Tensor w = weight.to(acc).contiguous();
  const Tensor l_rows = lse.reshape({-1}).index_select(0, rows.idx).to(acc).contiguous();
  const Tensor g_rows = grad.to(acc).index_select(0, rows.b).contiguous();
  const int64_t tc_ = std::min(tc, N), vc_ = std::min(vc, V);
  Tensor buf = at::empty({tc_ * vc_}, opts);
  const int64_t* lab = rows.labels.data_ptr<int64_t>();
  for (int64_t s = 0; s < N; s += tc_) {
    const int64_t n = std::min(tc_, N - s);
    const Tensor h = hidden.index({rows.b.narrow(0, s, n), rows.t.narrow(0, s, n)}).to(acc).contiguous();
    Tensor dh = at::zeros({n, d}, opts);
    const acc_t* l = l_rows.data_ptr<acc_t>() + s;
    const acc_t* g = g_rows.data_ptr<acc_t>() + s;
    for (int64_t v0 = 0; v0 < V; v0 += vc_) {
      const int64_t vn = std::min(vc_, V - v0);
      Tensor tile = buf.narrow(0, 0, n * vn).view({n, vn});
      const Tensor wv = w.narrow(0, v0, vn);
      at::mm_out(tile, h, wv.t());
      acc_t* x = tile.data_ptr<acc_t>();
      at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          acc_t* xr = x + r * vn;
          row_neg_scaled_softmax(xr, vn, l[r], g[r]);
          const int64_t j = lab[s + r] - v0;
          if (j >= 0 && j < vn) xr[j] += g[r];
        }
      });
      dh.addmm_(tile, wv);
      dw.narrow(0, v0, vn).addmm_(tile.t(), h);
    }
    dh_flat.index_put_({rows.idx.narrow(0, s, n)}, dh.to(hidden.scalar_type()));
  }
  return {dh_flat.view({B, T, d}), dw.to(weight.scalar_type())};
}

int64_t or_default(int64_t v, int64_t def) { return v > 0 ? v : def; }

std::tuple<Tensor, Tensor> logps_fwd(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                     const Tensor& mask, int64_t token_chunk, int64_t vocab_chunk) {
  check(hidden, weight, labels, mask);
  const Rows rows = response_rows(mask, labels, hidden.size(1));
  const int64_t tc = or_default(token_chunk, kTokenChunk), vc = or_default(vocab_chunk, kVocabChunk);
  if (hidden.scalar_type() == at::kDouble) return fwd_impl<double>(hidden, weight, rows, tc, vc);
  return fwd_impl<float>(hidden, weight, rows, tc, vc);
}

std::tuple<Tensor, Tensor> logps_bwd(const Tensor& grad, const Tensor& hidden, const Tensor& weight,
                                     const Tensor& labels, const Tensor& mask, const Tensor& lse,
                                     int64_t token_chunk, int64_t vocab_chunk) {
  check(hidden, weight, labels, mask);
  const Rows rows = response_rows(mask, labels, hidden.size(1));
  const int64_t tc = or_default(token_chunk, kTokenChunk), vc = or_default(vocab_chunk, kVocabChunk);
  if (hidden.scalar_type() == at::kDouble) return bwd_impl<double>(grad, hidden, weight, rows, lse, tc, vc);
  return bwd_impl<float>(grad, hidden, weight, rows, lse, tc, vc);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lm_head_logps_fwd", &logps_fwd);
  m.impl("lm_head_logps_bwd", &logps_bwd);
}

}  // namespace fastattn
