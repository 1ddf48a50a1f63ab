"""fastattn pcfg under torch.distributed (gloo, 2 CPU processes, the tiny preset): two ranks that each take half
of every global batch train exactly as one process (loss curve and final parameters to float tolerance); an
interrupted run resumes identically with the other number of processes (2 -> 1 and 1 -> 2); the whole experiment
(``run``: training on every rank, evaluation and files on rank 0) gives one process's results on every rank; with
``fsdp=True`` (FSDP2 ``fully_shard``) the same, and its checkpoint resumes in one process without FSDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fastattn import distributed  # noqa: E402
from fastattn.pcfg import LeveledPCFG  # noqa: E402
from fastattn.pcfg import train  # noqa: E402
from fastattn.pcfg.config import make_config  # noqa: E402
from fastattn.pcfg.run import run  # noqa: E402

from .distributed_launch import spawn  # noqa: E402

CPU = torch.device("cpu")
QUIET = dict(progress=False, log=lambda *_: None)


def _cfg(**kw):
    # global batch 8 -> 4 documents per rank; a checkpoint every 4 steps, a loss row every 2
    base = dict(steps=12, warmup_steps=2, cooldown_steps=0, ckpt_every=4, log_every=2, batch_size=8, out="unused")
    return make_config("tiny", **{**base, **kw})


def _run_cfg(out):
    return make_config("tiny", out=str(out), steps=8, warmup_steps=2, cooldown_steps=2, ckpt_every=4, log_every=2,
                       threads=1, progress=False)


class Interrupted(Exception):
    pass


def _train(out, cfg=None, stop_at: int | None = None):
    """train_run of D_M=3, seed 0 in ``out``; stop_at: raise right after the checkpoint of that step."""
    cfg = cfg or _cfg()
    g = LeveledPCFG(**cfg.grammar_kwargs())
    original = train._save

    def save(path, step, *args):
        original(path, step, *args)
        if path.name == "ckpt.pt" and step == stop_at:
            raise Interrupted
    train._save = save
    try:
        return train.train_run(cfg, g, 3, 0, Path(out), CPU, **QUIET)
    except Interrupted:
        assert stop_at is not None
        return None
    finally:
        train._save = original


def _step_gradients(out: Path, fsdp: bool = False) -> None:
    """One global batch's loss and gradients (by parameter name) of a fresh model, saved by rank 0."""
    from fastattn.pcfg.data import DocumentSource, training_batch
    from fastattn.pcfg.model import build_model
    cfg = _cfg(fsdp=fsdp)
    g = LeveledPCFG(**cfg.grammar_kwargs())
    model = build_model(cfg, g, 0)
    if fsdp:
        model = train.shard_model(model)
    batch = training_batch(DocumentSource(g, 0), cfg.batch_size, 3, 3, cfg.p_meta, distributed.rank(),
                           distributed.world_size())
    loss = distributed.all_reduce(train.backward(model, batch, CPU, cfg, fsdp), "sum")
    grads = {n: p.grad.full_tensor() if fsdp else p.grad for n, p in model.named_parameters()}
    if distributed.is_main():
        torch.save({"loss": loss, "grads": grads}, out)


def _worker(root: str) -> None:
    root = Path(root)
    distributed.init()
    _step_gradients(root / "grads_two.pt")
    _step_gradients(root / "grads_fsdp.pt", fsdp=True)
    _train(root / "two")
    _train(root / "cut2", stop_at=8)          # interrupted with 2 processes, resumed with 1 by the test
    _train(root / "cut1")                     # interrupted with 1 process by the test, resumed here with 2
    metrics = run(_run_cfg(root / "run2"), progress=False, log=lambda *_: None)
    (root / f"metrics_rank{distributed.rank()}.json").write_text(json.dumps(metrics))
    _train(root / "fsdp", _cfg(fsdp=True))
    _train(root / "fsdp_cut", _cfg(fsdp=True), stop_at=8)     # resumed with 1 process (no FSDP) by the test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The directory of every two-process run (one spawn of 2 gloo processes for the whole module)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pcfg_dist")
    assert _train(root / "cut1", stop_at=4) is None and (root / "cut1" / "ckpt.pt").exists()
    spawn(_worker, str(root))
    _train(root / "one")
    _step_gradients(root / "grads_one.pt")
    return root


@pytest.mark.parametrize("name", ["two", "fsdp"])
def test_gradient_of_one_global_batch_is_the_one_process_gradient(runs, name):
    one, two = torch.load(runs / "grads_one.pt"), torch.load(runs / f"grads_{name}.pt")
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 5
    for k, v in one["grads"].items():
        assert v.abs().max() > 0, k
        torch.testing.assert_close(two["grads"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def _assert_same(a: Path, b: Path) -> None:
    ha = json.loads((a / "train.json").read_text())["history"]
    hb = json.loads((b / "train.json").read_text())["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(2, 13, 2))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in ha]), torch.tensor([h["loss"] for h in hb]),
                               rtol=1e-5, atol=1e-6)
    pa, pb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_train_as_one_and_resume_across_process_counts(runs, tmp_path):
    one = json.loads((runs / "one" / "train.json").read_text())
    assert one["world_size"] == 1
    assert json.loads((runs / "two" / "train.json").read_text())["world_size"] == 2
    # the reference trains: its loss curve is not a constant
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]
    _assert_same(runs / "one", runs / "two")
    _assert_same(runs / "one", runs / "cut1")           # 1 -> 2 processes
    assert not (runs / "cut1" / "ckpt.pt").exists()
    assert (runs / "cut2" / "ckpt.pt").exists() and not (runs / "cut2" / "train.json").exists()
    _, resumed = _train(runs / "cut2")                       # 2 -> 1 process
    assert resumed["steps_run"] == 4
    _assert_same(runs / "one", runs / "cut2")

    two = json.loads((runs / "metrics_rank0.json").read_text())
    assert json.loads((runs / "metrics_rank1.json").read_text()) == two   # every rank returns rank 0's
    assert two["world_size"] == 2
    single = run(_run_cfg(tmp_path / "run1"), progress=False, log=lambda *_: None)
    assert single["world_size"] == 1 and set(two["runs"]) == set(single["runs"]) == {"dm0_s0", "dm3_s0",
                                                                                     "dm3_s0_cool"}
    for key, r in single["runs"].items():
        torch.testing.assert_close(torch.tensor([h["loss"] for h in two["runs"][key]["train"]["history"]]),
                                   torch.tensor([h["loss"] for h in r["train"]["history"]]), rtol=1e-5, atol=1e-6)
        for mode in ("meta", "mask"):
            torch.testing.assert_close(two["runs"][key]["loss"][mode]["average"], r["loss"][mode]["average"],
                                       rtol=1e-4, atol=1e-5, msg=f"{key} {mode}")
    assert two["reference"] == single["reference"] | {"dp_seconds": two["reference"]["dp_seconds"]}


def test_batch_not_divisible_by_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    cfg = _cfg(batch_size=8)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        train.train_run(cfg, LeveledPCFG(**cfg.grammar_kwargs()), 3, 0, tmp_path, CPU, **QUIET)
    assert not (tmp_path / "train.json").exists()


def test_fsdp_two_processes_train_as_one_and_resume_in_one(runs):
    result = json.loads((runs / "fsdp" / "train.json").read_text())
    assert result["fsdp"] and result["world_size"] == 2
    _assert_same(runs / "one", runs / "fsdp")
    state = torch.load(runs / "fsdp_cut" / "ckpt.pt")
    assert state["opt_format"] == "fqn" and state["step"] == 8
    _, resumed = _train(runs / "fsdp_cut")
    assert resumed["steps_run"] == 4 and not resumed["fsdp"]
    _assert_same(runs / "one", runs / "fsdp_cut")
