"""`fastattn ddro`: both experiments end to end at tiny sizes (run dir, report, plots, metrics), the exact
ground truth of the synthetic setting, and the verifier."""
from __future__ import annotations

import json

import pytest
import torch

from fastattn.cli import main
from fastattn.ddro import consistency as C
from fastattn.ddro.verifier import problems, verify


def test_setting_ground_truth_matches_sampling():
    cfg = C.ConsistencyConfig(K=3, gamma=0.3)
    st = C.make_setting(cfg)
    torch.testing.assert_close(st.pref + st.pref.T, torch.ones(3, 3, dtype=torch.float64))
    torch.testing.assert_close((st.g_plus + 2 * st.pi_ref * ((1 - st.pref) @ st.pi_ref)) / 2, st.pi_ref)
    chosen, _ = C.sample_pairs(st, 200_000, seed=0)
    freq = torch.bincount(chosen, minlength=3).double() / chosen.numel()
    assert C.tv(freq, st.g_plus) < 0.005
    # non-BT: the cyclic part makes some triple intransitive-looking relative to sigmoid(s_i - s_j)
    assert C.tv(st.pi_ref, st.g_plus) > 0.01


def test_consistency_cli_tiny(tmp_path):
    out = tmp_path / "a"
    assert main(["ddro", "consistency", "--ns", "100,2000", "--seeds", "0", "--dpo-betas", "1,3",
                 "--lbfgs-iters", "20", "--rounds", "1", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = m["summary"]["rows"]
    assert set(rows) == {"DDRO", "RDRO", "DPO beta=1", "DPO beta=3", "KTO beta=1", "BCO beta=1"}
    assert all(len(r["mean"]) == 2 for r in rows.values())
    assert rows["DDRO"]["mean"][1] < rows["DDRO"]["mean"][0]          # more data, closer to g+
    assert (out / "report.md").exists() and (out / "config.json").exists() and (out / "command.txt").exists()
    pytest.importorskip("matplotlib")
    assert (out / "tv_vs_n.png").exists()


def test_verifier():
    assert verify(" 12 is the answer", 12) and not verify("13", 12) and not verify("no idea", 12)
    assert verify("-3", -3) and verify("98 + 97 = 195", 195) and not verify("To add 98 and 97, we", 195)
    qs = problems(5, 0, 9)
    assert qs == problems(5, 0, 9) and all(0 <= a <= 18 for _, a in qs)


def test_verifier_cli_tiny(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from fastattn.ddro import verifier
    # the random tiny model is never right: label by response length so that every loss has both classes
    monkeypatch.setattr(verifier, "verify", lambda response, answer: len(response) % 2 == 0)
    out = tmp_path / "b"
    assert main(["ddro", "verifier", "--preset", "tiny", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["reference"]) == {"greedy", "sampled"}
    assert set(m["runs"]) == {"ddro", "rdro", "dpo", "kto"}
    assert (out / "report.md").read_text().startswith("# DDRO experiment (b)")
    # a rerun resumes every finished (loss, seed) from partial.json and trains nothing
    capsys.readouterr()
    assert main(["ddro", "verifier", "--preset", "tiny", "--out", str(out)]) == 0
    trained = sum(len(r) for r in m["runs"].values() if "skipped" not in r)
    assert trained >= 3 and capsys.readouterr().out.count(": resumed") == trained
    assert json.loads((out / "metrics.json").read_text())["runs"] == m["runs"]
    # so does a rerun that lists fewer losses (losses and seeds select runs); the report keeps every run
    assert main(["ddro", "verifier", "--preset", "tiny", "--losses", "kto", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": resumed") == len(m["runs"]["kto"])
    assert json.loads((out / "metrics.json").read_text())["runs"] == m["runs"]


def test_verifier_report_says_when_resumed_runs_trained_on_resampled_data(tmp_path):
    from fastattn.ddro.verifier import write_report
    counts = {"n_rows": 40, "n_correct": 5, "n_pairs": 4}
    run = {"greedy": 0.5, "sampled": 0.25, "data": dict(counts)}
    result = {**counts, "reference": {"greedy": 0.25, "sampled": 0.125},
              "runs": {"ddro": {"0": run}, "dpo": {"skipped": "no usable data"}}}
    assert "resampled" not in write_report(result, tmp_path / "a", "cmd").read_text()
    result["runs"]["kto"] = {"0": {**run, "data": {**counts, "n_pairs": 3}}}
    text = write_report(result, tmp_path / "b", "cmd").read_text()
    assert "resampled data" in text and "| kto | 0.500 +- 0.000 |" in text


def test_batched_generation_with_left_padding_equals_one_prompt_at_a_time():
    pytest.importorskip("transformers")
    from fastattn.ddro.verifier import CharTokenizer, generate, left_padded, load_model
    model, tok = load_model("tiny-random", torch.device("cpu"), torch.float32)
    qs = ["What is 1 + 2?", "What is 13 + 24? Reply with the number only.", "Hi"]   # ragged prompt lengths
    ids, mask = left_padded(tok, qs, 0)
    assert ids.shape == (3, len(qs[1])) and mask.sum(1).tolist() == [len(q) for q in qs]
    assert ids[2, :-2].eq(0).all() and mask[2, :-2].eq(0).all()
    together = generate(model, tok, qs, 2, False, 6, seed=0, batch=8)
    alone = [generate(model, tok, [q], 2, False, 6, seed=0, batch=8)[0] for q in qs]
    assert together == alone and all(len(r) == 2 for r in together)
    assert isinstance(tok, CharTokenizer)
