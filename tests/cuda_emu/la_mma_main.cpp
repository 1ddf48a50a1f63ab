// Runs the tensor-core passes (csrc/cuda/linear_attn_mma.cuh) on the host through emu.h, for
// tests/test_cuda_emu.py, in the order of the CUDA forward and backward: la_seg_sum_mma_kernel's per-segment sums
// and their prefix over segments (la_scan's rule, here on the host), la_fwd_chunk_mma_kernel, la_bwd_dq_mma_kernel
// from the same states and den, the reverse sums of q^T (do / den) and c q (la_seg_sum_mma_kernel) and their
// reverse prefix, la_bwd_dkdv_mma_kernel.
// argv[1]: the problem: int64 header B, H, Hv, T, D, Dv, NS, cps, causal, normalize, has_mask, bthd; float32 eps;
// q, k, v, do as bf16 bits in "bhtd" or "bthd" memory; the key mask [B, T] as bytes when has_mask; the initial
// state and the final state's gradient, [B*H][D*Dv + D] fp32 each (S row-major, then z).
// argv[2]: o [B, H, T, Dv] bf16 bits, den [B, H, T] fp32, the final state [B*H][D*Dv + D] fp32, dq, dk [B, H, T, D]
// and dv [B, Hv, T, Dv] bf16 bits, c [B, H, T] fp32, the initial state's gradient [B*H][D*Dv + D] fp32.
#define FASTATTN_CUDA_EMU 1
#include "emu.h"
#include "linear_attn_mma.cuh"

#include <fstream>
#include <vector>

using namespace fastattn::cuda;

template <typename T>
std::vector<T> take(std::ifstream& in, size_t n) {
  std::vector<T> v(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  return v;
}

template <typename T>
void put(std::ofstream& out, const T* p, size_t n) {
  out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n * sizeof(T)));
}

// la_scan on the host, in place over the slots [BH][NS + 1][slot] holding each segment's sums: slot j <- init plus
// the sums of the segments before it (after it when reverse); slot NS <- init plus all of them.
void scan(std::vector<float>& ws, const std::vector<float>& init, int64_t BH, int NS, int64_t slot, bool reverse) {
  for (int64_t i = 0; i < BH; ++i)
    for (int64_t e = 0; e < slot; ++e) {
      float run = init[i * slot + e];
      for (int jj = 0; jj < NS; ++jj) {
        float& w = ws[(i * (NS + 1) + (reverse ? NS - 1 - jj : jj)) * slot + e];
        const float x = w;
        w = run;
        run += x;
      }
      ws[(i * (NS + 1) + NS) * slot + e] = run;
    }
}

// The forward (s: the sums of k^T v, a: the chunk pass) then the backward (dq, r: the reverse sums, dkdv).
template <int DK>
int run(const SegArgs& s, const ChunkArgs& a, const ChunkArgs& dq, SegArgs r, const ChunkArgs& dkdv, int64_t BH,
        std::vector<float>& ws, std::vector<float>& rws, const std::vector<float>& init,
        const std::vector<float>& grad_final) {
  for (int pass : {kMmaFwd, kMmaDq, kMmaDkdv})
    if (mma_smem_bytes(a.Dp, DK, pass) > sizeof(emu::smem_buffer)) return 3;
  const dim3 chunks(static_cast<unsigned>(BH), static_cast<unsigned>(a.NS), static_cast<unsigned>(a.nvt));
  const dim3 sums(chunks.x, chunks.y, static_cast<unsigned>((a.D + DK - 1) / DK * a.nvt));
  emu::launch(sums, kThreads, [&] { la_seg_sum_mma_kernel<DK>(s); });
  scan(ws, init, BH, a.NS, a.slot, false);
  emu::launch(chunks, kThreads, [&] { la_fwd_chunk_mma_kernel<DK>(a); });
  emu::launch(chunks, kThreads, [&] { la_bwd_dq_mma_kernel<DK>(dq); });
  emu::launch(sums, kThreads, [&] { la_seg_sum_mma_kernel<DK>(r); });
  scan(rws, grad_final, BH, a.NS, a.slot, true);
  emu::launch(chunks, kThreads, [&] { la_bwd_dkdv_mma_kernel<DK>(dkdv); });
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = take<int64_t>(in, 12);
  const int64_t B = h[0], H = h[1], Hv = h[2], T = h[3], D = h[4], Dv = h[5];
  const int NS = static_cast<int>(h[6]), cps = static_cast<int>(h[7]);
  const bool causal = h[8] != 0, normalize = h[9] != 0, has_mask = h[10] != 0, bthd = h[11] != 0;
  const float eps = take<float>(in, 1)[0];
  std::vector<__nv_bfloat16> q = take<__nv_bfloat16>(in, B * H * T * D), k = take<__nv_bfloat16>(in, B * H * T * D);
  std::vector<__nv_bfloat16> v = take<__nv_bfloat16>(in, B * Hv * T * Dv);
  std::vector<__nv_bfloat16> dout = take<__nv_bfloat16>(in, B * H * T * Dv);
  std::vector<unsigned char> mask = has_mask ? take<unsigned char>(in, B * T) : std::vector<unsigned char>();
  const int64_t slot = D * Dv + D;
  const std::vector<float> init = take<float>(in, B * H * slot), grad_final = take<float>(in, B * H * slot);
  if (!in) return 4;

  // outputs as the CUDA backward has them: dq and dk straight into bf16 with one value tile, else summed over the
  // tiles in fp32 accumulators; dv likewise over the query heads of a group (GQA); c summed over the value tiles
  const int nvt = static_cast<int>((Dv + kBV - 1) / kBV);
  const bool tiles = nvt > 1, groups = H != Hv;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  std::vector<__nv_bfloat16> o(B * H * T * Dv, zero), dq(B * H * T * D, zero), dk(dq.size(), zero);
  std::vector<__nv_bfloat16> dv(B * Hv * T * Dv, zero);
  std::vector<float> den(B * H * T, 0.f), cbuf(den.size(), 0.f), ws(B * H * (NS + 1) * slot, 0.f), rws(ws.size());
  std::vector<float> acc_q(tiles ? dq.size() : 0, 0.f), acc_k(acc_q.size(), 0.f), acc_v(groups ? dv.size() : 0, 0.f);
  auto view = [&](void* data, int64_t heads, int64_t dim, bool tokens_outer) {   // [B, heads, T, dim]
    LaView w;
    w.data = data;
    const int64_t s[4] = {heads * T * dim, tokens_outer ? dim : T * dim, tokens_outer ? heads * dim : dim, 1};
    for (int i = 0; i < 4; ++i) w.s[i] = s[i];
    return w;
  };
  ChunkArgs a{};
  a.H = H; a.G = H / Hv; a.Hv = Hv; a.T = T; a.D = D; a.Dv = Dv;
  a.NS = NS; a.cps = cps; a.nvt = nvt;
  a.causal = causal; a.normalize = normalize; a.eps = eps;
  a.q = view(q.data(), H, D, bthd); a.k = view(k.data(), H, D, bthd); a.v = view(v.data(), Hv, Dv, bthd);
  if (has_mask) {
    a.key_mask.data = mask.data();
    a.key_mask.s[0] = T; a.key_mask.s[1] = 1;
  }
  a.out = view(o.data(), H, Dv, false);
  a.den = view(den.data(), H, 1, false);
  a.ws = ws.data();
  a.slot = slot;
  const int DK = D <= 16 ? 16 : D <= 32 ? 32 : 64;   // feature_subtile of the smallest tile holding D
  a.Dp = static_cast<int>((D + DK - 1) / DK * DK);
  SegArgs s{};
  s.H = H; s.T = T; s.D = D; s.Dv = Dv; s.ygroup = H / Hv;
  s.NS = NS; s.cps = cps; s.nvt = nvt;
  s.with_z = normalize;
  s.x = a.k; s.y = a.v; s.key_mask = a.key_mask;
  s.ws = ws.data(); s.slot = slot;
  ChunkArgs g = a;   // the dq pass
  g.dout = view(dout.data(), H, Dv, bthd);
  g.out = view(dq.data(), H, D, false);
  g.cbuf = cbuf.data();
  g.acc = tiles ? acc_q.data() : nullptr;
  SegArgs r = s;     // the reverse sums
  r.ygroup = 1;
  r.x = a.q; r.y = g.dout; r.key_mask = LaView{};
  r.den = normalize ? a.den : LaView{};
  r.wz = normalize ? cbuf.data() : nullptr;
  r.ws = rws.data();
  ChunkArgs kv = g;  // the dk / dv pass
  kv.ws = rws.data();
  kv.out = view(dk.data(), H, D, false);
  kv.out2 = view(dv.data(), Hv, Dv, false);
  kv.acc = tiles ? acc_k.data() : nullptr;
  kv.acc2 = groups ? acc_v.data() : nullptr;
  const int rc = DK == 16 ? run<16>(s, a, g, r, kv, B * H, ws, rws, init, grad_final)
               : DK == 32 ? run<32>(s, a, g, r, kv, B * H, ws, rws, init, grad_final)
                          : run<64>(s, a, g, r, kv, B * H, ws, rws, init, grad_final);
  if (rc != 0) return rc;
  for (size_t i = 0; i < acc_q.size(); ++i) dq[i] = __float2bfloat16_rn(acc_q[i]);
  for (size_t i = 0; i < acc_k.size(); ++i) dk[i] = __float2bfloat16_rn(acc_k[i]);
  for (size_t i = 0; i < acc_v.size(); ++i) dv[i] = __float2bfloat16_rn(acc_v[i]);
  std::ofstream out(argv[2], std::ios::binary);
  put(out, o.data(), o.size());
  put(out, den.data(), den.size());
  for (int64_t i = 0; i < B * H; ++i) put(out, ws.data() + (i * (NS + 1) + NS) * slot, slot);   // the final state
  for (const auto* x : {&dq, &dk, &dv}) put(out, x->data(), x->size());
  put(out, cbuf.data(), cbuf.size());
  for (int64_t i = 0; i < B * H; ++i) put(out, rws.data() + (i * (NS + 1) + NS) * slot, slot);  // dS0, dz0
  return out ? 0 : 5;
}
