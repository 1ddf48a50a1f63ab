// Torch glue of the fused GLM subspace-Hessian CUDA kernel (csrc/cuda/subspace_hvp.cu): argument checks, the
// zeroed partial slots, the current stream, the fixed-order reduction of the slots, and the CUDA registration of
// fastattn::subspace_hvp_glm_fused (schema in csrc/fastattn.cpp). Built only with a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "subspace_hvp.h"
#include "../sketch_hash.h"

namespace fastattn {
namespace cuda {
namespace {

void check_f32_on(const at::Tensor& t, const at::Tensor& A, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == A.device(), "fastattn CUDA subspace_hvp_glm: ", name,
              " must be a CUDA tensor on ", A.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastattn CUDA subspace_hvp_glm: ", name, " must be float32, got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> subspace_hvp_glm_cuda(const at::Tensor& A, const at::Tensor& x,
                                                         const at::Tensor& y, const std::optional<at::Tensor>& P,
                                                         int64_t s, int64_t sketch, int64_t seed, double scale,
                                                         int64_t loss, int64_t reg, double lam, double loss_scale) {
  check_f32_on(A, A, "A");
  check_f32_on(x, A, "x");
  check_f32_on(y, A, "y");
  TORCH_CHECK(A.dim() == 2, "fastattn CUDA subspace_hvp_glm: A must be [m, n], got ", A.sizes());
  const int64_t m = A.size(0), n = A.size(1);
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "fastattn CUDA subspace_hvp_glm: x must be [", n, "], got ",
              x.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == m, "fastattn CUDA subspace_hvp_glm: y must be [", m, "], got ",
              y.sizes());
  TORCH_CHECK(s >= 1 && s <= kHvpMaxS, "fastattn CUDA subspace_hvp_glm: s = ", s, " outside 1..", kHvpMaxS);
  TORCH_CHECK(loss >= 0 && loss <= 2 && reg >= 0 && reg <= 2, "fastattn CUDA subspace_hvp_glm: unknown loss ", loss,
              " or reg ", reg);
  const bool has_p = P.has_value() && P->defined();
  if (has_p) {
    check_f32_on(*P, A, "P");
    TORCH_CHECK(P->dim() == 2 && P->size(0) == s && P->size(1) == n, "fastattn CUDA subspace_hvp_glm: P must be [",
                s, ", ", n, "], got ", P->sizes());
  } else {
    TORCH_CHECK(sketch == 1 || sketch == 2, "fastattn CUDA subspace_hvp_glm: without P, sketch must be 1 or 2, got ",
                sketch);
  }
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const bool reg_active = reg != 0 && lam != 0.0;
  const int64_t steps = (m + kHvpRows - 1) / kHvpRows + (reg_active ? (n + kHvpRows - 1) / kHvpRows : 0);
  const int sms = at::cuda::getDeviceProperties(A.get_device())->multiProcessorCount;
  const int G = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(steps, 2 * static_cast<int64_t>(sms))));
  at::Tensor GP = at::zeros({G, s, s}, A.options());
  at::Tensor PG = at::zeros({G, s}, A.options());

  HvpGlmParams p;
  p.m = m;
  p.n = n;
  p.s = s;
  p.A = A.data_ptr<float>();
  p.sAm = A.stride(0);
  p.sAn = A.stride(1);
  p.x = xc.data_ptr<float>();
  p.y = yc.data_ptr<float>();
  if (has_p) {
    p.P = P->data_ptr<float>();
    p.sPs = P->stride(0);
    p.sPn = P->stride(1);
    p.sketch = 0;
  } else {
    p.sketch = static_cast<int>(sketch);
    p.key = sketch_key(seed);
    p.scale = static_cast<float>(scale);
  }
  p.loss = static_cast<int>(loss);
  p.reg = static_cast<int>(reg);
  p.lam = static_cast<float>(lam);
  p.loss_scale = static_cast<float>(loss_scale);
  p.reg_active = reg_active;
  p.GP = GP.data_ptr<float>();
  p.PG = PG.data_ptr<float>();
  p.G = G;
  if (m > 0 || reg_active) C10_CUDA_CHECK(subspace_hvp_glm_launch(p, at::cuda::getCurrentCUDAStream()));
  const at::Tensor H = GP.sum(0);
  return {PG.sum(0), (H + H.t()) * 0.5};
}

at::Tensor& sketch_fill_cuda(at::Tensor& out, int64_t kind, int64_t seed, double scale) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 2, "fastattn CUDA sketch_fill_: out must be a 2-D CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fastattn CUDA sketch_fill_: out must be float32, got ",
              out.scalar_type());
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) <= 1, "fastattn CUDA sketch_fill_: out needs unit column stride");
  TORCH_CHECK(kind == 1 || kind == 2, "fastattn CUDA sketch_fill_: kind must be 1 or 2, got ", kind);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(sketch_fill_launch(out.data_ptr<float>(), out.size(0), out.size(1), out.stride(0),
                                    static_cast<int>(kind), seed, scale, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("subspace_hvp_glm_fused", &fastattn::cuda::subspace_hvp_glm_cuda);
  m.impl("sketch_fill_", &fastattn::cuda::sketch_fill_cuda);
}
