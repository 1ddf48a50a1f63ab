"""fastattn distill under torch.distributed (gloo, 2 CPU processes, a tiny random Llama, offline): the layerwise
stage and the end-to-end stage 2 with the global batch split over two ranks train exactly as one process with the
whole batch; DoF and allocations are the same on every rank; an interrupted two-process run resumes in one
process and ends where the uninterrupted run ends."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fastattn import distributed  # noqa: E402
from fastattn.distill import make_config, train  # noqa: E402
from fastattn.distill.run import run  # noqa: E402

from .distributed_launch import spawn  # noqa: E402
from .test_distill import tiny_model_dir  # noqa: E402,F401  (the shared fixture)

KEY = "dof_s0"


def _cfg(model_dir, out):
    # global batch 4 -> 2 sequences per rank; 6 layerwise steps, 4 stage-2 steps, a checkpoint every 2 steps
    return make_config("tiny", model=str(model_dir), out=str(out), rules=("dof",), budget=8, lam=0.01,
                       batch_size=4, train_sequences=8, epochs=3, loss_rows=12, stage2="finetune", stage2_steps=4,
                       ckpt_every=2, prompts=("hello",), gen_tokens=2)


class Interrupted(Exception):
    pass


def _interrupt_after(name: str, at: int):
    """Patch train._checkpoint to stop the run (on every rank) right after the checkpoint `name` of step `at`."""
    original = train._checkpoint

    def checkpoint(path, step, *args):
        original(path, step, *args)
        if path is not None and path.name == name and step == at:
            raise Interrupted
    train._checkpoint = checkpoint
    return original


def _worker(model_dir: str, root: str) -> None:
    root = Path(root)
    metrics = run(_cfg(model_dir, root / "two"), progress=False)
    (root / f"metrics_rank{distributed.rank()}.json").write_text(json.dumps(metrics))
    for name, at, out in (("ckpt.pt", 4, "cut_layerwise"), ("stage2.pt", 2, "cut_stage2")):
        original = _interrupt_after(name, at)
        try:
            run(_cfg(model_dir, root / out), progress=False)
            raise AssertionError("the run was not interrupted")
        except Interrupted:
            pass
        finally:
            train._checkpoint = original


def _adapters(out) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "runs" / KEY / "adapters" / "fastattn_adapters.safetensors"))


def _assert_same_training(a: dict, b: dict, out_a, out_b) -> None:
    ra, rb = a["runs"][KEY], b["runs"][KEY]
    assert [h["step"] for h in ra["history"]] == [h["step"] for h in rb["history"]] == list(range(1, 7))
    assert [h["step"] for h in ra["stage2_history"]] == [h["step"] for h in rb["stage2_history"]] == [1, 2, 3, 4]
    for key in ("history", "stage2_history"):
        torch.testing.assert_close(torch.tensor([h["loss"] for h in ra[key]]),
                                   torch.tensor([h["loss"] for h in rb[key]]), rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(torch.tensor([h["per_layer"] for h in ra["history"]]),
                               torch.tensor([h["per_layer"] for h in rb["history"]]), rtol=1e-5, atol=1e-6)
    pa, pb = _adapters(out_a), _adapters(out_b)
    assert pa.keys() == pb.keys() and any(k.endswith(".z") for k in pa)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(ra["stage2_heldout"]["loss"], rb["stage2_heldout"]["loss"], rtol=1e-5, atol=1e-6)


def test_two_processes_train_as_one_and_resume_in_one(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    spawn(_worker, str(tiny_model_dir), str(tmp_path))
    two = json.loads((tmp_path / "metrics_rank0.json").read_text())
    assert json.loads((tmp_path / "metrics_rank1.json").read_text()) == two   # every rank returns rank 0's metrics
    assert two["world_size"] == 2
    one = run(_cfg(tiny_model_dir, tmp_path / "one"), progress=False, log=lambda *a: None)
    assert one["world_size"] == 1
    torch.testing.assert_close(torch.tensor(two["dof"]["per_head"]), torch.tensor(one["dof"]["per_head"]))
    assert two["allocations"] == one["allocations"]
    # the stages train: the uninterrupted reference is not a constant
    assert one["runs"][KEY]["history"][-1]["loss"] < one["runs"][KEY]["history"][0]["loss"]
    _assert_same_training(one, two, tmp_path / "one", tmp_path / "two")

    # interrupted two-process runs: a checkpoint on disk, no finished run; resumed here with one process
    restored = []

    def spy(path, model, opt):
        start, history = original_restore(path, model, opt)
        restored.append((path.name, start))
        return start, history
    original_restore = train._restore
    monkeypatch.setattr(train, "_restore", spy)
    for out, want in (("cut_layerwise", [("ckpt.pt", 4), ("stage2.pt", 0)]),
                      ("cut_stage2", [("ckpt.pt", 6), ("stage2.pt", 2)])):
        assert not (tmp_path / out / "runs" / KEY / "metrics.json").exists()
        restored.clear()
        resumed = run(_cfg(tiny_model_dir, tmp_path / out), progress=False, log=lambda *a: None)
        assert restored == want, out
        _assert_same_training(one, resumed, tmp_path / "one", tmp_path / out)
        assert not (tmp_path / out / "runs" / KEY / "ckpt.pt").exists()   # removed once the run is saved


def test_one_process_without_torchrun_and_clear_errors(monkeypatch):
    assert distributed.init() == (0, 1)          # no torchrun: one process, no process group
    assert distributed.shard(6) == slice(0, 6) and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init()
