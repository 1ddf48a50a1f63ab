"""Density-ratio alignment (DDRO / RDRO) and baseline preference losses over per-row sequence log-probs."""
from .losses import bco_loss, ddro_loss, dpo_loss, kto_loss, rdro_loss

__all__ = ["ddro_loss", "rdro_loss", "dpo_loss", "kto_loss", "bco_loss"]
