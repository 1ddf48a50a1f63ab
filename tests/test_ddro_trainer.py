"""fastattn.ddro trainer: TRL formats and config names, reference log-probs (against full logits), mu "auto",
global-batch class weights, every loss, metrics, checkpoint + resume. A tiny random Llama, built here."""
from __future__ import annotations

import json

import pytest
import torch

from fastattn.ddro import losses
from fastattn.ddro.config import DDROConfig, from_trl
from fastattn.ddro.data import collate, tokenize
from fastattn.ddro.trainer import DDROTrainer
from fastattn.ops.seq_logps.reference import seq_logps_reference

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    """Characters -> ids 3..62; bos 1, eos 2, pad 0."""
    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 60 for c in text]}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).float()


UNPAIRED = [{"prompt": f"q{i}:", "completion": "yes" * (1 + i % 3) if i % 3 else "no", "label": i % 3 != 0}
            for i in range(12)]
PAIRED = [{"prompt": f"p{i}", "chosen": "good" + "!" * (i % 2), "rejected": "bad"} for i in range(6)]


def test_formats_and_errors():
    tok = CharTokenizer()
    rows = tokenize(PAIRED, tok, max_prompt_length=4, max_length=9)
    assert len(rows) == 12 and [r.label for r in rows[:4]] == [True, False, True, False]
    assert rows[0].pair == rows[1].pair == 0 and rows[0].prompt[0] == 1 and rows[0].completion[-1] == 2
    assert all(len(r.prompt) <= 4 and len(r.prompt) + len(r.completion) <= 9 for r in rows)
    rows = tokenize(UNPAIRED, tok)
    assert [r.label for r in rows] == [ex["label"] for ex in UNPAIRED] and all(r.pair == -1 for r in rows)
    b = collate(rows[:3], 0)
    assert b["targets"].shape == b["response"].shape == (3, b["input_ids"].shape[1] - 1)
    assert int(b["response"][0].sum()) == len(rows[0].completion)
    with pytest.raises(ValueError, match="prompt/completion/label"):
        tokenize([{"prompt": "a", "answer": "b"}], tok)
    with pytest.raises(ValueError, match="label must be a bool"):
        tokenize([{"prompt": "a", "completion": "b", "label": "yes"}], tok)
    conv = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
             "label": True}]
    assert tokenize(conv, tok)[0].completion == [3 + ord("y") % 60, 3 + ord("o") % 60, 2]


def test_datasets_dataset_accepted():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(PAIRED)
    assert [r.completion for r in tokenize(ds, CharTokenizer())] == \
        [r.completion for r in tokenize(PAIRED, CharTokenizer())]


def test_config_validation_and_trl_names():
    with pytest.raises(ValueError, match="loss_type"):
        DDROConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="mu must be"):
        DDROConfig(mu=1.5)
    with pytest.raises(ValueError, match="max_prompt_length"):
        DDROConfig(max_length=8, max_prompt_length=8)

    class KTOConfig:   # stands in for trl.KTOConfig: same field names, to_dict()
        def to_dict(self):
            return {"learning_rate": 5e-7, "per_device_train_batch_size": 4, "beta": 0.2, "max_steps": 0,
                    "desirable_weight": 1.5, "report_to": ["wandb"], "output_dir": "x"}

    cfg, ignored = from_trl(KTOConfig())
    assert (cfg.loss_type, cfg.learning_rate, cfg.beta, cfg.max_steps) == ("kto", 5e-7, 0.2, -1)
    assert ignored == ["report_to"]
    cfg, _ = from_trl({"loss_type": "sigmoid", "beta": 0.3})
    assert cfg.loss_type == "dpo"
    assert from_trl({"loss_type": "rdro"}, alpha=0.25)[0].alpha == 0.25


def _trainer(tmp_path, data=UNPAIRED, **kw):
    cfg = DDROConfig(output_dir=str(tmp_path), max_length=24, max_prompt_length=8, logging_steps=1,
                     per_device_train_batch_size=4, device="cpu", **kw)
    return DDROTrainer(tiny_llama(), CharTokenizer(), data, cfg)


def test_reference_logps_match_full_logits_and_auto_mu(tmp_path):
    tr = _trainer(tmp_path, loss_type="ddro", learning_rate=1e-3)
    assert tr.frac == pytest.approx(8 / 12)
    b = collate(tr.rows, tr.pad_id)
    with torch.no_grad():
        out = tr.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[-1][:, :-1].double()
        ref = seq_logps_reference(h, tr.model.lm_head.weight.double(), b["targets"], b["response"])
        full = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, b["targets"][..., None])[..., 0]
    torch.testing.assert_close(ref, (full * b["response"]).sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tr.ref_logps.double(), ref, rtol=1e-5, atol=1e-4)
    cached = torch.load(tmp_path / "ref_logps.pt", weights_only=True)
    assert torch.equal(cached["ref_logps"], tr.ref_logps)


def test_global_batch_weights_equal_balanced_loss(tmp_path):
    tr = _trainer(tmp_path, loss_type="ddro", mu=0.4)
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    lab = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    want, _ = losses.ddro_loss(pol, ref, lab, mu=0.4)
    rows, _ = losses.ddro_loss(pol, ref, lab, mu=0.4, reduction="none")
    w = tr._row_weights(lab).double()
    # split into micro-batches [0:3], [3:10]: the weighted sums add up to the one-batch balanced loss
    got = (rows[:3] * w[:3]).sum() + (rows[3:] * w[3:]).sum()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss_type,data", [("ddro", UNPAIRED), ("rdro", UNPAIRED), ("dpo", PAIRED),
                                            ("kto", UNPAIRED), ("bco", PAIRED)])
def test_every_loss_trains_and_logs(tmp_path, loss_type, data):
    tr = _trainer(tmp_path, data, loss_type=loss_type, learning_rate=3e-3, max_steps=6)
    hist = tr.train(log=lambda s: None)
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "checkpoint.pt").exists()
    # the preferred completions gain log-probability relative to the unpreferred ones
    from fastattn.ddro.trainer import SequenceLogps, batch_logps
    after = batch_logps(SequenceLogps(tr.model), tr.rows, tr.pad_id, tr.device)
    l = after - tr.ref_logps
    assert l[tr.labels].mean() > l[~tr.labels].mean()


def test_resume_equals_one_run(tmp_path):
    one = _trainer(tmp_path / "one", loss_type="ddro", learning_rate=1e-3, max_steps=4, save_steps=2)
    one.train(log=lambda s: None)
    part = _trainer(tmp_path / "two", loss_type="ddro", learning_rate=1e-3, max_steps=2, save_steps=2)
    part.train(log=lambda s: None)
    rest = _trainer(tmp_path / "two", loss_type="ddro", learning_rate=1e-3, max_steps=4, save_steps=2)
    hist = rest.train(log=lambda s: None)
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    for (n, a), (_, b) in zip(one.model.state_dict().items(), rest.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_dpo_needs_pairs(tmp_path):
    with pytest.raises(ValueError, match="paired"):
        _trainer(tmp_path, UNPAIRED, loss_type="dpo")
