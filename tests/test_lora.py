"""fastattn.hf.add_lora: LoRA on the attention projections of a linearized model (distillation stage 2)."""
from __future__ import annotations

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn import hf  # noqa: E402
from fastattn.distill.train import optimizer, train_direct  # noqa: E402

from .test_hf import tiny_gpt2, tiny_llama  # noqa: E402
from .tolerances import assert_replay_matches_eager  # noqa: E402


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in hf.adapters(model).values():
            for lora in a.lora.values():
                lora.B.normal_(generator=g)


def test_lora_starts_as_identity_and_equals_merged_weights():
    model = tiny_llama()
    hf.linearize(model, [5, 9, 13], softmax_layers=[2])
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        params = hf.add_lora(model, rank=3, alpha=6.0)
        torch.testing.assert_close(model(ids).logits, before)      # B = 0
        randomize_lora(model)
        with_lora = model(ids).logits
    assert len(params) == 2 * 4 * 2 and all(p.dtype == torch.float32 for p in params)
    assert not torch.allclose(with_lora, before, atol=1e-3)
    # the same update merged into the weights of a fresh copy: W + (alpha / rank) B A
    merged = tiny_llama()
    hf.linearize(merged, [5, 9, 13], softmax_layers=[2])
    merged.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    with torch.no_grad():
        for i, attention in enumerate(hf.attention_modules(merged)[:2]):
            for name, lora in hf.adapters(model)[i].lora.items():
                getattr(attention, name).weight += lora.scale * lora.B @ lora.A
        torch.testing.assert_close(merged(ids).logits, with_lora, rtol=1e-4, atol=1e-5)
    assert not any(".lora." in k for k in dict(hf.attention_modules(model)[2].named_parameters()))


def test_teacher_mode_ignores_lora_and_relinearizing_drops_it():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        teacher = model(ids).logits
        hf.linearize(model, 6)
        plain = model(ids).logits
        hf.add_lora(model, rank=2)
        randomize_lora(model)
        with hf.softmax_attention(model):
            torch.testing.assert_close(model(ids).logits, teacher)
        hf.linearize(model, 6)                                         # fresh adapters, no LoRA
        torch.testing.assert_close(model(ids).logits, plain)


def test_lora_save_load_and_deepcopy(tmp_path):
    model = tiny_llama()
    hf.linearize(model, [4, 6, 8])
    hf.add_lora(model, rank=2, alpha=4.0)
    randomize_lora(model, 3)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    hf.save_linearized(model, tmp_path)
    fresh = tiny_llama()
    hf.load_linearized(fresh, tmp_path)
    assert all(a.lora["q_proj"].A.shape == (2, 48) for a in hf.adapters(fresh).values())
    twin = copy.deepcopy(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before)
        for a in hf.adapters(twin).values():                          # the copy's hooks use the copy's factors
            for lora in a.lora.values():
                lora.B.zero_()
        assert not torch.allclose(twin(ids).logits, before, atol=1e-3)
        torch.testing.assert_close(fresh(ids).logits, before)


def test_lora_on_gpt2_conv1d_projections():
    model = tiny_gpt2()
    hf.linearize(model, [5, 11])
    hf.add_lora(model, rank=2)
    shapes = {n: (m.A.shape, m.B.shape) for n, m in hf.adapters(model)[0].lora.items()}
    assert shapes == {"c_attn": ((2, 32), (96, 2)), "c_proj": ((2, 32), (32, 2))}
    randomize_lora(model)
    ids = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_lora_stage_trains_factors_at_their_learning_rate():
    model = tiny_llama(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    hf.linearize(model, 6)
    hf.add_lora(model, rank=4)
    cfg = types.SimpleNamespace(lr_z=0.02, lr_alpha=0.2, lr_other=0.01, lora_lr=1e-2, batch_size=4, ckpt_every=0)
    groups = {g["name"]: g["lr"] for g in optimizer(model, cfg, lr_scale=0.5).param_groups}
    assert groups == {"z": 0.01, "log_alpha": 0.1, "lora": 1e-2}
    ids = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(6))
    history = train_direct(model, ids, cfg, steps=10, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert all(lora.B.abs().sum() > 0 for a in hf.adapters(model).values() for lora in a.lora.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".fastattn." not in n)


def test_add_lora_rejects_bad_input():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="linearized model"):
        hf.add_lora(model)
    hf.linearize(model, 4)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        hf.add_lora(model, rank=0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 4])
def test_cuda_graph_training_steps_equal_eager_steps(window, monkeypatch):
    """train_direct on a GPU replays one captured step after 3 eager warm-up steps: the loss history and the
    trained adapters (feature maps and LoRA factors) equal those of all-eager steps (fp32, same batches; Adam
    capturable in both, so that only the replay differs; bound: tests/tolerances.py)."""
    _capturable_adam(monkeypatch)
    results = []
    for graphs in (False, False, True):
        model = tiny_llama(layers=2)
        for p in model.parameters():
            p.requires_grad_(False)
        hf.linearize(model, 6, window=window)
        hf.add_lora(model, rank=4)
        randomize_lora(model)
        model.cuda()
        cfg = types.SimpleNamespace(lr_z=0.02, lr_alpha=0.2, lr_other=0.01, lora_lr=1e-2, batch_size=4,
                                    ckpt_every=0, cuda_graph=graphs)
        ids = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(6)).cuda()
        history = train_direct(model, ids, cfg, steps=8, progress=False)
        results.append((torch.tensor([h["loss"] for h in history]),
                        {k: v.detach().clone() for k, v in model.state_dict().items() if ".fastattn." in k}))
    (eager_loss, eager_state), (again_loss, again_state), (graph_loss, graph_state) = results
    assert graph_loss[-1] < graph_loss[0]
    assert_replay_matches_eager("loss", graph_loss, eager_loss, again_loss, atol=1e-5)
    assert eager_state.keys() == graph_state.keys() and any("lora" in k for k in graph_state)
    for k in eager_state:
        assert_replay_matches_eager(k, graph_state[k], eager_state[k], again_state[k], atol=1e-5)


def _capturable_adam(monkeypatch):
    """Eager runs build the same capturable Adam as graphed ones (its device-side step math differs from the
    default Adam's in the last bits)."""
    from fastattn.distill import train
    build = train.optimizer
    monkeypatch.setattr(train, "optimizer", lambda *a, **kw: build(*a, **{**kw, "capturable": True}))
