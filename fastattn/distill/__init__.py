"""Distillation of softmax attention into linear attention with DoF-sized per-layer feature dims.

Library code (config, data, capture, losses, train, evaluate, run, report) is importable; ``fastattn distill``
is the command line (cli.py).
"""
from .config import PRESETS, DistillConfig, make_config

__all__ = ["PRESETS", "DistillConfig", "make_config"]
