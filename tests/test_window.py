"""The sliding-window softmax hybrid (fastattn.hf.window) against an fp64 definition: outputs, gradients of every
input and feature parameter, the recurrent state and window buffer, chunked prefill and decode, HF generation."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn import feature_maps
from fastattn.hf.attention import LinearAttentionAdapter
from fastattn.hf.cache import RecurrentStateLayer
from fastattn.hf.window import window_attention, window_rows


def make_adapter(H=4, Hkv=2, d=8, M=13, window=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    fm = feature_maps.build("prf", d, M, H, generator=g)
    with torch.no_grad():
        fm.log_alpha.normal_(generator=g)
    return LinearAttentionAdapter(fm, H, Hkv, window=window)


def inputs(B=2, H=4, Hkv=2, T=23, d=8, Dv=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=dtype)
    return q, k, v


def log_prf64(fm, x):
    """The PRF log-features in fp64, written from the definition: z.x / d^(1/4) - |x|^2 / (2 sqrt d)
    + (log_alpha - log M) / 2."""
    d, M = fm.head_dim, fm.feature_dim
    x = x.double()
    return ((x @ fm.z.double().transpose(-1, -2)) * d ** -0.25 - x.square().sum(-1, keepdim=True) / (2 * d ** 0.5)
            + 0.5 * (fm.log_alpha.double() - math.log(M))[:, None, :])


def reference(adapter, q, k, v, scaling, key_mask=None):
    """o_t = (sum_win exp(q.k s) v + sum_old phi(q).phi(k) v) / (same with v = 1), term by term in fp64."""
    W, groups = adapter.window, adapter.num_heads // adapter.num_kv_heads
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    T = q.shape[2]
    lq, lk = log_prf64(adapter.feature_map, q), log_prf64(adapter.feature_map, k)
    softmax_kernel = ((q.double() @ k.transpose(-1, -2)) * scaling).exp()
    feature_kernel = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1).exp()
    pos = torch.arange(T, device=q.device)
    lag = pos[:, None] - pos[None, :]
    weights = torch.where((lag >= 0) & (lag < W), softmax_kernel, torch.where(lag >= W, feature_kernel, 0.0))
    if key_mask is not None:
        weights = weights * key_mask[:, None, None, :]
    den = weights.sum(-1, keepdim=True)
    return (weights @ v) / torch.where(den > 0, den, 1.0), weights   # rows of padding only: 0


@pytest.mark.parametrize("T,W", [(23, 5), (23, 1), (9, 9), (30, 32)], ids=["ragged", "w1", "w_eq_T", "w_gt_T"])
def test_forward_and_all_gradients_match_fp64_definition(T, W):
    adapter = make_adapter(window=W)
    q, k, v = inputs(T=T)
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[1, :4] = False                                   # left padding in one sequence
    scaling = 8 ** -0.5
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o = adapter(q, k, v, scaling, key_mask=key_mask)
    ref, _ = reference(adapter, q, k, v, scaling, key_mask)
    rows = key_mask[:, None, :, None].expand_as(o)             # outputs of padded queries are not defined
    torch.testing.assert_close(o[rows].double(), ref[rows], rtol=2e-5, atol=2e-6)
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)) * rows
    params = list(adapter.feature_map.parameters())
    got = torch.autograd.grad((o * cot).sum(), leaves + params)
    want = torch.autograd.grad((ref * cot.double()).sum(), leaves + params)
    for name, a, b in zip(["dq", "dk", "dv", "dz", "dlog_alpha"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_window_covering_the_sequence_is_softmax_attention():
    adapter = make_adapter(window=40)
    q, k, v = inputs(T=31)
    o = adapter(q, k, v, 0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.3)
    torch.testing.assert_close(o, sdpa, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(make_adapter(window=3)(q, k, v, 0.3), sdpa, atol=1e-3)   # a short window differs


def test_large_logits_neither_overflow_nor_lose_the_window():
    adapter = make_adapter(window=4)
    q, k, v = inputs(T=17)
    q, k = q * 6, k * 6                                       # logits beyond 100: exp overflows fp32
    assert (q @ k.repeat_interleave(2, 1).transpose(-1, -2)).amax() * 8 ** -0.5 > 100
    o = adapter(q, k, v, 8 ** -0.5)
    ref, _ = reference(adapter, q, k, v, 8 ** -0.5)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_and_decode_steps_equal_one_call_and_the_state_is_exact():
    adapter = make_adapter(window=5)
    q, k, v = inputs(T=29)
    scaling = 8 ** -0.5
    adapter.feature_map.calibrate_key_shift(k.repeat_interleave(2, 1))   # one key scale for every call
    whole = adapter(q, k, v, scaling)
    layer = RecurrentStateLayer()
    parts, start = [], 0
    for size in (3, 1, 1, 9, 1, 1, 1, 12):                    # a short first chunk, steps, longer chunks
        sl = slice(start, start + size)
        parts.append(window_attention(adapter, q[:, :, sl], k[:, :, sl], v[:, :, sl], scaling, layer=layer))
        start += size
        assert layer.window[0].shape[2] == min(start, 5)      # the buffer never holds more than the window
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-6)
    # the state holds exactly the keys that left the window: S = sum_{s <= T-1-W} phi(k_s) v_s^T, z = sum phi(k_s)
    fm = adapter.feature_map
    phi_k = (log_prf64(fm, k.repeat_interleave(2, 1)) - fm.key_shift.double()[None, :, None, None]).exp()
    S_ref = phi_k[:, :, :29 - 5].transpose(-1, -2) @ v.double().repeat_interleave(2, 1)[:, :, :29 - 5]
    S, z = layer.state
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), phi_k[:, :, :29 - 5].sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.window[0], k[:, :, -5:])


def test_dense_rows_of_the_losses_are_the_forward_attention():
    adapter = make_adapter(window=6)
    q, k, v = inputs(T=19)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    a = window_rows(adapter, q, k_rep, 0.4)
    torch.testing.assert_close(a @ v_rep, adapter(q, k, v, 0.4), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    rows = torch.tensor([0, 5, 6, 18])
    torch.testing.assert_close(window_rows(adapter, q, k_rep, 0.4, rows), a[:, :, rows])
    _, weights = reference(adapter, q, k, v, 0.4)
    torch.testing.assert_close(a.double(), weights / weights.sum(-1, keepdim=True), rtol=2e-5, atol=1e-7)


def test_window_needs_log_features_and_a_causal_layer():
    fm = feature_maps.build("hedgehog", 8, 6, 4)
    with pytest.raises(ValueError, match="sliding window needs a feature map"):
        LinearAttentionAdapter(fm, 4, 2, window=4)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        LinearAttentionAdapter(make_adapter().feature_map, 4, 2, window=-1)
    q, k, v = inputs(T=7)
    with pytest.raises(ValueError, match="causal"):
        make_adapter()(q, k, v, 0.3, causal=False)


transformers = pytest.importorskip("transformers")


def test_hf_window_save_load_and_linear_only_differs(tmp_path):
    """(Generation with the cache against recomputation: tests/test_hf.py, id hybrid_window.)"""
    from fastattn import hf

    from .test_hf import tiny_llama
    model = tiny_llama()
    hf.linearize(model, [5, 9, 13], window=4, softmax_layers=[1])
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        linear_only = tiny_llama()
        hf.linearize(linear_only, [5, 9, 13], softmax_layers=[1])
        assert not torch.allclose(linear_only(ids).logits, model(ids).logits, atol=1e-3)
    hf.save_linearized(model, tmp_path)
    fresh = tiny_llama()
    hf.load_linearized(fresh, tmp_path)
    assert all(a.window == 4 for a in hf.adapters(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_hf_window_rejects_encoders():
    from fastattn import hf
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    with pytest.raises(ValueError, match="needs a causal model"):
        hf.linearize(transformers.BertModel(cfg).eval(), 6, window=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_on_gpu_matches_fp64_definition(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    adapter = make_adapter(window=64).cuda()
    q, k, v = (x.cuda().to(dtype) for x in inputs(T=1000, d=8))
    o = adapter(q, k, v, 8 ** -0.5)
    ref, _ = reference(adapter, q, k, v, 8 ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.double(), ref, rtol=tol, atol=tol)
