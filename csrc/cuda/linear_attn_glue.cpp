// Torch glue of the linear-attention CUDA kernels (csrc/cuda/linear_attn.cu): argument checks, output
// allocation in the inputs' memory order, the current stream, and the CUDA registrations of the ops that
// csrc/fastattn.cpp defines. Built only with a CUDA torch (setup.py adds csrc/cuda/*.cpp then).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "feature_tiles.h"
#include "linear_attn.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int64_t kMaxDv = 256;

// Tests set FASTATTN_POISON=1 so that an element a kernel forgets to write shows up as NaN.
bool poison_enabled() {
  const char* s = std::getenv("FASTATTN_POISON");
  return s != nullptr && std::strcmp(s, "1") == 0;
}

at::Tensor poisoned(at::Tensor t) {
  if (poison_enabled() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// [B, heads, T, last] laid out like `ref` ([B, *, T, *]): physically [B, T, heads, last] when ref is a transposed
// "bthd" view (ref.stride(1) < ref.stride(2)), else [B, heads, T, last] (layout.empty_output's rule).
at::Tensor empty_bhtd(const at::Tensor& ref, int64_t heads, int64_t last, at::ScalarType dtype) {
  const int64_t B = ref.size(0), T = ref.size(2);
  const auto opts = ref.options().dtype(dtype);
  at::Tensor out = ref.stride(1) < ref.stride(2) ? at::empty({B, T, heads, last}, opts).transpose(1, 2)
                                                 : at::empty({B, heads, T, last}, opts);
  return poisoned(out);
}

at::Tensor empty_f32(const at::Tensor& ref, at::IntArrayRef sizes) {
  return poisoned(at::empty(sizes, ref.options().dtype(at::kFloat)));
}

at::Tensor empty_none(const at::Tensor& ref) { return at::empty({0}, ref.options().dtype(at::kFloat)); }

LaView view_of(const at::Tensor& t) {
  LaView v;
  v.data = t.numel() > 0 ? t.data_ptr() : nullptr;
  for (int64_t i = 0; i < t.dim() && i < 4; ++i) v.s[i] = t.stride(i);
  return v;
}

LaView view_of(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? view_of(*t) : LaView{};
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

LaDtype la_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return LaDtype::kFloat32;
    case at::kHalf: return LaDtype::kFloat16;
    case at::kBFloat16: return LaDtype::kBFloat16;
    default: TORCH_CHECK(false, "fastattn CUDA linear_attn: unsupported dtype ", s, " (float32, float16, bfloat16)");
  }
  return LaDtype::kFloat32;
}

int num_sms(const at::Tensor& t) { return at::cuda::getDeviceProperties(t.get_device())->multiProcessorCount; }

// FASTATTN_CUDA_MMA=1 (read at every call): bf16 calls run their tensor-core passes (linear_attn_mma.cuh) where the
// GPU has bf16 WMMA (sm_80+). Off by default until timed and tested on a GPU.
template <typename Params>
void set_tensor_cores(Params& p, const at::Tensor& q) {
  const char* env = std::getenv("FASTATTN_CUDA_MMA");
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
  p.tensor_cores = env != nullptr && std::string(env) == "1" && prop->major >= 8;
  p.max_smem_bytes = static_cast<int>(prop->sharedMemPerBlockOptin);
}

void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "fastattn CUDA linear_attn: ", name,
              " must be a CUDA tensor on ", q.device(), ", got ", t.device());
}

// q, k: [B, H, T, D]; v: [B, Hv, T, Dv]. Returns {B, H, Hv, T, D, Dv}.
LaSizes check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "fastattn CUDA linear_attn: q must be a CUDA tensor, got ", q.device());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastattn CUDA linear_attn: q, k, v must be 4-D [B, H, T, D], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "fastattn CUDA linear_attn: k ", k.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastattn CUDA linear_attn: q, k, v must share one dtype");
  la_dtype(q.scalar_type());
  LaSizes n;
  n.B = q.size(0); n.H = q.size(1); n.T = q.size(2); n.D = q.size(3);
  n.Hv = v.size(1); n.Dv = v.size(3);
  TORCH_CHECK(v.size(0) == n.B && v.size(2) == n.T, "fastattn CUDA linear_attn: v ", v.sizes(),
              " must be [B, Hv, T, Dv] with q ", q.sizes());
  TORCH_CHECK(n.Hv >= 1 && n.H % n.Hv == 0, "fastattn CUDA linear_attn: H = ", n.H,
              " must be a multiple of the value heads Hv = ", n.Hv);
  TORCH_CHECK(n.D >= 1 && n.D <= kMaxFeatureTile, "fastattn CUDA linear_attn: feature dim D = ", n.D,
              " outside 1..", kMaxFeatureTile);
  TORCH_CHECK(n.Dv >= 1 && n.Dv <= kMaxDv, "fastattn CUDA linear_attn: value dim Dv = ", n.Dv, " outside 1..",
              kMaxDv);
  return n;
}

void check_f32(const std::optional<at::Tensor>& t, const at::Tensor& q, at::IntArrayRef sizes, const char* name) {
  if (!present(t)) return;
  check_same_device(*t, q, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat, "fastattn CUDA linear_attn: ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == sizes, "fastattn CUDA linear_attn: ", name, " must have shape ", sizes, ", got ",
              t->sizes());
}

void check_mask(const std::optional<at::Tensor>& m, const at::Tensor& q, int64_t B, int64_t T) {
  if (!present(m)) return;
  check_same_device(*m, q, "key_mask");
  TORCH_CHECK(m->scalar_type() == at::kBool, "fastattn CUDA linear_attn: key_mask must be bool, got ",
              m->scalar_type());
  TORCH_CHECK(m->dim() == 2 && m->size(0) == B && m->size(1) == T,
              "fastattn CUDA linear_attn: key_mask must have shape [", B, ", ", T, "], got ", m->sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attn_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& key_mask, bool causal, bool normalize,
    double eps) {
  const LaSizes n = check_qkv(q, k, v);
  check_f32(S0, q, {n.B, n.H, n.D, n.Dv}, "S0");
  if (normalize) check_f32(z0, q, {n.B, n.H, n.D}, "z0");
  check_mask(key_mask, q, n.B, n.T);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor o = empty_bhtd(q, n.H, n.Dv, q.scalar_type());
  at::Tensor S = empty_f32(q, {n.B, n.H, n.D, n.Dv});
  at::Tensor z = normalize ? empty_f32(q, {n.B, n.H, n.D}) : empty_none(q);
  at::Tensor den = normalize ? empty_f32(q, {n.B, n.H, n.T}) : empty_none(q);

  LaFwdParams p;
  p.n = n;
  p.dtype = la_dtype(q.scalar_type());
  p.causal = causal;
  p.normalize = normalize;
  p.eps = static_cast<float>(eps);
  p.num_sms = num_sms(q);
  set_tensor_cores(p, q);
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.S0 = view_of(S0);
  p.z0 = normalize ? view_of(z0) : LaView{};
  p.key_mask = view_of(key_mask);
  p.o = view_of(o);
  p.S = view_of(S);
  if (normalize) {
    p.z = view_of(z);
    p.den = view_of(den);
  }
  if (n.B * n.H == 0) return {o, S, z, den};
  const size_t ws_bytes = linear_attn_fwd_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  C10_CUDA_CHECK(linear_attn_fwd(p, at::cuda::getCurrentCUDAStream()));
  return {o, S, z, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attn_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dS, const std::optional<at::Tensor>& dz,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& den,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
    const std::optional<at::Tensor>& key_mask, bool causal, bool normalize, double eps) {
  const LaSizes n = check_qkv(q, k, v);
  check_same_device(dout, q, "do");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fastattn CUDA linear_attn: do must have q's dtype ",
              q.scalar_type(), ", got ", dout.scalar_type());
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == n.B && dout.size(1) == n.H && dout.size(2) == n.T &&
                  dout.size(3) == n.Dv,
              "fastattn CUDA linear_attn: do must have shape [B, H, T, Dv], got ", dout.sizes());
  check_f32(dS, q, {n.B, n.H, n.D, n.Dv}, "dS");
  check_f32(S0, q, {n.B, n.H, n.D, n.Dv}, "S0");
  if (normalize) {
    check_f32(dz, q, {n.B, n.H, n.D}, "dz");
    check_f32(z0, q, {n.B, n.H, n.D}, "z0");
    TORCH_CHECK(present(den), "fastattn CUDA linear_attn: backward with normalize=True needs the saved den");
    check_f32(den, q, {n.B, n.H, n.T}, "den");
  }
  check_mask(key_mask, q, n.B, n.T);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = empty_bhtd(q, n.H, n.D, q.scalar_type());
  at::Tensor dk = empty_bhtd(k, n.H, n.D, q.scalar_type());
  at::Tensor dv = empty_bhtd(v, n.Hv, n.Dv, q.scalar_type());
  at::Tensor dS0 = empty_f32(q, {n.B, n.H, n.D, n.Dv});
  at::Tensor dz0 = normalize ? empty_f32(q, {n.B, n.H, n.D}) : empty_none(q);

  LaBwdParams p;
  p.n = n;
  p.dtype = la_dtype(q.scalar_type());
  p.causal = causal;
  p.normalize = normalize;
  p.eps = static_cast<float>(eps);
  p.num_sms = num_sms(q);
  set_tensor_cores(p, q);
  p.dout = view_of(dout);
  p.dS = view_of(dS);
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.S0 = view_of(S0);
  p.key_mask = view_of(key_mask);
  p.dq = view_of(dq); p.dk = view_of(dk); p.dv = view_of(dv);
  p.dS0 = view_of(dS0);
  if (normalize) {
    p.dz = view_of(dz);
    p.den = view_of(den);
    p.z0 = view_of(z0);
    p.dz0 = view_of(dz0);
  }
  if (n.B * n.H == 0) return {dq, dk, dv, dS0, dz0};
  const size_t ws_bytes = linear_attn_bwd_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  C10_CUDA_CHECK(linear_attn_bwd(p, at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv, dS0, dz0};
}

// One decode token; S (and z) are updated in place. Allocates only o: capturable in a CUDA graph.
// All kernels of one op must share one C++ signature: `at::Tensor& S` as in csrc/cpu/linear_attn.cpp.
at::Tensor linear_attn_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& S,
                                 const std::optional<at::Tensor>& z, bool normalize, double eps) {
  TORCH_CHECK(q.is_cuda(), "fastattn CUDA linear_attn_step: q must be a CUDA tensor, got ", q.device());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  check_same_device(S, q, "S");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "fastattn CUDA linear_attn_step: q, k must be [B, H, D] and v [B, Hv, Dv]");
  TORCH_CHECK(k.sizes() == q.sizes(), "fastattn CUDA linear_attn_step: k ", k.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastattn CUDA linear_attn_step: q, k, v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hv = v.size(1), Dv = v.size(2);
  TORCH_CHECK(v.size(0) == B && Hv >= 1 && H % Hv == 0, "fastattn CUDA linear_attn_step: v ", v.sizes(),
              " must be [B, Hv, Dv] with H % Hv == 0 (q ", q.sizes(), ")");
  TORCH_CHECK(D >= 1 && D <= kMaxFeatureTile, "fastattn CUDA linear_attn_step: D = ", D, " outside 1..",
              kMaxFeatureTile);
  TORCH_CHECK(Dv >= 1 && Dv <= kMaxDv, "fastattn CUDA linear_attn_step: Dv = ", Dv, " outside 1..", kMaxDv);
  check_f32(S, q, {B, H, D, Dv}, "S");
  at::assert_no_internal_overlap(S);
  if (normalize) {
    TORCH_CHECK(present(z), "fastattn CUDA linear_attn_step: normalize=True needs the state z");
    check_f32(z, q, {B, H, D}, "z");
    at::assert_no_internal_overlap(*z);
  }
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor o = poisoned(at::empty({B, H, Dv}, q.options()));
  LaStepParams p;
  p.B = B; p.H = H; p.Hv = Hv; p.D = D; p.Dv = Dv;
  p.dtype = la_dtype(q.scalar_type());
  p.normalize = normalize;
  p.eps = static_cast<float>(eps);
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.S = view_of(S);
  if (normalize) p.z = view_of(z);
  p.o = view_of(o);
  C10_CUDA_CHECK(linear_attn_step(p, at::cuda::getCurrentCUDAStream()));
  return o;
}

// The feature-dim tiles the kernels were built for (feature_tiles.h); the Python verifier reads the largest.
std::vector<int64_t> cuda_feature_tiles() {
  return std::vector<int64_t>(kFeatureTiles, kFeatureTiles + kNumFeatureTiles);
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linear_attn_fwd", &fastattn::cuda::linear_attn_fwd_cuda);
  m.impl("linear_attn_bwd", &fastattn::cuda::linear_attn_bwd_cuda);
  m.impl("linear_attn_step", &fastattn::cuda::linear_attn_step_cuda);
}

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def("cuda_feature_tiles() -> int[]", &fastattn::cuda::cuda_feature_tiles);
}
