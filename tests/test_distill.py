"""The distillation driver end to end on a tiny local model (offline), plus its pieces."""
from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fastattn import hf  # noqa: E402
from fastattn.cli import main as cli_main  # noqa: E402
from fastattn.distill import data, make_config  # noqa: E402
from fastattn.distill.capture import capture_batch  # noqa: E402
from fastattn.distill.losses import LOSSES, attention_rows  # noqa: E402

from .tolerances import assert_replay_matches_eager  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer trained on the offline corpus, saved as a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("tiny_llama")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator([data.corpus()[:50000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>",
                                                                                                        "<eos>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>",
                                               pad_token="<eos>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_corpus_splits_are_disjoint_and_offline():
    text = data.corpus()
    assert len(text) > 400_000
    spans = [tuple(int(f * len(text)) for f in data.SPLITS[s]) for s in ("calib", "train", "heldout")]
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]


def test_losses_are_zero_only_for_a_perfect_student_and_differentiable(tiny_model_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = capture_batch(model, ids, keep_vo=True)
    hf.linearize(model, 16)
    adapter = hf.adapters(model)[0]
    teacher, student = attention_rows(adapter, batch[0], 8 ** -0.5)
    assert torch.allclose(teacher.exp().sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(student.sum(-1), torch.ones(()), atol=1e-5)
    for name, fn in LOSSES.items():
        loss, info = fn(adapter, batch[0], 8 ** -0.5)
        assert loss.item() > 0 and torch.isfinite(loss), name
        loss.backward()
        assert adapter.feature_map.z.grad is not None and adapter.feature_map.z.grad.abs().sum() > 0, name
        adapter.feature_map.zero_grad()


def test_sampled_rows_give_the_loss_of_those_rows(tiny_model_dir):
    """The softmax loss on sampled query rows equals the mean of the full per-row KL over those rows."""
    from fastattn.distill.train import sample_rows
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    batch = capture_batch(model, ids)
    hf.linearize(model, 12)
    adapter = hf.adapters(model)[1]
    log_p, a = attention_rows(adapter, batch[1], 8 ** -0.5)
    per_row = (log_p.exp() * (log_p - torch.log(a + 1e-30))).nan_to_num().sum(-1)   # [B, H, T]
    rows = sample_rows(40, 7, seed=3, step=5)
    assert rows.shape == (7,) and rows.unique().numel() == 7
    assert torch.equal(rows, sample_rows(40, 7, seed=3, step=5))        # a function of (seed, step)
    assert not torch.equal(rows, sample_rows(40, 7, seed=3, step=6))
    assert sample_rows(40, 0, 0, 0) is None and sample_rows(40, 40, 0, 0) is None
    for name in ("softmax",):
        loss, _ = LOSSES[name](adapter, batch[1], 8 ** -0.5, True, rows)
        torch.testing.assert_close(loss, per_row[:, :, rows].mean(), rtol=1e-5, atol=1e-6)


def test_tiny_end_to_end_cli_run_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out), "--budget", "8",
            "--rules", "uniform,dof,dof_clip", "--lam", "0.01", "--prompts", "hello", "--stage2", "finetune",
            "--stage2-steps", "2"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for key, run in metrics["runs"].items():   # the log has the layerwise number before stage 2 starts
        assert f"{key}: after layerwise training, held-out loss {run['heldout']['loss']:.4f}" in printed
        assert f"after stage 2 {run['stage2_heldout']['loss']:.4f}" in printed
    for name in ("report.md", "dof_per_layer.png", "allocations.png", "loss_and_kl.png", "training.png",
                 "config.json", "command.txt"):
        assert (out / name).exists(), name
    alloc = metrics["allocations"]
    assert sum(alloc["uniform"]) == sum(alloc["dof"]) == 3 * 8 and alloc["uniform"] == [8, 8, 8]
    assert max(alloc["dof_clip"]) <= 8  # capped at the head dim
    assert len(metrics["dof"]["per_head"]) == 3 and len(metrics["dof"]["per_head"][0]) == 6
    for key, run in metrics["runs"].items():
        assert run["heldout"]["loss"] > 0 and len(run["kl_per_layer"]) == 3
        assert run["history"][-1]["loss"] < run["history"][0]["loss"] * 1.5
        assert "stage2_heldout" in run
        assert (out / "runs" / key / "adapters" / "fastattn.json").exists()
    report = (out / "report.md").read_text()
    assert "Held-out next-token loss" in report and "dof_clip" in report
    # rerun: every (rule, seed) is resumed from its saved metrics, nothing retrains
    capsys.readouterr()
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("resumed from") == 3


def test_tiny_cli_run_with_window_hybrid_and_lora_stage2(tiny_model_dir, tmp_path):
    out = tmp_path / "hybrid"
    argv = ["distill", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out), "--budget", "8",
            "--rules", "uniform", "--window", "8", "--stage2", "lora", "--stage2-steps", "3", "--lora-rank", "2",
            "--lora-lr", "0.01", "--prompts", "hello", "--throughput", "1", "--throughput-lengths", "16",
            "--throughput-gen-context", "16"]
    assert cli_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fixed = metrics["student"]["throughput"]["fixed_steps"]          # greedy_decode, eager on the CPU
    assert fixed["new_tokens"] == 32 and fixed["tokens_per_s"] > 0 and not fixed["cuda_graph"]
    assert "fixed_steps" not in metrics["teacher"]["throughput"]
    assert metrics["student"]["throughput_linear_only"]["fixed_steps"]["tokens_per_s"] > 0   # window off
    run = metrics["runs"]["uniform_s0"]
    for name in ("heldout", "linear_only_heldout", "stage2_heldout", "stage2_linear_only_heldout"):
        assert math.isfinite(run[name]["loss"]), name
    assert run["linear_only_heldout"]["loss"] != run["heldout"]["loss"]   # the window does change the model
    saved = json.loads((out / "runs" / "uniform_s0" / "adapters" / "fastattn.json").read_text())
    assert saved["window"] == 8 and saved["lora"]["rank"] == 2
    report = (out / "report.md").read_text()
    assert "sliding-window softmax hybrid" in report and "+ stage 2 (lora), without its window" in report
    assert "window off) | greedy_decode (eager)" in report


def test_config_validation():
    with pytest.raises(ValueError, match="rules must be"):
        make_config("tiny", rules=("bogus",))
    with pytest.raises(ValueError, match="unknown config keys"):
        make_config("tiny", nonsense=1)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="dim_multiple must be >= 1"):
        make_config("tiny", dim_multiple=0)


def test_allocations_honour_dim_multiple():
    """dim_multiple reaches the allocator: every rule's dims are multiples of it, at the same total budget."""
    from fastattn.distill.run import allocations
    dofs = [147.2, 32.5, 79.0, 69.1, 64.0, 5.3]
    for multiple in (1, 8):
        cfg = make_config("tiny", rules=("uniform", "dof", "dof_clip"), budget=64, dim_multiple=multiple)
        for rule, dims in allocations(dofs, cfg, head_dim=64).items():
            assert all(d % multiple == 0 and d >= 1 for d in dims), (rule, dims)
            if rule != "dof_clip":   # the clip rule caps at the head dim without redistributing
                assert sum(dims) == 64 * len(dofs), (rule, dims)
    odd = allocations(dofs, make_config("tiny", rules=("dof",), budget=64), head_dim=64)["dof"]
    assert any(d % 8 for d in odd)   # the default allocation is ragged: the option changes something


# ---- encoders (BERT family): hidden-state fidelity instead of next-token loss ----

@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with a WordPiece tokenizer trained on the offline corpus, saved as a local HF directory
    (64 positions, so the tiny preset's context of 32 fits and longer throughput lengths do not). Weights 10x the
    default init scale: peaked attention rows, so a linear student is measurably off (default: near-uniform rows)."""
    from tokenizers import BertWordPieceTokenizer
    path = tmp_path_factory.mktemp("tiny_bert")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator([data.corpus()[:50000]], vocab_size=300)
    tok = transformers.BertTokenizer(vocab=wordpiece.get_vocab())
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                  intermediate_size=96, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                  initializer_range=0.2)
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def test_encoder_sequences_are_cls_text_sep_with_padding(tiny_bert_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids, mask = data.encoder_sequences(tok, "heldout", 16, 4, max_positions=64, pad_every=2)
    assert ids.shape == mask.shape == (4, 16)
    assert (ids[:, 0] == tok.cls_token_id).all() and mask[0].all() and mask[2].all()
    assert (ids[[0, 2], -1] == tok.sep_token_id).all()
    assert mask[1].tolist() == [1] * 12 + [0] * 4 and ids[1, 11] == tok.sep_token_id
    assert (ids[1, 12:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="exceeds the encoder's 64 positions"):
        data.encoder_sequences(tok, "train", 65, 1, max_positions=64)


def test_encoder_attention_kl_ignores_padding(tiny_bert_dir):
    """The KL of a right-padded row (captured with its mask) equals that of the same sequence unpadded."""
    from fastattn.distill.evaluate import attention_kl
    model = transformers.BertModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    padded = capture_batch(model, ids, attention_mask=mask)
    alone = capture_batch(model, ids[1:, :13])
    hf.linearize(model, 8)
    kl_padded = attention_kl(model, [{k: v[1:] for k, v in e.items()} for e in padded], mask[1:])
    kl_alone = attention_kl(model, alone)
    assert all(a > 0 for a in kl_alone)
    torch.testing.assert_close(torch.tensor(kl_padded), torch.tensor(kl_alone), rtol=1e-4, atol=1e-6)


def test_tiny_encoder_end_to_end_cli_run(tiny_bert_dir, tmp_path):
    out = tmp_path / "bert_run"
    argv = ["distill", "--preset", "tiny", "--model", str(tiny_bert_dir), "--out", str(out), "--budget", "8",
            "--lam", "0.01", "--eval-sequences", "4", "--throughput", "1", "--throughput-lengths", "32,128"]
    assert cli_main(argv) == 0
    for name in ("report.md", "metrics.json", "dof_per_layer.png", "allocations.png", "loss_and_kl.png",
                 "training.png", "config.json", "command.txt"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "encoder" and metrics["heldout_metric"] == "held-out 1 - cosine"
    assert metrics["tokens"]["heldout"] < 4 * 32    # some held-out rows are padded
    teacher = metrics["teacher"]["heldout"]
    assert abs(teacher["loss"]) < 1e-5 and teacher["hidden_rel_err"] < 1e-5   # the reference itself
    assert "text" not in metrics["teacher"] and "text" not in metrics["student"]
    assert [p["T"] for p in metrics["student"]["throughput"]["prefill"]] == [32]    # 128 > 64 positions
    assert set(metrics["summary"]) == {"uniform", "dof"}
    for key, run in metrics["runs"].items():
        h = run["heldout"]
        assert all(torch.isfinite(torch.tensor(v)) for v in (h["loss"], h["cosine"], h["hidden_rel_err"])), key
        assert -1.0 <= h["cosine_min"] <= h["cosine"] <= 1.0 and h["loss"] == pytest.approx(1 - h["cosine"])
        assert h["loss"] > 1e-4 and h["hidden_rel_err"] > 1e-2, key    # a linear student is not the teacher
        assert len(run["kl_per_layer"]) == 3 and all(0 < kl < float("inf") for kl in run["kl_per_layer"]), key
    for row in metrics["summary"].values():
        assert -1.0 <= row["cosine_mean"] <= 1.0 and row["loss_mean"] == pytest.approx(1 - row["cosine_mean"])
    report = (out / "report.md").read_text()
    assert "| run | held-out 1 - cosine |" in report and "Held-out fidelity to the teacher" in report
    assert "Held-out next-token loss" not in report and "held-out loss" not in report   # no non-loss named a loss
    assert "Generated text" not in report and "generate ctx" not in report


def test_encoder_rejects_causal_only_options(tiny_bert_dir, tmp_path):
    from fastattn.distill.run import run
    with pytest.raises(ValueError, match="sliding-window hybrid is causal-only"):
        run(make_config("tiny", model=str(tiny_bert_dir), out=str(tmp_path / "w"), window=4), progress=False)
    with pytest.raises(ValueError, match="stage 2 'finetune' is end-to-end next-token"):
        run(make_config("tiny", model=str(tiny_bert_dir), out=str(tmp_path / "s"), stage2="finetune",
                        stage2_steps=2), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("loss,window", [("softmax", 0), ("softmax", 4), ("output_mse", 0)])
def test_cuda_graph_layerwise_steps_equal_eager_steps(tiny_model_dir, loss, window, monkeypatch):
    """train_layerwise on a GPU replays one captured step (3 eager warm-up steps first; 3 teacher batches cycled,
    sampled rows): the per-layer loss history and the trained feature maps equal those of all-eager steps
    (capturable Adam in both; bound: tests/tolerances.py)."""
    from fastattn.distill.train import train_layerwise

    from .test_lora import _capturable_adam
    _capturable_adam(monkeypatch)
    results = []
    for graphs in (False, False, True):
        model = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval().cuda()
        for p in model.parameters():
            p.requires_grad_(False)
        batches = [capture_batch(model, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(s))
                                 .cuda(), keep_vo=loss == "output_mse") for s in range(3)]
        torch.manual_seed(0)
        hf.linearize(model, 8, window=window, seed=0)
        cfg = make_config("tiny", loss=loss, loss_rows=10, epochs=3, ckpt_every=0, cuda_graph=graphs)
        history = train_layerwise(model, batches, cfg, progress=False, seed=0)
        results.append(([h["per_layer"] for h in history],
                        {k: v.detach().clone() for k, v in model.state_dict().items() if ".fastattn." in k}))
    (eager, eager_state), (again, again_state), (graph, graph_state) = results
    assert len(graph) == 9
    assert_replay_matches_eager("per-layer loss", torch.tensor(graph), torch.tensor(eager), torch.tensor(again))
    for k in eager_state:
        assert_replay_matches_eager(k, graph_state[k], eager_state[k], again_state[k])
