"""``fsdp=True`` (FSDP2 ``fully_shard`` through ``fastattn.distributed.fully_shard_layers``) on 2 gloo processes for
the ddro trainer and the distill end-to-end stage (``train_direct``: the "direct" loss and stage 2): the same global
batch gives one process's loss curve and final parameters, and an FSDP checkpoint resumes in one process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fastattn import distributed  # noqa: E402
from fastattn.ddro.config import DDROConfig  # noqa: E402
from fastattn.ddro.trainer import DDROTrainer  # noqa: E402

from .distributed_launch import spawn  # noqa: E402
from .test_ddro_trainer import UNPAIRED, CharTokenizer, tiny_llama  # noqa: E402
from .test_distributed_ddro import STEPS, Interrupted, _assert_same, train_until_checkpoint  # noqa: E402
from .test_distill import tiny_model_dir  # noqa: E402,F401  (the shared fixture)


def _ddro(out, world: int, fsdp: bool, acc: int = 1) -> DDROTrainer:
    # global batch 4 rows: 4 // (world * acc) per process and micro-batch
    cfg = DDROConfig(output_dir=str(out), loss_type="ddro", learning_rate=3e-3, max_length=24, max_prompt_length=8,
                     logging_steps=1, save_steps=2, max_steps=STEPS, device="cpu", fsdp=fsdp,
                     gradient_accumulation_steps=acc, per_device_train_batch_size=4 // (world * acc))
    return DDROTrainer(tiny_llama(), CharTokenizer(), UNPAIRED, cfg)


def _worker(root: str) -> None:
    root = Path(root)
    for name, acc in (("fsdp", 1), ("fsdp_acc", 2)):
        tr = _ddro(root / name, 2, True, acc)
        history = tr.train(log=lambda s: None)
        state = distributed.full_state_dict(tr.model)
        assert any(hasattr(p, "full_tensor") for p in tr.model.parameters())    # it was sharded
        if distributed.is_main():
            torch.save({"history": history, "state": state}, root / f"{name}.pt")
    train_until_checkpoint(_ddro(root / "cut", 2, True), 2)


def test_ddro_fsdp_two_processes_train_as_one_and_resume_in_one(tmp_path):
    spawn(_worker, str(tmp_path))
    tr = _ddro(tmp_path / "one", 1, False)
    one = {"history": tr.train(log=lambda s: None), "state": tr.model.state_dict()}
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]       # it trains
    start = tiny_llama().state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in one["state"].items())
    for name in ("fsdp", "fsdp_acc"):
        _assert_same(one, torch.load(tmp_path / f"{name}.pt", weights_only=False))
    cut = tmp_path / "cut"
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 2
    tr = _ddro(cut, 1, False)
    resumed = {"history": tr.train(log=lambda s: None), "state": tr.model.state_dict()}
    _assert_same(one, resumed)


# ---- distill: train_direct (stage 2 after the layerwise stage; the "direct" loss) ---------------------------------
DKEY = "dof_s0"


def _distill_cfg(model_dir, out, **kw):
    from fastattn.distill import make_config
    # global batch 4 -> 2 sequences per rank; a checkpoint every 2 steps
    base = dict(rules=("dof",), budget=8, lam=0.01, batch_size=4, train_sequences=8, epochs=2, loss_rows=12,
                stage2="finetune", stage2_steps=4, ckpt_every=2, prompts=("hello",), gen_tokens=2, throughput=False)
    return make_config("tiny", model=str(model_dir), out=str(out), **{**base, **kw})


def _distill_worker(model_dir: str, root: str) -> None:
    from fastattn.distill import train
    from fastattn.distill.run import run
    root = Path(root)
    run(_distill_cfg(model_dir, root / "fsdp", fsdp=True), progress=False, log=lambda *a: None)
    run(_distill_cfg(model_dir, root / "direct", fsdp=True, loss="direct", stage2="none"), progress=False,
        log=lambda *a: None)
    original = train._checkpoint

    def checkpoint(path, step, *args):      # interrupted right after stage 2's checkpoint of step 2
        original(path, step, *args)
        if path.name == "stage2.pt" and step == 2:
            raise Interrupted
    train._checkpoint = checkpoint
    try:
        with pytest.raises(Interrupted):
            run(_distill_cfg(model_dir, root / "cut", fsdp=True), progress=False, log=lambda *a: None)
    finally:
        train._checkpoint = original


def _distill_run(out) -> tuple[dict, dict]:
    import json
    from safetensors.torch import load_file
    run_dir = Path(out) / "runs" / DKEY
    return (json.loads((run_dir / "metrics.json").read_text()),
            load_file(str(run_dir / "adapters" / "fastattn_adapters.safetensors")))


def _assert_same_distill(a, b, keys) -> None:
    (ra, pa), (rb, pb) = a, b
    for key in keys:
        assert [h["step"] for h in ra[key]] == [h["step"] for h in rb[key]] and ra[key]
        torch.testing.assert_close(torch.tensor([h["loss"] for h in ra[key]]),
                                   torch.tensor([h["loss"] for h in rb[key]]), rtol=1e-5, atol=1e-6, msg=key)
    assert pa.keys() == pb.keys() and any(k.endswith(".z") for k in pa)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(ra["heldout"]["loss"], rb["heldout"]["loss"], rtol=1e-5, atol=1e-6)


def test_distill_direct_and_stage2_fsdp_two_processes_train_as_one(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("matplotlib")
    from fastattn.distill import train
    from fastattn.distill.run import run
    sharded = []
    original = train._sharded_copy
    monkeypatch.setattr(train, "_sharded_copy", lambda m: sharded.append(1) or original(m))
    spawn(_distill_worker, str(tiny_model_dir), str(tmp_path))
    assert not sharded            # one process: no FSDP even with fsdp=True (and no spawned patch leaks here)
    quiet = dict(progress=False, log=lambda *a: None)
    run(_distill_cfg(tiny_model_dir, tmp_path / "one"), **quiet)
    run(_distill_cfg(tiny_model_dir, tmp_path / "one_direct", loss="direct", stage2="none"), **quiet)
    one = _distill_run(tmp_path / "one")
    s2 = [h["loss"] for h in one[0]["stage2_history"]]
    assert s2[-1] < s2[0]                                   # stage 2 trains
    _assert_same_distill(one, _distill_run(tmp_path / "fsdp"), ("history", "stage2_history"))
    torch.testing.assert_close(one[0]["stage2_heldout"]["loss"],
                               _distill_run(tmp_path / "fsdp")[0]["stage2_heldout"]["loss"], rtol=1e-5, atol=1e-6)
    _assert_same_distill(_distill_run(tmp_path / "one_direct"), _distill_run(tmp_path / "direct"), ("history",))
    # the interrupted FSDP run resumes from its stage-2 checkpoint in one process
    assert (tmp_path / "cut" / "runs" / DKEY / "stage2.pt").exists()
    run(_distill_cfg(tiny_model_dir, tmp_path / "cut", fsdp=True), **quiet)
    _assert_same_distill(one, _distill_run(tmp_path / "cut"), ("history", "stage2_history"))
