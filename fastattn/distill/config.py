"""Configuration of a distillation run: one validated dataclass, presets, YAML merge."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..driver_config import from_preset

RULES = ("uniform", "dof", "dof_clip", "sqrt")          # allocation rules compared at the same budget
LOSSES = ("softmax", "l2", "output_mse", "direct")
STAGE2 = ("none", "finetune", "lora")


@dataclass
class DistillConfig:
    model: str = "smollm2-135m"          # "smollm2-135m", "minilm", a local HF directory, or a .gguf file
    preset: str = "quick"
    out: str = "runs/distill"
    device: str = "auto"                 # "auto" -> cuda if available else cpu
    dtype: str = "auto"                  # "auto" -> bf16 on cuda, fp32 on cpu
    context: int = 128                   # tokens per training/eval sequence
    batch_size: int = 4
    calib_sequences: int = 8             # sequences for q/k capture and DoF
    train_sequences: int = 32            # distinct training sequences (teacher q/k cached once)
    epochs: int = 1                      # passes over the training sequences (the paper: one pass)
    eval_sequences: int = 8
    budget: int = 64                     # average feature dim per layer C (default: the head dim)
    rules: tuple[str, ...] = ("uniform", "dof", "dof_clip")
    seeds: tuple[int, ...] = (0,)
    lam: float = 2.0 ** -8               # DoF regulariser lambda
    dof_samples: int = 1024              # J: sampled vectors per head for the Gram matrix
    min_dim: int = 1
    dim_multiple: int = 1                # every layer's feature dim a multiple of it; 8 gives 16-byte bf16 rows,
                                         #   which the GPU kernels load as vectors (1: the paper's allocation)
    feature_map: str = "prf"
    loss: str = "softmax"
    loss_rows: int = 0                   # query rows per sequence sampled for each layerwise step (0: all T)
    lr_z: float = 0.02                   # the paper's learning rates
    lr_alpha: float = 0.2
    lr_other: float = 0.01               # parameters of other feature maps
    stage2: str = "none"                 # "finetune": end-to-end next-token fine-tuning of the feature maps
    stage2_steps: int = 0                #   after layerwise training (an ablation beyond the paper);
    stage2_lr: float = 1e-3              #   "lora": the same plus LoRA on the attention projections
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 1e-4
    softmax_layers: tuple[int, ...] = ()  # layers kept as softmax attention (hybrid ablation)
    window: int = 0                      # sliding-window softmax hybrid (LoLCATs): each query's last `window`
                                         #   keys by softmax, older keys by linear attention (0: linear only)
    prompts: tuple[str, ...] = ("What is the capital of France?", "Explain what a Python list is.")
    gen_tokens: int = 32
    throughput: bool = True
    throughput_lengths: tuple[int, ...] = (2048,)
    throughput_gen_context: int = 2048
    ckpt_every: int = 50
    fsdp: bool = False                   # under torchrun: end-to-end stages fully shard the model (FSDP2)
    cuda_graph: bool = True              # one process on a GPU: training steps replay one captured CUDA graph
    resume: bool = True

    def __post_init__(self):
        for name in ("context", "batch_size", "calib_sequences", "train_sequences", "epochs", "eval_sequences",
                     "budget", "dof_samples", "min_dim", "dim_multiple", "gen_tokens", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.window) < 0:
            raise ValueError(f"window must be >= 0 (0: linear attention only), got {self.window}")
        if int(self.loss_rows) < 0:
            raise ValueError(f"loss_rows must be >= 0 (0: all rows), got {self.loss_rows}")
        self.rules = tuple(self.rules)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.softmax_layers = tuple(int(i) for i in self.softmax_layers)
        self.prompts = tuple(self.prompts)
        self.throughput_lengths = tuple(int(t) for t in self.throughput_lengths)
        bad = [r for r in self.rules if r not in RULES]
        if bad or not self.rules:
            raise ValueError(f"rules must be a non-empty subset of {RULES}, got {self.rules}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.stage2 not in STAGE2:
            raise ValueError(f"stage2 must be one of {STAGE2}, got {self.stage2!r}")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # a 2-core CPU in 10-20 minutes (11 min measured): short context, one seed
    "quick": dict(context=128, batch_size=4, calib_sequences=8, train_sequences=48, epochs=32, eval_sequences=8,
                  rules=("uniform", "dof", "dof_clip"), seeds=(0,), dof_samples=512, gen_tokens=16,
                  throughput_lengths=(512,), throughput_gen_context=256),
    # one GPU: the paper's context, all rules, three seeds, every sequence of the corpus at 1024 tokens
    # (calibration 10, training 88, held-out 11 with the SmolLM2 tokenizer); 24 passes over the training
    # sequences with 256 sampled query rows per sequence and step; the end-to-end second stage as an ablation
    "full": dict(context=1024, batch_size=8, calib_sequences=10, train_sequences=88, epochs=24, eval_sequences=11,
                 loss_rows=256, rules=("uniform", "dof", "dof_clip", "sqrt"), seeds=(0, 1, 2), dof_samples=1024,
                 stage2="finetune", stage2_steps=100, gen_tokens=48, throughput_lengths=(2048, 16384),
                 throughput_gen_context=8192),
    # the smallest run that exercises every stage (tests)
    "tiny": dict(context=32, batch_size=2, calib_sequences=2, train_sequences=4, epochs=1, eval_sequences=2,
                 rules=("uniform", "dof"), seeds=(0,), dof_samples=64, gen_tokens=4, throughput=False),
}


def make_config(preset: str = "quick", **overrides) -> DistillConfig:
    return from_preset(DistillConfig, PRESETS, preset, **overrides)
