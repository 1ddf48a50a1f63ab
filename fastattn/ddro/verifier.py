"""Experiment (b): SmolLM2-135M-Instruct on a task with a programmatic verifier (two-number addition).

1. Responses to training prompts are sampled from the reference model and labelled by the verifier (the last
   integer in the response equals the sum). Unpaired rows feed DDRO / RDRO / KTO; for DPO each prompt with both a
   correct and an incorrect sample gives (chosen, rejected) pairs.
2. Every loss trains a fresh copy of the reference model with the same budget (steps x batch), per seed.
3. Verifier accuracy on held-out prompts, greedy and sampled, against the reference model.

Model "tiny-random" is a randomly initialised two-layer Llama with a character tokenizer (CPU smoke test).
"""
from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import DDROConfig
from .trainer import DDROTrainer

_INT = re.compile(r"-?\d+")


@dataclass
class VerifierConfig:
    model: str = "smollm2-135m"
    preset: str = "gpu"
    losses: tuple[str, ...] = ("ddro", "rdro", "dpo", "kto")
    seeds: tuple[int, ...] = (0, 1, 2)
    train_prompts: int = 512
    eval_prompts: int = 256
    samples_per_prompt: int = 8          # sampled responses per training prompt (temperature 1)
    eval_samples: int = 4                # sampled responses per held-out prompt (besides greedy)
    max_new_tokens: int = 24
    max_operand: int = 99
    steps: int = 200                     # the same budget for every loss
    batch_size: int = 32
    learning_rate: float = 5e-6
    beta: float = 0.1
    device: str = "auto"
    out: str = "runs/ddro/verifier"

    def __post_init__(self):
        self.losses = tuple(self.losses)
        self.seeds = tuple(int(s) for s in self.seeds)
        for name in ("train_prompts", "eval_prompts", "samples_per_prompt", "max_new_tokens", "steps",
                     "batch_size", "max_operand"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [x for x in self.losses if x not in ("ddro", "rdro", "dpo", "kto", "bco")]
        if bad or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of ddro, rdro, dpo, kto, bco; got {self.losses}")


PRESETS = {
    "gpu": {},
    # a 2-core CPU in about two hours on one thread: fewer prompts, two seeds, a larger learning rate
    "cpu": dict(seeds=(0, 1), train_prompts=96, eval_prompts=64, samples_per_prompt=8, eval_samples=2,
                max_new_tokens=16, max_operand=50, steps=40, batch_size=16, learning_rate=1e-5, device="cpu"),
    "tiny": dict(model="tiny-random", losses=("ddro", "rdro", "dpo", "kto"), seeds=(0,), train_prompts=6,
                 eval_prompts=3, samples_per_prompt=4, eval_samples=1, max_new_tokens=4, max_operand=9, steps=2,
                 batch_size=4, learning_rate=1e-3, device="cpu"),
}


def make_config(preset: str | None = None, **overrides) -> VerifierConfig:
    preset = preset or overrides.pop("preset", "gpu")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    return VerifierConfig(**{**PRESETS[preset], **overrides, "preset": preset})


# ---------------------------------------------------------------------------------------------- task + model
def problems(n: int, seed: int, max_operand: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"What is {a} + {b}? Reply with the number only.", a + b))
    return out


def verify(response: str, answer: int) -> bool:
    """The last integer in the response is the answer (so "23 + 45 = 68" counts, "23 + 45 is" does not)."""
    found = _INT.findall(response)
    return bool(found) and int(found[-1]) == answer


class CharTokenizer:
    """Characters <-> ids 3..98 (printable ASCII); bos 1, eos 2, pad 0 (the tiny-random model's tokenizer)."""
    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + min(max(ord(c) - 32, 0), 95) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    if name == "tiny-random":
        import transformers
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
        return transformers.LlamaForCausalLM(cfg).to(device, dtype), CharTokenizer()
    from .. import models
    model, tok = models.load(name, dtype=dtype, device=device)
    return model, tok


def _prompt_text(tok, question: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
    return question + "\n"


def left_padded(tok, texts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, L] of ``texts`` left-padded with ``pad_id``, and their attention mask [N, L]."""
    rows = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tok, questions: list[str], n: int, sample: bool, max_new_tokens: int, seed: int,
             batch: int = 64, desc: str | None = None) -> list[list[str]]:
    """n responses per question (greedy when sample=False), ``batch`` sequences per generate call: prompts
    left-padded together, each repeated n times. ``desc``: show a progress bar."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    per_call = max(1, batch // n)
    out = []
    for start in tqdm(range(0, len(questions), per_call), desc=desc, disable=desc is None, leave=False):
        chunk = questions[start:start + per_call]
        ids, mask = left_padded(tok, [_prompt_text(tok, q) for q in chunk], pad)
        ids, mask = ids.repeat_interleave(n, 0).to(dev), mask.repeat_interleave(n, 0).to(dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=1.0 if sample else None, top_p=None, top_k=None, pad_token_id=pad,
                             eos_token_id=eos)
        texts = [tok.decode(g[ids.shape[1]:], skip_special_tokens=True) for g in gen]
        out += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


def accuracy(model, tok, probs, cfg: VerifierConfig, seed: int) -> dict:
    qs = [q for q, _ in probs]
    greedy = generate(model, tok, qs, 1, False, cfg.max_new_tokens, seed, desc="eval greedy")
    sampled = generate(model, tok, qs, cfg.eval_samples, True, cfg.max_new_tokens, seed + 1, desc="eval sampled")
    g = sum(verify(r[0], a) for r, (_, a) in zip(greedy, probs)) / len(probs)
    s = sum(verify(x, a) for r, (_, a) in zip(sampled, probs) for x in r) / (len(probs) * cfg.eval_samples)
    return {"greedy": g, "sampled": s}


def build_datasets(model, tok, cfg: VerifierConfig) -> tuple[list[dict], list[dict]]:
    """(unpaired rows, paired rows) in TRL's formats, from the reference model's samples."""
    probs = problems(cfg.train_prompts, 1000, cfg.max_operand)
    samples = generate(model, tok, [q for q, _ in probs], cfg.samples_per_prompt, True, cfg.max_new_tokens, 7,
                       desc="sampling training responses")
    unpaired, paired = [], []
    for (q, a), resp in zip(probs, samples):
        prompt = [{"role": "user", "content": q}]
        good = [r for r in resp if verify(r, a)]
        bad = [r for r in resp if not verify(r, a)]
        unpaired += [{"prompt": prompt, "completion": [{"role": "assistant", "content": r}], "label": verify(r, a)}
                     for r in resp if r.strip()]
        paired += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}]} for c, r in zip(good, bad) if c.strip()
                   and r.strip()]
    return unpaired, paired


def _run_settings(config: dict) -> dict:
    """The config keys that change a (loss, seed) run's result, JSON-normalised (tuples come back as lists)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in ("losses", "seeds", "preset")}))


def run(cfg: VerifierConfig, log=print) -> dict:
    from .trainer import resolve_device
    dev, dtype = resolve_device(DDROConfig(device=cfg.device))
    ref, tok = load_model(cfg.model, dev, dtype)
    unpaired, paired = build_datasets(ref, tok, cfg)
    n_pos = sum(r["label"] for r in unpaired)
    log(f"{len(unpaired)} sampled responses, {n_pos} verified correct; {len(paired)} pairs")
    held_out = problems(cfg.eval_prompts, 2000, cfg.max_operand)
    # every finished (loss, seed) is kept in partial.json: a rerun with the same settings resumes, also when it
    # lists other losses or seeds (they select runs, they do not change one)
    partial = Path(cfg.out) / "partial.json"
    result = json.loads(partial.read_text()) if partial.exists() else {}
    if _run_settings(result.get("config", {})) != _run_settings(asdict(cfg)):
        result = {"n_rows": len(unpaired), "n_correct": n_pos, "n_pairs": len(paired),
                  "reference": accuracy(ref, tok, held_out, cfg, 0), "runs": {}}
    result["config"] = asdict(cfg)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(result, indent=1))
    log(f"reference: {result['reference']}")
    for loss in cfg.losses:
        data = paired if loss == "dpo" else unpaired
        if loss == "dpo" and not data or loss != "dpo" and not 0 < n_pos < len(unpaired):
            result["runs"][loss] = {"skipped": "no usable data (needs both correct and incorrect samples)"}
            continue
        for seed in cfg.seeds:
            if str(seed) in result["runs"].get(loss, {}):
                log(f"{loss} seed {seed}: resumed {result['runs'][loss][str(seed)]}")
                continue
            policy = copy.deepcopy(ref)
            tcfg = DDROConfig(loss_type=loss, learning_rate=cfg.learning_rate, beta=cfg.beta, max_steps=cfg.steps,
                              per_device_train_batch_size=cfg.batch_size, seed=seed, device=str(dev),
                              dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
                              output_dir=str(Path(cfg.out) / f"{loss}_seed{seed}"), logging_steps=10,
                              save_steps=max(cfg.steps, 1), max_length=160, max_prompt_length=128)
            trainer = DDROTrainer(policy, tok, data, tcfg, ref_model=ref)
            trainer.train(log=lambda s: log(f"  {loss} seed {seed}: {s}"))
            acc = accuracy(policy.eval(), tok, held_out, cfg, 0)
            # GPU sampling is not bitwise reproducible: a resumed invocation may train on slightly other samples
            acc["data"] = {"n_rows": len(unpaired), "n_correct": n_pos, "n_pairs": len(paired)}
            result["runs"].setdefault(loss, {})[str(seed)] = acc
            partial.write_text(json.dumps(result, indent=1))
            log(f"{loss} seed {seed}: {acc}")
            del policy, trainer
    return result


def write_report(result: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    ref = result["reference"]
    lines = ["# DDRO experiment (b): SmolLM2 on a verifiable task (two-number addition)", "",
             f"Command: `{command}`", "",
             f"{result['n_rows']} sampled training responses, {result['n_correct']} verified correct, "
             f"{result['n_pairs']} DPO pairs; same steps x batch for every loss.", ""]
    first = {k: result[k] for k in ("n_rows", "n_correct", "n_pairs")}
    if any(isinstance(r, dict) and r.get("data", first) != first
           for runs in result["runs"].values() for r in runs.values()):
        lines += ["Resumed runs trained on resampled data (GPU sampling is not bitwise reproducible); the counts "
                  "of each run are under `data` in metrics.json.", ""]
    lines += [
             "| model | greedy accuracy | sampled accuracy | seeds |", "|---|---|---|---|",
             f"| reference | {ref['greedy']:.3f} | {ref['sampled']:.3f} | - |"]
    bars = {"reference": (ref["greedy"], 0.0)}
    for loss, runs in result["runs"].items():
        if "skipped" in runs:
            lines.append(f"| {loss} | skipped: {runs['skipped']} | | |")
            continue
        g = torch.tensor([r["greedy"] for r in runs.values()], dtype=torch.float64)
        s = torch.tensor([r["sampled"] for r in runs.values()], dtype=torch.float64)
        sd = lambda t: float(t.std()) if t.numel() > 1 else 0.0
        lines.append(f"| {loss} | {float(g.mean()):.3f} +- {sd(g):.3f} | {float(s.mean()):.3f} +- {sd(s):.3f} | "
                     f"{len(runs)} |")
        bars[loss] = (float(g.mean()), sd(g))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(bars), [v[0] for v in bars.values()], yerr=[v[1] for v in bars.values()], capsize=3)
        ax.set(ylabel="held-out greedy verifier accuracy", title="same training budget per loss")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
        lines += ["", "![accuracy](accuracy.png)"]
    except ImportError:
        pass
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
