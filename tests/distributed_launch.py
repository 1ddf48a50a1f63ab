"""Launch a function on N CPU processes with the gloo backend, the way torchrun does (its env vars), for tests."""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)    # N processes share the CI machine's cores
    import torch.distributed as dist
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, *args, world: int = 2) -> None:
    """Run fn(*args) on ``world`` processes (torchrun's RANK, WORLD_SIZE, MASTER_* set; fastattn.distributed.init
    starts gloo); raises if any process fails. fn must be importable (a module-level function)."""
    torch.multiprocessing.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
