// Runs the tensor-core passes (csrc/cuda/linear_attn_mma.cuh) on the host through emu.h, for
// tests/test_cuda_emu.py. The forward: la_seg_sum_mma_kernel's per-segment sums, their prefix over segments
// (la_scan's rule, here on the host), then la_fwd_chunk_mma_kernel; with a gradient do given, then
// la_bwd_dq_mma_kernel from the same states and den, the reverse states (la_seg_sum_mma_kernel's sums of
// q^T (do / den) and c q, la_scan's reverse prefix on the host) and la_bwd_dkdv_mma_kernel. argv[1]: the problem (int64 header B, H, Hv, T,
// D, Dv, NS, cps, causal, normalize, has_mask, bthd, backward; float32 eps; q, k, v (and do when backward) as
// bf16 bits in "bhtd" or "bthd" memory; the key mask [B, T] as bytes when has_mask; the initial state
// [B*H][D*Dv + D] fp32, S row-major then z; when backward the final state's gradient, same layout). argv[2]: o
// [B, H, T, Dv] as bf16 bits, den [B, H, T] fp32, the final state [B*H][D*Dv + D] fp32; when backward, dq
// [B, H, T, D], dk [B, H, T, D], dv [B, Hv, T, Dv] as bf16 bits, c [B, H, T] fp32 and the initial state's
// gradient [B*H][D*Dv + D] fp32.
#define FASTATTN_CUDA_EMU 1
#include "emu.h"
#include "linear_attn_mma.cuh"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <vector>

using namespace fastattn::cuda;

template <typename T>
std::vector<T> take(std::ifstream& in, size_t n) {
  std::vector<T> v(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  return v;
}

// The backward's arguments, its reverse-state slots and the final state's gradient (their initial value).
struct Bwd {
  ChunkArgs dq, dkdv;
  std::vector<float>* rws;
  const std::vector<float>* grad_final;
};

template <int DK>
int run(SegArgs s, ChunkArgs a, int64_t BH, const std::vector<float>& init, Bwd* bw) {
  if (mma_smem_bytes(a.Dp, DK, kMmaFwd) > sizeof(emu::smem_buffer)) return 3;
  const unsigned bh = static_cast<unsigned>(BH), ns = static_cast<unsigned>(a.NS);
  emu::launch(dim3(bh, ns, static_cast<unsigned>((a.D + DK - 1) / DK * a.nvt)), kThreads,
              [&] { la_seg_sum_mma_kernel<DK>(s); });
  for (int64_t i = 0; i < BH; ++i)   // slot j <- init + sum_{i<j} sums_i; slot NS <- the total
    for (int64_t e = 0; e < a.slot; ++e) {
      float run = init[i * a.slot + e];
      for (int j = 0; j < a.NS; ++j) {
        float& w = s.ws[(i * (a.NS + 1) + j) * a.slot + e];
        const float x = w;
        w = run;
        run += x;
      }
      s.ws[(i * (a.NS + 1) + a.NS) * a.slot + e] = run;
    }
  emu::launch(dim3(bh, ns, static_cast<unsigned>(a.nvt)), kThreads, [&] { la_fwd_chunk_mma_kernel<DK>(a); });
  if (bw == nullptr) return 0;
  if (mma_smem_bytes(a.Dp, DK, kMmaDq) > sizeof(emu::smem_buffer) ||
      mma_smem_bytes(a.Dp, DK, kMmaDkdv) > sizeof(emu::smem_buffer))
    return 3;
  emu::launch(dim3(bh, ns, static_cast<unsigned>(a.nvt)), kThreads, [&] { la_bwd_dq_mma_kernel<DK>(bw->dq); });
  // reverse states: la_seg_sum_mma_kernel's per-segment sums of q^T (do / den) and c q, then la_scan's reverse
  // prefix on the host: slot j = dS + sum_{i>j} X_i, slot NS = dS + every X_i (dS0, dz0)
  SegArgs r = s;
  r.ygroup = 1;
  r.x = a.q;
  r.y = bw->dq.dout;
  r.key_mask = LaView{};
  r.den = a.normalize ? a.den : LaView{};
  r.wz = a.normalize ? bw->dq.cbuf : nullptr;
  r.ws = bw->rws->data();
  emu::launch(dim3(bh, ns, static_cast<unsigned>((a.D + DK - 1) / DK * a.nvt)), kThreads,
              [&] { la_seg_sum_mma_kernel<DK>(r); });
  for (int64_t i = 0; i < BH; ++i)
    for (int64_t e = 0; e < a.slot; ++e) {
      float run = (*bw->grad_final)[i * a.slot + e];
      for (int j = a.NS - 1; j >= 0; --j) {
        float& w = r.ws[(i * (a.NS + 1) + j) * a.slot + e];
        const float x = w;
        w = run;
        run += x;
      }
      r.ws[(i * (a.NS + 1) + a.NS) * a.slot + e] = run;
    }
  emu::launch(dim3(bh, ns, static_cast<unsigned>(a.nvt)), kThreads, [&] { la_bwd_dkdv_mma_kernel<DK>(bw->dkdv); });
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = take<int64_t>(in, 13);
  const int64_t B = h[0], H = h[1], Hv = h[2], T = h[3], D = h[4], Dv = h[5];
  const int NS = static_cast<int>(h[6]), cps = static_cast<int>(h[7]);
  const bool causal = h[8] != 0, normalize = h[9] != 0, has_mask = h[10] != 0, bthd = h[11] != 0;
  const bool backward = h[12] != 0;
  const float eps = take<float>(in, 1)[0];
  std::vector<__nv_bfloat16> q = take<__nv_bfloat16>(in, B * H * T * D), k = take<__nv_bfloat16>(in, B * H * T * D);
  std::vector<__nv_bfloat16> v = take<__nv_bfloat16>(in, B * Hv * T * Dv);
  std::vector<__nv_bfloat16> dout = backward ? take<__nv_bfloat16>(in, B * H * T * Dv) : std::vector<__nv_bfloat16>();
  std::vector<unsigned char> mask = has_mask ? take<unsigned char>(in, B * T) : std::vector<unsigned char>();
  const int64_t slot = D * Dv + D;
  const std::vector<float> init = take<float>(in, B * H * slot);
  if (!in) return 4;
  std::vector<float> ws(B * H * (NS + 1) * slot, 0.f);

  std::vector<__nv_bfloat16> o(B * H * T * Dv, __float2bfloat16_rn(0.f));
  std::vector<float> den(B * H * T, 0.f);
  auto view = [&](void* data, int64_t heads, int64_t dim) {   // [B, heads, T, dim] in this memory order
    LaView w;
    w.data = data;
    const int64_t s[4] = {heads * T * dim, bthd ? dim : T * dim, bthd ? heads * dim : dim, 1};
    for (int i = 0; i < 4; ++i) w.s[i] = s[i];
    return w;
  };
  ChunkArgs a{};
  a.H = H; a.G = H / Hv; a.Hv = Hv; a.T = T; a.D = D; a.Dv = Dv;
  a.NS = NS; a.cps = cps; a.nvt = static_cast<int>((Dv + kBV - 1) / kBV);
  a.causal = causal; a.normalize = normalize; a.eps = eps;
  a.q = view(q.data(), H, D); a.k = view(k.data(), H, D); a.v = view(v.data(), Hv, Dv);
  if (has_mask) {
    a.key_mask.data = mask.data();
    a.key_mask.s[0] = T; a.key_mask.s[1] = 1;
  }
  a.out.data = o.data();
  a.out.s[0] = H * T * Dv; a.out.s[1] = T * Dv; a.out.s[2] = Dv; a.out.s[3] = 1;
  a.den.data = den.data();
  a.den.s[0] = H * T; a.den.s[1] = T; a.den.s[2] = 1;
  a.ws = ws.data();
  a.slot = slot;
  const int DK = D <= 16 ? 16 : D <= 32 ? 32 : 64;   // feature_subtile of the smallest tile holding D
  a.Dp = static_cast<int>((D + DK - 1) / DK * DK);
  SegArgs sg{};
  sg.H = H; sg.T = T; sg.D = D; sg.Dv = Dv; sg.ygroup = H / Hv;
  sg.NS = NS; sg.cps = cps; sg.nvt = a.nvt;
  sg.with_z = normalize;
  sg.x = a.k; sg.y = a.v; sg.key_mask = a.key_mask;
  sg.ws = ws.data(); sg.slot = slot;
  // the backward, as the CUDA one: dq and dk straight into bf16 with one value tile, else summed over the tiles in
  // fp32 accumulators; dv likewise over the query heads of a group (GQA); c summed over the value tiles
  const size_t nq = backward ? B * H * T * D : 0, nvv = backward ? B * Hv * T * Dv : 0;
  std::vector<__nv_bfloat16> dq(nq, __float2bfloat16_rn(0.f)), dk(nq, __float2bfloat16_rn(0.f));
  std::vector<__nv_bfloat16> dv(nvv, __float2bfloat16_rn(0.f));
  const bool tiles = a.nvt > 1, groups = H != Hv;
  std::vector<float> cbuf(backward ? B * H * T : 0, 0.f), acc_q(tiles ? nq : 0, 0.f), acc_k(tiles ? nq : 0, 0.f);
  std::vector<float> acc_v(groups ? nvv : 0, 0.f), rws(backward ? ws.size() : 0, 0.f);
  const std::vector<float> grad_final = backward ? take<float>(in, B * H * slot) : std::vector<float>();
  Bwd bw{a, a, &rws, &grad_final};
  if (backward) {
    if (!in) return 4;
    auto plain = [&](void* data, int64_t heads, int64_t dim) {   // [B, heads, T, dim] contiguous
      LaView w;
      w.data = data;
      w.s[0] = heads * T * dim; w.s[1] = T * dim; w.s[2] = dim; w.s[3] = 1;
      return w;
    };
    bw.dq.dout = view(dout.data(), H, Dv);
    bw.dq.out = plain(dq.data(), H, D);
    bw.dq.cbuf = cbuf.data();
    bw.dq.acc = tiles ? acc_q.data() : nullptr;
    bw.dkdv = bw.dq;
    bw.dkdv.ws = rws.data();
    bw.dkdv.out = plain(dk.data(), H, D);
    bw.dkdv.out2 = plain(dv.data(), Hv, Dv);
    bw.dkdv.acc = tiles ? acc_k.data() : nullptr;
    bw.dkdv.acc2 = groups ? acc_v.data() : nullptr;
  }
  Bwd* bp = backward ? &bw : nullptr;
  const int rc = DK == 16 ? run<16>(sg, a, B * H, init, bp) : DK == 32 ? run<32>(sg, a, B * H, init, bp)
                                                                       : run<64>(sg, a, B * H, init, bp);
  if (rc != 0) return rc;
  for (size_t i = 0; i < acc_q.size(); ++i) dq[i] = __float2bfloat16_rn(acc_q[i]);
  for (size_t i = 0; i < acc_k.size(); ++i) dk[i] = __float2bfloat16_rn(acc_k[i]);
  for (size_t i = 0; i < acc_v.size(); ++i) dv[i] = __float2bfloat16_rn(acc_v[i]);
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(o.data()), static_cast<std::streamsize>(o.size() * sizeof(o[0])));
  out.write(reinterpret_cast<const char*>(den.data()), static_cast<std::streamsize>(den.size() * sizeof(float)));
  for (int64_t i = 0; i < B * H; ++i)
    out.write(reinterpret_cast<const char*>(ws.data() + (i * (NS + 1) + NS) * slot),
              static_cast<std::streamsize>(slot * sizeof(float)));
  if (backward) {
    for (const auto* x : {&dq, &dk, &dv})
      out.write(reinterpret_cast<const char*>(x->data()), static_cast<std::streamsize>(x->size() * sizeof(dq[0])));
    out.write(reinterpret_cast<const char*>(cbuf.data()), static_cast<std::streamsize>(cbuf.size() * sizeof(float)));
    for (int64_t i = 0; i < B * H; ++i)   // dS0, dz0: the reverse total
      out.write(reinterpret_cast<const char*>(rws.data() + (i * (NS + 1) + NS) * slot),
                static_cast<std::streamsize>(slot * sizeof(float)));
  }
  return out ? 0 : 5;
}
