"""Configuration of a DDRO/RDRO (or baseline) alignment run: one validated dataclass using TRL's field names.

Field names follow TRL's ``DPOConfig`` / ``KTOConfig`` (``learning_rate``, ``per_device_train_batch_size``,
``num_train_epochs``, ``max_steps``, ``output_dir``, ``beta``, ``max_length``, ``desirable_weight``, ...), so a
TRL config (object or dict) converts with ``from_trl``; keys this trainer has no use for are listed, not guessed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real

LOSSES = ("ddro", "rdro", "dpo", "kto", "bco")
GUARDS = ("tangent", "clamp", "none")
REDUCTIONS = ("balanced", "pooled")


def _fraction(name: str, value) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be 'auto' or a number in (0, 1), got {value!r}")
    return float(value)


@dataclass
class DDROConfig:
    loss_type: str = "ddro"                 # "ddro" | "rdro" | baselines "dpo" (paired data) | "kto" | "bco"
    mu: float | str = "auto"                # DDRO: preferred fraction of pi_ref ("auto": from the whole dataset)
    alpha: float | str = "auto"             # RDRO: relative-ratio mixing ("auto": preferred fraction)
    guard: str = "tangent"                  # DDRO barrier guard
    guard_eps: float = 1e-3
    reduction: str = "balanced"             # DDRO/RDRO: class-balanced over the global batch, or "pooled"
    beta: float = 0.1                       # DPO / KTO / BCO
    desirable_weight: float = 1.0           # KTO
    undesirable_weight: float = 1.0
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8    # rows (pairs for DPO) per step per process
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1                     # > 0 overrides num_train_epochs
    max_length: int = 512                   # prompt + completion tokens
    max_prompt_length: int = 256            # prompts keep their last tokens
    precompute_ref_log_probs: bool = True   # always on (DDRO needs no KL batch); kept for TRL-compatible configs
    seq_logps_backend: str = "auto"
    output_dir: str = "runs/ddro"
    logging_steps: int = 10
    save_steps: int = 100
    resume: bool = True
    seed: int = 0
    device: str = "auto"                    # "auto" -> cuda if available else cpu
    dtype: str = "auto"                     # "auto" -> bf16 on cuda, fp32 on cpu
    fsdp: bool = False                      # under torchrun: fully shard the policy (FSDP2) instead of DDP

    def __post_init__(self):
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type must be one of {LOSSES}, got {self.loss_type!r}")
        if self.guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {self.guard!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        self.mu = _fraction("mu", self.mu)
        self.alpha = _fraction("alpha", self.alpha)
        if not 0 < self.guard_eps < 1:
            raise ValueError(f"guard_eps must be in (0, 1), got {self.guard_eps}")
        for name in ("beta", "desirable_weight", "undesirable_weight", "learning_rate", "num_train_epochs"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                     "max_prompt_length", "logging_steps", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                             f"({self.max_length}) to leave room for the completion")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_trl(trl_config, **overrides) -> tuple[DDROConfig, list[str]]:
    """A DDROConfig from a TRL config object (``DPOConfig``, ``KTOConfig``, ``BCOConfig``, anything with
    ``to_dict()``) or a dict, plus ``overrides`` (which win). Returns (config, the keys not used). A TRL
    ``loss_type`` that is not one of ours (DPO's "sigmoid", "ipo", ...) is replaced by the loss the config class
    names: "kto", "bco", else "dpo"."""
    raw = trl_config.to_dict() if hasattr(trl_config, "to_dict") else dict(trl_config)
    fields = {f.name for f in dataclasses.fields(DDROConfig)}
    kept = {k: v for k, v in raw.items() if k in fields}
    if kept.get("loss_type") not in LOSSES:
        kind = type(trl_config).__name__.lower()
        kept["loss_type"] = next((name for name in ("kto", "bco") if name in kind), "dpo")
    if kept.get("max_steps") == 0:     # TRL's "no limit" is -1; 0 would mean no training
        kept["max_steps"] = -1
    kept.update(overrides)
    return DDROConfig(**kept), sorted(k for k in raw if k not in fields)
