"""Density-ratio alignment (DDRO / RDRO) and baseline preference losses over per-row sequence log-probs, a
trainer for HF causal LMs on TRL-format data, and the experiments behind ``fastattn ddro``."""
from .config import DDROConfig, from_trl
from .losses import bco_loss, ddro_loss, dpo_loss, kto_loss, rdro_loss
from .trainer import DDROTrainer

__all__ = ["ddro_loss", "rdro_loss", "dpo_loss", "kto_loss", "bco_loss", "DDROConfig", "from_trl", "DDROTrainer"]
