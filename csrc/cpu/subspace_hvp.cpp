// CPU kernel of the fused GLM subspace Hessian (op fastattn::subspace_hvp_glm_fused; math in
// fastattn/ops/subspace_hvp/reference.py, sketch hash in fastattn/ops/subspace_hvp/sketch.py).
//
// f(x) = loss_scale * sum_i loss(a_i . x; y_i) + lam * sum_j reg(x_j). A is streamed in blocks of kRows rows:
// per block one GEMM gives the tile B = A_blk P^T (kRows x s, never the whole m x s matrix) and a GEMV the margins
// z = A_blk x, the loss derivatives are taken on z, and B^T diag(loss'') B, B^T loss' are accumulated into [s, s],
// [s] in the accumulation type (fp32 for fp32 inputs, fp64 for fp64). Gaussian / Rademacher P are generated here from the seed
// with the counter hash every backend shares. Blocks run in order and BLAS tiles are deterministic, so a call is
// reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../sketch_hash.h"

namespace fastattn {
namespace {

using at::Tensor;

constexpr int64_t kRows = 512;  // rows of A per block: B tile of kRows x s stays in cache

// out [s, n] = scale * P of the hashed kinds (1 gaussian, 2 rademacher), values in fp64 then cast.
template <typename T>
void fill_sketch(T* out, int64_t s, int64_t n, int64_t so, int64_t kind, int64_t seed, double scale) {
  const uint32_t key = sketch_key(seed);
  at::parallel_for(0, s, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* row = out + i * so;
      if (kind == 2) {   // sign bit only: branch-free and vectorisable
        const uint32_t rk = sketch_mix32(static_cast<uint32_t>(i) + key);
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t h1 = sketch_mix32(static_cast<uint32_t>(j) ^ rk);
          row[j] = static_cast<T>(scale * (1.0 - 2.0 * static_cast<double>(h1 >> 31)));
        }
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = static_cast<T>(scale * sketch_value(key, i, j, kind));
      }
    }
  });
}

Tensor generate_sketch(int64_t s, int64_t n, int64_t kind, int64_t seed, double scale,
                       const at::TensorOptions& opt) {
  Tensor P = at::empty({s, n}, opt);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "fill_sketch", [&] {
    fill_sketch<scalar_t>(P.data_ptr<scalar_t>(), s, n, n, kind, seed, scale);
  });
  return P;
}

// loss'(z; y), loss''(z; y) of fastattn/ops/subspace_hvp/glm.py LOSSES by code, elementwise.
template <typename T>
void loss_derivatives(int64_t code, const T* z, const T* y, T* d1, T* d2, int64_t len, T scale) {
  for (int64_t i = 0; i < len; ++i) {
    const T zi = z[i], yi = y[i];
    T a, b;
    if (code == 0) {
      a = zi - yi;
      b = T(1);
    } else {
      const T sg = T(1) / (T(1) + std::exp(-zi));
      const T q = sg * (T(1) - sg);
      if (code == 1) {
        a = sg - yi;
        b = q;
      } else {
        a = (sg - yi) * q;
        b = q * (q + (sg - yi) * (T(1) - T(2) * sg));
      }
    }
    d1[i] = scale * a;
    d2[i] = scale * b;
  }
}

// reg'(x), reg''(x) of REGULARISERS by code (1 l2, 2 nonconvex), times lam.
template <typename T>
void reg_derivatives(int64_t code, const T* x, T* d1, T* d2, int64_t len, T lam) {
  at::parallel_for(0, len, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const T v = x[j];
      if (code == 1) {
        d1[j] = lam * v;
        d2[j] = lam;
      } else {
        const T q = T(1) + v * v;
        d1[j] = lam * T(2) * v / (q * q);
        d2[j] = lam * (T(2) - T(6) * v * v) / (q * q * q);
      }
    }
  });
}

void check_inputs(const Tensor& A, const Tensor& x, const Tensor& y, const std::optional<Tensor>& P, int64_t s,
                  int64_t sketch) {
  TORCH_CHECK(A.dim() == 2, "subspace_hvp_glm_fused: A must be [m, n], got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "subspace_hvp_glm_fused: A must be float32 or float64, got ", A.scalar_type());
  const int64_t m = A.size(0), n = A.size(1);
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "subspace_hvp_glm_fused: x must be [n] = [", n, "], got ",
              x.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == m, "subspace_hvp_glm_fused: y must be [m] = [", m, "], got ",
              y.sizes());
  TORCH_CHECK(x.scalar_type() == A.scalar_type() && y.scalar_type() == A.scalar_type(),
              "subspace_hvp_glm_fused: A, x, y must share one dtype");
  TORCH_CHECK(s >= 1, "subspace_hvp_glm_fused: s must be >= 1, got ", s);
  if (P.has_value() && P->defined()) {
    TORCH_CHECK(P->dim() == 2 && P->size(0) == s && P->size(1) == n,
                "subspace_hvp_glm_fused: P must be [s, n] = [", s, ", ", n, "], got ", P->sizes());
    TORCH_CHECK(P->scalar_type() == A.scalar_type(), "subspace_hvp_glm_fused: P must have A's dtype");
  } else {
    TORCH_CHECK(sketch == 1 || sketch == 2, "subspace_hvp_glm_fused: without P, sketch must be 1 (gaussian) or 2 "
                "(rademacher), got ", sketch);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> subspace_hvp_glm_cpu(const Tensor& A, const Tensor& x, const Tensor& y,
                                                const std::optional<Tensor>& P, int64_t s, int64_t sketch,
                                                int64_t seed, double scale, int64_t loss, int64_t reg, double lam,
                                                double loss_scale) {
  check_inputs(A, x, y, P, s, sketch);
  TORCH_CHECK(A.device().is_cpu(), "subspace_hvp_glm_fused (CPU kernel): A must be a CPU tensor");
  const int64_t m = A.size(0), n = A.size(1);
  const Tensor Pm = (P.has_value() && P->defined()) ? *P : generate_sketch(s, n, sketch, seed, scale, A.options());
  const Tensor Pt = Pm.t();   // a view: BLAS reads P^T through its strides, no copy
  Tensor H = at::zeros({s, s}, A.options());
  Tensor Pg = at::zeros({s}, A.options());
  const Tensor yc = y.contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "subspace_hvp_glm_cpu", [&] {
    Tensor d1 = at::empty({kRows}, A.options()), d2 = at::empty({kRows}, A.options());
    for (int64_t r = 0; r < m; r += kRows) {
      const int64_t rows = std::min(kRows, m - r);
      const Tensor Ab = A.narrow(0, r, rows);
      const Tensor B = at::mm(Ab, Pt);                             // [rows, s]: this block's tile of A P^T
      const Tensor z = at::mv(Ab, x).contiguous();                 // margins of the block
      loss_derivatives<scalar_t>(loss, z.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>() + r,
                                 d1.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), rows,
                                 static_cast<scalar_t>(loss_scale));
      const Tensor w1 = d1.narrow(0, 0, rows), w2 = d2.narrow(0, 0, rows);
      H.addmm_(B.t(), B * w2.unsqueeze(1));
      Pg.addmv_(B.t(), w1);
    }
    if (reg != 0 && lam != 0.0) {
      const Tensor xc = x.contiguous();
      Tensor r1 = at::empty({n}, A.options()), r2 = at::empty({n}, A.options());
      reg_derivatives<scalar_t>(reg, xc.data_ptr<scalar_t>(), r1.data_ptr<scalar_t>(), r2.data_ptr<scalar_t>(), n,
                                static_cast<scalar_t>(lam));
      H.addmm_(Pm * r2.unsqueeze(0), Pm.t());
      Pg.addmv_(Pm, r1);
    }
  });
  return {Pg, (H + H.t()) * 0.5};
}

Tensor& sketch_fill_cpu(Tensor& out, int64_t kind, int64_t seed, double scale) {
  TORCH_CHECK(out.dim() == 2 && out.device().is_cpu(), "sketch_fill_: out must be a 2-D CPU tensor [s, n]");
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) <= 1, "sketch_fill_: out must have unit column stride");
  TORCH_CHECK(kind == 1 || kind == 2, "sketch_fill_: kind must be 1 (gaussian) or 2 (rademacher), got ", kind);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sketch_fill_cpu", [&] {
    fill_sketch<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), out.stride(0), kind, seed, scale);
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("subspace_hvp_glm_fused", &subspace_hvp_glm_cpu);
  m.impl("sketch_fill_", &sketch_fill_cpu);
}

}  // namespace fastattn
