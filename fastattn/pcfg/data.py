"""Training and evaluation batches: fresh samples from a per-step seeded generator (shardable by rank)."""
from __future__ import annotations

import torch
from torch import Tensor

from .grammar import LeveledPCFG

_TRAIN_STREAM = 2 ** 40          # training generators live above every evaluation seed
_MAX_STEPS = 2 ** 24


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step ``step`` of run seed ``seed``; the same for every D_M (and rank)."""
    if not 0 <= step < _MAX_STEPS:
        raise ValueError(f"step must be in [0, {_MAX_STEPS}), got {step}")
    return torch.Generator().manual_seed(_TRAIN_STREAM + int(seed) * _MAX_STEPS + int(step))


class DocumentSource:
    """Documents for training step t: fresh samples (``dataset_size=0``) or draws from a fixed seeded set."""

    def __init__(self, pcfg: LeveledPCFG, seed: int, dataset_size: int = 0):
        self.pcfg, self.seed = pcfg, int(seed)
        self.pool = pcfg.sample(dataset_size, seed=_TRAIN_STREAM - 1 - self.seed) if dataset_size else None

    def draw(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(terminals [n, T], lengths [n], meta [n, D]) from ``gen``."""
        if self.pool is None:
            s = self.pcfg.sample(n, seed=gen)
            return s.terminals, s.lengths, s.meta
        idx = torch.randint(len(self.pool.lengths), (n,), generator=gen)
        lengths = self.pool.lengths[idx]
        return self.pool.terminals[idx, :int(lengths.max())], lengths, self.pool.meta[idx]


def training_batch(source: DocumentSource, batch_size: int, step: int, meta_depth: int, p_meta: float,
                   rank: int = 0, world: int = 1) -> dict[str, Tensor]:
    """One step's global batch, rows ``rank::world`` of it: tokens [B, L], loss_mask [B, L], has_meta [B], meta [B, D].

    Documents and the has-metadata coin flips depend only on (seed, step), not on D_M or p_meta, so runs of one
    seed see the same documents and a metadata-free cooldown sees the same ones with their metadata masked.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    gen = step_generator(source.seed, step)
    terminals, lengths, meta = source.draw(batch_size, gen)
    has_meta = torch.rand(batch_size, generator=gen) < p_meta
    rows = slice(rank, None, world)
    terminals, lengths, meta, has_meta = terminals[rows], lengths[rows], meta[rows], has_meta[rows]
    terminals = terminals[:, :int(lengths.max())]
    known = source.pcfg.mask_metadata(meta, meta_depth, has_meta)
    tokens, loss_mask = source.pcfg.encode(terminals, lengths, known)
    return {"tokens": tokens, "loss_mask": loss_mask, "has_meta": has_meta, "meta": meta}
