"""PCFG driver: seeded batches and their loss mask, trainer determinism/resume/cooldown branch, evaluation
pieces against the exact DP, and a tiny end-to-end CLI run on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from fastattn.pcfg import LeveledPCFG  # noqa: E402
from fastattn.pcfg import evaluate as ev  # noqa: E402
from fastattn.pcfg.config import make_config  # noqa: E402
from fastattn.pcfg.data import DocumentSource, training_batch  # noqa: E402
from fastattn.pcfg.train import train_run  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    cfg = make_config("tiny", out="unused")
    return cfg, LeveledPCFG(**cfg.grammar_kwargs())


def test_config_validation():
    assert make_config("tiny", meta_depths=(0, "D", 1, -1)).meta_depths == (0, 3, 1)
    for bad in (dict(meta_depths=(4,)), dict(p_meta=1.5), dict(cooldown_steps=30), dict(model="huge"),
                dict(attention="sparse"), dict(steps=0), dict(positions=(-1,))):
        with pytest.raises(ValueError):
            make_config("tiny", **bad)
    with pytest.raises(ValueError):
        make_config("nope")
    with pytest.raises(ValueError):
        make_config("tiny", not_a_key=1)


def test_training_batch_determinism_sharding_and_loss_mask(tiny):
    cfg, g = tiny
    src = DocumentSource(g, seed=3)
    a = training_batch(src, 16, step=7, meta_depth=2, p_meta=0.5)
    b = training_batch(DocumentSource(g, seed=3), 16, step=7, meta_depth=2, p_meta=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = training_batch(src, 16, step=8, meta_depth=2, p_meta=0.5)
    assert not (a["tokens"].shape == other["tokens"].shape and torch.equal(a["tokens"], other["tokens"]))
    # same documents and coin flips for every D_M: only the metadata slots differ
    c = training_batch(src, 16, step=7, meta_depth=0, p_meta=0.5)
    body = slice(g.prefix_width, None)
    assert torch.equal(a["tokens"][:, body], c["tokens"][:, body]) and torch.equal(a["has_meta"], c["has_meta"])
    assert (c["tokens"][:, 1:g.prefix_width] == g.mask_id).all()
    slots = a["tokens"][:, 1:g.prefix_width]
    assert (slots[~a["has_meta"]] == g.mask_id).all() and (slots[a["has_meta"], 2:] == g.mask_id).all()
    assert (slots[a["has_meta"], :2] == g.meta_id(torch.arange(2), a["meta"][a["has_meta"], :2])).all()
    assert 0 < int(a["has_meta"].sum()) < 16
    # the loss mask covers exactly the terminals and EOS
    target = a["tokens"][a["loss_mask"]]
    assert ((target < g.num_terminals) | (target == g.eos_id)).all()
    assert int(a["loss_mask"].sum()) == int(((a["tokens"] < g.num_terminals) | (a["tokens"] == g.eos_id)).sum())
    # rank slices of the global batch
    parts = [training_batch(src, 16, step=7, meta_depth=2, p_meta=0.5, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([p["meta"] for p in parts]), torch.cat([a["meta"][0::2], a["meta"][1::2]]))
    fixed = DocumentSource(g, seed=3, dataset_size=5)
    batch = training_batch(fixed, 32, step=0, meta_depth=0, p_meta=0.0)
    assert len({tuple(r) for r in batch["tokens"].tolist()}) <= 5


@pytest.mark.gpu
def test_batches_reach_the_gpu_unchanged(tiny):
    from fastattn.pcfg.train import to_device
    _, g = tiny
    batch = training_batch(DocumentSource(g, seed=0), 16, step=0, meta_depth=2, p_meta=0.5)
    moved = to_device(batch, torch.device("cuda"))           # pinned, non-blocking
    torch.cuda.synchronize()
    assert all(moved[k].is_cuda and torch.equal(moved[k].cpu(), v) for k, v in batch.items())


def test_trainer_is_deterministic_resumes_and_branches(tiny, tmp_path):
    cfg, g = tiny
    cfg = make_config("tiny", steps=12, warmup_steps=2, cooldown_steps=4, ckpt_every=5, log_every=4)
    m1, r1 = train_run(cfg, g, 3, 0, tmp_path / "a", CPU, progress=False, log=lambda *_: None)
    m2, r2 = train_run(cfg, g, 3, 0, tmp_path / "b", CPU, progress=False, log=lambda *_: None)
    assert [h["loss"] for h in r1["history"]] == [h["loss"] for h in r2["history"]]
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert (tmp_path / "a" / "branch.pt").exists() and not (tmp_path / "a" / "ckpt.pt").exists()
    # resume from an interrupted run's checkpoint gives the same model
    state = torch.load(tmp_path / "a" / "branch.pt")
    (tmp_path / "c").mkdir()
    torch.save(state, tmp_path / "c" / "ckpt.pt")
    m3, r3 = train_run(cfg, g, 3, 0, tmp_path / "c", CPU, progress=False, log=lambda *_: None)
    assert r3["steps_run"] == 4
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(m1.state_dict().values(), m3.state_dict().values()))
    # the cooldown branch starts from the same state but trains its last steps without metadata
    m4, r4 = train_run(cfg, g, 3, 0, tmp_path / "d", CPU, branch_from=tmp_path / "a" / "branch.pt",
                       progress=False, log=lambda *_: None)
    assert r4["cooldown"] and r4["history"][-1]["p_meta"] == 0.0 and r1["history"][-1]["p_meta"] == cfg.p_meta
    assert not all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m4.state_dict().values()))
    # a finished run is loaded, not retrained
    m5, r5 = train_run(cfg, g, 3, 0, tmp_path / "a", CPU, progress=False, log=lambda *_: None)
    assert r5 == json.loads((tmp_path / "a" / "train.json").read_text())


def test_model_next_token_distribution_sums_to_one_and_losses_index_targets(tiny):
    cfg, g = tiny
    from fastattn.pcfg.model import build_model
    model = build_model(cfg, g, 0).eval()
    docs = g.sample(6, seed=1)
    known = g.mask_metadata(docs.meta, 0)
    tokens, loss_mask = g.encode(docs.terminals, docs.lengths, known)
    with torch.no_grad():
        logp = model(input_ids=tokens).logits.log_softmax(-1)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(tokens.shape))
    losses = ev.position_losses(model, g, docs, known, cfg, CPU)                    # [N, T+1]
    want = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0] * loss_mask[:, 1:]
    torch.testing.assert_close(losses.sum(), want.sum())
    for n in range(6):
        k = int(docs.lengths[n])                   # entry k scores EOS
        torch.testing.assert_close(losses[n, k], -logp[n, g.prefix_width + k - 1, g.eos_id])


def test_probes_recover_a_linear_signal_and_bayes_ceiling():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(2, (200, 2), generator=gen)
    x = torch.randn(3, 2, 200, 8, generator=gen)
    x[1, :, :, 0] += 4 * (y[:, 0] - 0.5)                  # layer 1 encodes j_0 linearly
    valid = torch.ones(2, 200, dtype=torch.bool)
    acc = ev.fit_probes(x[:, :, :100], y[:100], valid[:, :100], x[:, :, 100:], y[100:], valid[:, 100:], 2, 100, CPU)
    assert acc.shape == (3, 2, 2)
    assert (acc[1, :, 0] > 0.9).all() and (acc[0] < 0.8).all() and (acc[:, :, 1] < 0.8).all()
    g = LeveledPCFG(depth=3, seed=0)
    es = ev.eval_set(g, 64, 5, CPU)
    ceiling = ev.bayes_probe_ceiling(es, (0, 4, 100))
    assert ceiling.shape == (3, 3) and (ceiling[2] == 0).all()      # nobody has 100 terminals
    assert (ceiling[1] >= 0.5 - 0.2).all() and (ceiling <= 1).all()


def test_grammatical_accuracy_of_the_true_grammar_is_one(tiny):
    cfg, g = tiny
    pool = g.sample(40, seed=2)
    prompts = ev.prompt_sets(pool, (0, 3, 8), 10)
    assert all((pool.lengths[i] >= k).all() for k, i in prompts.items())
    seq, _ = ev.conditional(g, pool.terminals, pool.lengths, pool.meta)
    assert (seq > -math.inf).all()
    flipped = pool.terminals.clone()
    flipped[:, 0] = (flipped[:, 0] + 1) % g.num_terminals
    bad, _ = ev.conditional(g, flipped, pool.lengths, pool.meta)
    assert (bad == -math.inf).any()


def test_tiny_end_to_end_cli(tmp_path, capsys):
    from fastattn.cli import main
    out = tmp_path / "run"
    assert main(["pcfg", "--preset", "tiny", "--out", str(out), "--threads", "1", "--progress", "0"]) == 0
    for name in ("report.md", "metrics.json", "config.json", "command.txt", "training.png", "fig_cooldown.png",
                 "fig_a_loss.png", "fig_a_loss.json", "fig_b_probes.png", "fig_b_probes.json",
                 "fig_c_grammar.png", "fig_c_grammar.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"dm0_s0", "dm3_s0", "dm3_s0_cool"}
    run = metrics["runs"]["dm3_s0"]
    assert len(run["probes"]) == 3 and len(run["probes"][0]) == 3          # [L+1, P, D]
    ref = metrics["reference"]
    assert ref["loss"]["meta"]["3"]["average"] < ref["loss"]["mask"]["average"]   # metadata lowers the Bayes loss
    # every model is worse than Bayes on average (up to sampling noise of 16 documents)
    assert run["loss"]["mask"]["average"] > ref["loss"]["mask"]["average"] - 0.05
    assert "Targets" in (out / "report.md").read_text()
    # rerun resumes everything from the run directory
    assert main(["pcfg", "--preset", "tiny", "--out", str(out), "--threads", "1", "--progress", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["runs"]["dm3_s0"]["loss"] == run["loss"]


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_left_padded_prompts_sample_like_unpadded_ones(tiny, attention):
    cfg, g = tiny
    from fastattn.pcfg.model import build_model
    cfg = make_config("tiny", attention=attention)
    model = build_model(cfg, g, 0).eval()
    docs = g.sample(2, seed=4)
    head = torch.tensor([g.bos_id] + [g.mask_id] * g.depth)
    short = torch.cat([head, docs.terminals[0, :2]])[None]
    padded = torch.cat([torch.full((1, 5), g.pad_id), short], dim=1)
    mask = (padded != g.pad_id).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)       # what generate() derives from the attention mask
    with torch.no_grad():
        want = model(input_ids=short).logits[0, -1]
        got = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    terminals, lengths = ev.sample_continuations(model, g, docs.terminals, torch.tensor([2, 5]), cfg, CPU, seed=0)
    assert terminals.shape == (2, 3 ** g.depth + 1)
    assert torch.equal(terminals[0, :2], docs.terminals[0, :2]) and torch.equal(terminals[1, :5], docs.terminals[1, :5])
    assert ((lengths >= torch.tensor([2, 5])) & (lengths <= 3 ** g.depth + 1)).all()


def test_linear_attention_model_trains(tiny, tmp_path):
    _, g = tiny
    cfg = make_config("tiny", attention="linear", steps=6, warmup_steps=1, cooldown_steps=0, log_every=3)
    model, result = train_run(cfg, g, 1, 0, tmp_path / "lin", CPU, progress=False, log=lambda *_: None)
    from fastattn.hf import linearized_layers
    assert all(linearized_layers(model)) and math.isfinite(result["final_loss"])
    assert any("fastattn.feature_map" in k for k in torch.load(tmp_path / "lin" / "model.pt"))


def _without_times(x):
    """A metrics entry without its wall-clock fields (every key containing "seconds")."""
    if isinstance(x, dict):
        return {k: _without_times(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_without_times(v) for v in x]
    return x


def test_workers_train_the_same_runs_as_one_process(tmp_path):
    from fastattn.cli import main
    args = ["pcfg", "--preset", "tiny", "--threads", "1", "--progress", "0"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert list(two["runs"]) == list(one["runs"]) == ["dm0_s0", "dm3_s0", "dm3_s0_cool"]
    assert two["runs"]["dm3_s0_cool"]["train"]["steps_run"] == 10          # resumed from its parent's branch
    assert _without_times(two["runs"]) == _without_times(one["runs"])      # same seeds: identical losses, metrics
    assert two["summary"] == one["summary"] and two["config"]["workers"] == 2
    assert not (tmp_path / "two" / "eval_sets.tmp").exists()   # the parent's sets for the workers, removed


@pytest.mark.parametrize("workers", [1, 2])
def test_time_limit_skips_runs_and_still_reports(tmp_path, workers):
    from fastattn.cli import main
    out = tmp_path / "late"
    assert main(["pcfg", "--preset", "tiny", "--out", str(out), "--threads", "1", "--progress", "0",
                 "--time-limit-s", "1e-9", "--workers", str(workers)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"] == {} and metrics["skipped"] == ["dm0_s0", "dm3_s0", "dm3_s0_cool"]
    assert "not made" in (out / "report.md").read_text()


def test_headline_differences_carry_binomial_standard_errors():
    """summarize: each accuracy(D_M>0) - accuracy(D_M=0) difference over short / long prompts comes with the
    binomial standard error of the difference of two means of per-length accuracies; the report counts the
    differences beyond two of them."""
    import math

    from fastattn.pcfg.report import _beyond
    from fastattn.pcfg.run import summarize

    def run(d, accs, n=100):
        return {"meta_depth": d, "seed": 0, "cooldown": False,
                "loss": {"mask": {"average": 0.6}, "meta": {"average": 0.6}}, "probes": [[[0.5]] * 3],
                "grammar": {k: {"accuracy": a, "n": n} for k, a in zip(["0", "4", "64"], accs)}}
    metrics = {"config": {"positions": [0, 4, 64], "seeds": [0], "meta_depths": [0, 3]},
               "reference": {"loss": {"mask": {"average": 0.55}}},
               "runs": {"dm0_s0": run(0, [0.1, 0.2, 0.3]), "dm3_s0": run(3, [0.02, 0.2, 0.5])}}
    h = summarize(metrics)["targets"]["grammar_short_negative_long_positive"]["runs"]["dm3_s0"]
    assert math.isclose(h["short"], -0.08) and math.isclose(h["long"], 0.2)
    assert math.isclose(h["short_se"], math.sqrt(0.02 * 0.98 / 100 + 0.1 * 0.9 / 100))
    assert math.isclose(h["long_se"], math.sqrt(0.5 * 0.5 / 100 + 0.3 * 0.7 / 100))
    assert h["holds"]
    # -0.08 is 2.4 standard errors (0.033) below zero, +0.2 is 2.9 (0.068) above
    assert "beyond two: 1 of 2 below zero, 1 above" in _beyond({"dm3_s0": h})
    # pooled over D_M>0 runs (here one: dm3_s0) against the D_M=0 runs: the same numbers as the one pair
    metrics["runs"]["dm5_s0"] = run(5, [0.04, 0.2, 0.7])
    pooled = summarize(metrics)["targets"]["grammar_short_negative_long_positive"]["pooled"]
    assert math.isclose(pooled["long"], 0.3) and math.isclose(pooled["short"], -0.07)
    assert math.isclose(pooled["short_se"], math.sqrt((0.02 * 0.98 + 0.04 * 0.96) / 100 / 4 + 0.1 * 0.9 / 100))
    assert pooled["runs"] == {"with_metadata": 2, "without": 1}


def test_report_only_reports_the_runs_on_disk_without_weights(tmp_path):
    """--report-only true: the report of the runs whose train.json and eval.json exist (weights deleted, so
    nothing can be loaded or evaluated again), the others listed as not made; the entries equal the full run's."""
    from fastattn.cli import main
    out = tmp_path / "tiny"
    base = ["pcfg", "--preset", "tiny", "--out", str(out), "--threads", "1", "--progress", "0"]
    assert main(base) == 0
    full = json.loads((out / "metrics.json").read_text())
    for f in out.glob("runs/*/*.pt"):
        f.unlink()
    (out / "runs" / "dm3_s0_cool" / "eval.json").unlink()
    assert main(base + ["--report-only", "true"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["skipped"] == ["dm3_s0_cool"] and list(again["runs"]) == ["dm0_s0", "dm3_s0"]
    for key in again["runs"]:
        assert again["runs"][key] == full["runs"][key]
    assert {k: v for k, v in again["reference"].items() if k != "dp_seconds"} == \
        {k: v for k, v in full["reference"].items() if k != "dp_seconds"}
    assert "no train.json and eval.json" in (out / "report.md").read_text()


def test_gpu_workers_cap_their_allocators_at_an_even_share(monkeypatch, tmp_path):
    """Each spawned worker on a GPU caps its caching allocator at WORKER_GPU_SHARE / workers of the memory, so
    the workers' caches cannot starve one another (the H100 out-of-memory of 2026-12-07); CPU workers do not."""
    from fastattn.pcfg import run as pr
    calls = []
    monkeypatch.setattr(pr.torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(pr, "Runner", lambda *a, **k: None)
    monkeypatch.setattr(pr.inference, "CUDA_SHARE", pr.inference.CUDA_SHARE)
    cfg = pr.PCFGRunConfig(preset="tiny", workers=8, threads=1, device="cpu")
    pr._start_worker(cfg, tmp_path / "sets")
    assert calls == []
    monkeypatch.setattr(pr, "resolve_device", lambda cfg: torch.device("cuda", 0))
    pr._start_worker(cfg, tmp_path / "sets")
    assert calls == [(pr.WORKER_GPU_SHARE / 8, torch.device("cuda", 0))]
