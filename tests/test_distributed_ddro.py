"""fastattn.ddro's trainer under torch.distributed (gloo, 2 CPU processes, DDP): the same global batch split over
two ranks gives the loss curve, reference log-probs and final weights of one process; rank 0 alone writes the
metrics; a run interrupted on two processes resumes on one and ends where the uninterrupted run ends."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fastattn import distributed  # noqa: E402
from fastattn.ddro.config import DDROConfig  # noqa: E402
from fastattn.ddro.trainer import DDROTrainer  # noqa: E402

from .distributed_launch import spawn  # noqa: E402
from .test_ddro_trainer import PAIRED, UNPAIRED, CharTokenizer, tiny_llama  # noqa: E402

# name -> (dataset, config, per-device batch on one process); two processes take half of it each
CASES = {
    "ddro": (UNPAIRED, dict(loss_type="ddro", learning_rate=3e-3), 4),
    "dpo_accumulate": (PAIRED, dict(loss_type="dpo", learning_rate=3e-3, gradient_accumulation_steps=2), 2),
}
STEPS = 4


def _trainer(out, name: str, world: int, **kw) -> DDROTrainer:
    data, cfg, batch = CASES[name]
    cfg = DDROConfig(output_dir=str(out), max_length=24, max_prompt_length=8, logging_steps=1, save_steps=2,
                     max_steps=STEPS, device="cpu", per_device_train_batch_size=batch // world, **{**cfg, **kw})
    return DDROTrainer(tiny_llama(), CharTokenizer(), data, cfg)


class Interrupted(Exception):
    pass


def _result(tr: DDROTrainer, history: list[dict]) -> dict:
    return {"history": history, "ref_logps": tr.ref_logps, "state": tr.model.state_dict()}


def _worker(root: str) -> None:
    root = Path(root)
    for name in CASES:
        tr = _trainer(root / name / "two", name, 2)
        torch.save(_result(tr, tr.train(log=lambda s: None)), root / name / f"two_rank{distributed.rank()}.pt")
    # interrupted right after the checkpoint of step 2, on every rank
    train_until_checkpoint(_trainer(root / "ddro" / "cut", "ddro", 2), 2)


def train_until_checkpoint(tr, stop_step: int) -> None:
    """Run tr.train() and interrupt it right after its checkpoint of ``stop_step`` is written."""
    save = tr._save

    def save_then_stop(step, opt):
        save(step, opt)
        if step == stop_step:
            raise Interrupted
    tr._save = save_then_stop
    with pytest.raises(Interrupted):
        tr.train(log=lambda s: None)


def _assert_same(a: dict, b: dict) -> None:
    assert [r["step"] for r in a["history"]] == [r["step"] for r in b["history"]] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in a["history"]]),
                                   torch.tensor([r[key] for r in b["history"]]), rtol=1e-5, atol=1e-6, msg=key)
    for n in a["state"]:
        torch.testing.assert_close(a["state"][n], b["state"][n], rtol=1e-5, atol=1e-6, msg=n)


def test_two_processes_train_as_one_and_resume_in_one(tmp_path, monkeypatch):
    spawn(_worker, str(tmp_path))
    ones = {}
    for name in CASES:
        two = torch.load(tmp_path / name / "two_rank0.pt", weights_only=False)
        two_r1 = torch.load(tmp_path / name / "two_rank1.pt", weights_only=False)
        tr = _trainer(tmp_path / name / "one", name, 1)
        one = ones[name] = _result(tr, tr.train(log=lambda s: None))
        assert one["history"][-1]["loss"] < one["history"][0]["loss"], name    # it trains
        torch.testing.assert_close(two["ref_logps"], one["ref_logps"], rtol=1e-5, atol=1e-5)
        _assert_same(one, two)
        _assert_same(two, two_r1)                        # the replicas agree and report the same metrics
        lines = (tmp_path / name / "two" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))   # written once

    # resume the two-process run on one process: the same global batch of 4 rows
    cut = tmp_path / "ddro" / "cut"
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 2
    with pytest.raises(ValueError, match="global batch of 4"):
        _trainer(cut, "ddro", 2).train(log=lambda s: None)     # 2 rows on one process: not the same run
    restored = []
    original = DDROTrainer._restore
    monkeypatch.setattr(DDROTrainer, "_restore", lambda self, opt: restored.append(original(self, opt)) or
                        restored[-1])
    tr = _trainer(cut, "ddro", 1)
    resumed = _result(tr, tr.train(log=lambda s: None))
    assert restored == [2]
    _assert_same(ones["ddro"], resumed)
