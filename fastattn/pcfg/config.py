"""Configuration of a PCFG metadata-conditioning experiment: one validated dataclass, model and run presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..driver_config import from_preset

ATTENTIONS = ("softmax", "linear")

# Llama-style decoders built from scratch (no downloads): hidden, layers, heads, MLP width
MODELS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),        # CPU tests
    "small": dict(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=256),      # the 2-core CPU run
    "10m": dict(hidden_size=320, num_layers=6, num_heads=5, intermediate_size=1280),      # ~9.9M, one GPU
    "paper": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),  # the paper's size
}


@dataclass
class PCFGRunConfig:
    preset: str = "cpu"
    out: str = "runs/pcfg"
    device: str = "auto"                     # "auto" -> cuda if available else cpu
    dtype: str = "auto"                      # "auto" -> bf16 autocast on cuda, fp32 on cpu
    threads: int = 0                         # torch CPU threads (0: torch's default, cores / workers per worker)
    workers: int = 1                         # runs trained at once, each in its own process on the same device
    progress: bool = True                    # progress bars while training
    fsdp: bool = False                       # under torchrun: fully shard the model (FSDP2) instead of DDP
    # ---- grammar (LeveledPCFG) ----
    depth: int = 5                           # D
    num_symbols: int = 3
    num_alternatives: int = 2                # K
    rule_probs: str = "uniform"
    grammar_seed: int = 0
    # ---- model ----
    model: str = "small"                     # a key of MODELS
    attention: str = "softmax"               # "linear": fastattn linear attention (fastattn.hf.linearize)
    feature_map: str = "hedgehog"
    feature_dim: int = 0                     # 0 -> the head dim
    # ---- training ----
    meta_depths: tuple = (0, 1, 3, "D")      # D_M per run; "D" (or -1) = all levels
    seeds: tuple[int, ...] = (0, 1)
    p_meta: float = 0.5                      # fraction of training documents that carry metadata
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1                # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dataset_size: int = 0                    # 0: fresh samples every step; N > 0: a fixed set of N documents
    cooldown_steps: int = 0                  # ablation: branch the last N steps of every D_M > 0 run without metadata
    ckpt_every: int = 200
    log_every: int = 50
    resume: bool = True
    time_limit_s: float = 0.0                # > 0: start no new run after this many seconds; report what exists
    report_only: bool = False                # train and evaluate nothing: report the runs whose train.json and
                                             # eval.json exist in out/runs (the others are listed as not made)
    # ---- evaluation ----
    eval_sequences: int = 512                # figure A (next-token loss by inference mode)
    probe_train: int = 1024                  # figure B (linear probes), documents to fit / to score
    probe_test: int = 512
    probe_steps: int = 300
    positions: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)   # prompt lengths k (figures B and C)
    gen_samples: int = 128                   # figure C: sampled continuations per prompt length
    eval_batch_size: int = 256
    eval_seed: int = 12345                   # held-out documents (disjoint generator stream from training)

    def __post_init__(self):
        for name in ("depth", "num_symbols", "num_alternatives", "steps", "batch_size", "ckpt_every", "log_every",
                     "eval_sequences", "probe_train", "probe_test", "probe_steps", "gen_samples", "eval_batch_size",
                     "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            setattr(self, name, int(getattr(self, name)))
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        depths = []
        for d in self.meta_depths:
            d = self.depth if str(d).upper() == "D" or int(d) == -1 else int(d)
            if not 0 <= d <= self.depth:
                raise ValueError(f"meta_depths entries must be in [0, depth={self.depth}] or 'D', got {d}")
            if d not in depths:
                depths.append(d)
        if not depths:
            raise ValueError("meta_depths must not be empty")
        self.meta_depths = tuple(depths)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        self.positions = tuple(sorted({int(k) for k in self.positions}))
        if not self.positions or self.positions[0] < 0:
            raise ValueError(f"positions must be non-negative prompt lengths, got {self.positions}")
        if not 0.0 <= self.p_meta <= 1.0:
            raise ValueError(f"p_meta must be in [0, 1], got {self.p_meta}")
        if not 0 <= self.cooldown_steps < self.steps:
            raise ValueError(f"cooldown_steps must be in [0, steps), got {self.cooldown_steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.dataset_size < 0 or self.feature_dim < 0 or self.threads < 0:
            raise ValueError("dataset_size, feature_dim and threads must be >= 0")
        if self.time_limit_s < 0:
            raise ValueError(f"time_limit_s must be >= 0, got {self.time_limit_s}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def grammar_kwargs(self) -> dict:
        return dict(depth=self.depth, num_symbols=self.num_symbols, num_alternatives=self.num_alternatives,
                    rule_probs=self.rule_probs, seed=self.grammar_seed)


PRESETS: dict[str, dict] = {
    # the smallest run that exercises every stage (tests, seconds)
    "tiny": dict(depth=3, model="tiny", meta_depths=(0, "D"), seeds=(0,), steps=30, batch_size=8, warmup_steps=5,
                 cooldown_steps=10, ckpt_every=10, log_every=10, eval_sequences=16, probe_train=32, probe_test=16,
                 probe_steps=20, positions=(0, 2, 8), gen_samples=8, eval_batch_size=16),
    # the 2-core CPU in about 30-40 minutes (D=4: documents have 16..81 terminals, so no k=64 prompts)
    "cpu": dict(depth=4, model="small", meta_depths=(0, 1, 3, "D"), seeds=(0, 1), steps=1200, batch_size=32,
                lr=3e-3, warmup_steps=100, cooldown_steps=240, ckpt_every=200, eval_sequences=384, threads=1,
                probe_train=768, probe_test=384, positions=(0, 1, 2, 4, 8, 16, 32), gen_samples=64,
                eval_batch_size=128),
    # one H200 over two device calls (the second resumes): 8 runs x 6000 steps of batch 64 (384k documents per run),
    # 8 runs at a time, then 6 cooldowns x 1200 steps. Measured (results/pcfg/gpu_h200, 4500 steps): the 8 base
    # runs side by side took 377 s (95 steps/s together), a cooldown of 900 steps 60 s, an evaluation 15-20 s at 128
    # prompts per k; so ~500 s of base runs here, and 512 prompts per k (binomial standard error ~0.018 of one
    # accuracy near 0.2, against 0.035 at 128, which left every accuracy difference of that run noise-sized).
    "gpu": dict(depth=5, model="10m", meta_depths=(0, 1, 3, "D"), seeds=(0, 1), steps=6000, batch_size=64,
                lr=1.5e-3, warmup_steps=300, cooldown_steps=1200, ckpt_every=1000, log_every=200, workers=8,
                eval_sequences=1024, probe_train=2048, probe_test=1024, positions=(0, 1, 2, 4, 8, 16, 32, 64),
                gen_samples=512, eval_batch_size=1024),
}


def make_config(preset: str = "cpu", **overrides) -> PCFGRunConfig:
    return from_preset(PCFGRunConfig, PRESETS, preset, **overrides)
