"""fastattn.hf: linearized HF models (llama, gpt2, bert) — prefill, recurrent generation, hybrids, save/load."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn import hf  # noqa: E402


def tiny_llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


def greedy_by_recomputation(model, ids, n, attention_mask=None):
    x, mask = ids, attention_mask
    with torch.no_grad():
        for _ in range(n):
            out = model(x, attention_mask=mask, use_cache=False).logits[:, -1]
            x = torch.cat([x, out.argmax(-1, keepdim=True)], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return x


@pytest.mark.parametrize("softmax_layers,window", [((), 0), ((1,), 0), ((1,), 4)],
                         ids=["linear", "hybrid", "hybrid_window"])
def test_generate_with_recurrent_cache_equals_recomputation(softmax_layers, window):
    model = tiny_llama()
    hf.linearize(model, [5, 9, 13], softmax_layers=softmax_layers, window=window)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    cache = hf.LinearAttentionCache(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             past_key_values=cache, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    states = cache.states()
    for i, st in enumerate(states):
        assert (st is None) == (i in softmax_layers), f"layer {i}: recurrent state {st is not None}"
    # (S [B, H, D, Dv], z [B, H, D]) fp32, also for a window layer (z: the feature sum of the keys left behind)
    assert states[0][0].dtype == torch.float32 and states[0][0].shape == (2, 6, 5, 8)
    assert states[0][1].dtype == torch.float32 and states[0][1].shape == (2, 6, 5)
    if window:   # and its window buffer: kv heads, window, head dim (constant memory)
        assert cache.layers[0].window[0].shape == (2, 2, window, 8)
    assert torch.equal(out.sequences, greedy_by_recomputation(model, ids, 8, torch.ones_like(ids)))
    # the step logits equal the logits of a full recomputation over the generated prefix
    with torch.no_grad():
        full = model(out.sequences[:, :-1], use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)


def test_plain_generate_uses_the_recurrent_cache_and_constant_memory():
    model = tiny_llama(layers=2)
    hf.linearize(model, 7)
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.24
    assert isinstance(cache, hf.LinearAttentionCache)
    assert cache.get_seq_length() == 5 + 6 - 1
    assert all(s[0].shape == (1, 6, 7, 8) for s in cache.states())  # state size independent of length
    assert torch.equal(out.sequences, greedy_by_recomputation(model, ids, 6))


def test_left_padded_batch_matches_unpadded_rows():
    model = tiny_llama(layers=2)
    hf.linearize(model, 6)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, 61, (1, 9), generator=g), torch.randint(1, 61, (1, 6), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        alone = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
        # feature maps see absolute RoPE phases, so pass the positions generate() would derive from the mask
        logits_pad = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[1, 3:]
        logits_alone = model(b).logits[0]
    torch.testing.assert_close(logits_pad, logits_alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(batched[1, 9:], alone[0, 6:])


def test_softmax_attention_context_gives_the_teacher_back():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        teacher = model(ids).logits
        hf.linearize(model, 8)
        student = model(ids).logits
        with hf.softmax_attention(model):
            again = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(again, teacher)
    torch.testing.assert_close(after, student)
    assert not torch.allclose(student, teacher)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_linearized_prefill_equals_eager(device):
    """torch.compile(fullgraph=True) of a linearized model (the prefill that bench/hf_speed.py times compiled):
    same logits as eager, with the keys' shift per sequence and calibrated (as after greedy_decode)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_llama(layers=2).to(device)
    hf.linearize(model, [7, 16], feature_map="prf")
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(6)).to(device)
    for calibrate in (False, True):
        if calibrate:
            hf.greedy_decode(model, ids[:1], 1)   # fixes every layer's key shift
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(ids, use_cache=False, logits_to_keep=1).logits
            compiled = torch.compile(model, fullgraph=True)(ids, use_cache=False, logits_to_keep=1).logits
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    hf.linearize(model, [4, 6, 8], feature_map="prf", softmax_layers=[2])
    with torch.no_grad():
        for a in hf.adapters(model).values():
            a.feature_map.z.add_(0.1)
            a.feature_map.log_alpha.normal_()
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    hf.save_linearized(model, tmp_path)
    fresh = tiny_llama()  # same base weights (same seed), fresh feature maps
    hf.load_linearized(fresh, tmp_path)
    assert hf.linearized_layers(fresh) == [True, True, False]
    assert [a.feature_dim for a in hf.adapters(fresh).values()] == [4, 6]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before)
    assert any(k.endswith("self_attn.fastattn.feature_map.z") for k in model.state_dict())


def test_gpt2_linearized_generation():
    model = tiny_gpt2()
    hf.linearize(model, [5, 11], feature_map="hedgehog")
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputation(model, ids, 5))


def test_bert_non_causal_with_padding():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    hf.linearize(model, 6, feature_map="elu1")
    assert all(not m.is_causal for m in hf.attention_modules(model))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 61, (1, 9), generator=g)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        with_pad = model(padded, attention_mask=mask).last_hidden_state[:, :9]
        no_mask = model(padded).last_hidden_state[:, :9]
    torch.testing.assert_close(with_pad, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(no_mask, alone, atol=1e-3)  # padding keys do change the output unless masked


def test_linearize_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="feature_dims has 2 entries but the model has 3 layers"):
        hf.linearize(model, [4, 4])
    with pytest.raises(ValueError, match="softmax_layers"):
        hf.linearize(model, 4, softmax_layers=[5])
    with pytest.raises(ValueError, match="unknown feature map"):
        hf.linearize(model, 4, feature_map="nope")


def test_kv_cache_misuse_is_a_clear_error():
    model = tiny_llama(layers=2)
    hf.linearize(model, 4)
    ids = torch.randint(0, 61, (1, 6))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(RuntimeError, match="LinearAttentionCache"):
            model(ids[:, :1], past_key_values=cache)
