"""Distributed plumbing shared by the trainers (distill, ddro) under ``torchrun``.

One process per device. ``init()`` starts the process group from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when WORLD_SIZE > 1: backend "nccl" when CUDA is available, "gloo" on CPU.
Without torchrun (WORLD_SIZE unset or 1) every helper is a no-op for one process, so the same trainer code runs
on one CPU, one GPU or N processes.

NCCL settings from the launcher's environment are left as they are: in particular NVLink multicast stays off where
the launcher sets ``NCCL_NVLS_ENABLE=0`` (shared hosts); nothing here sets or clears NCCL variables.

Conventions used by the trainers:
- a *global* batch of B rows is split into ``world`` contiguous parts of B / world rows (``shard``), so that N
  processes with B / N rows each compute the gradient of one process with B rows (losses are means over
  equally sized parts, and ``average_gradients`` / DDP average over ranks);
- seeds are the same on every rank (identical initialisation; data order is a function of the seed and step);
- files and logs are written by rank 0 only (``is_main``), followed by ``barrier()`` where others read them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist
    return dist


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's env vars when WORLD_SIZE > 1 (idempotent).

    backend: None -> "nccl" if CUDA is available else "gloo". With nccl the current CUDA device is set to
    LOCAL_RANK first. Returns (rank, world size); (0, 1) without torchrun.
    """
    dist = _dist()
    if env_world_size() > 1 and not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={env_world_size()} but {missing} are not set: launch with "
                               f"`torchrun --nproc_per_node=N ...` (or set them as torchrun does)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return rank(), world_size()


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return _dist().get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """LOCAL_RANK from torchrun (0 when unset): the index of this process's device on its host."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0: the one process that writes files, metrics and logs."""
    return rank() == 0


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}")
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world_size() > 1:
        _dist().barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling a cache on disk), then the other ranks."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (any picklable object; returned unchanged for one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def _collective_device() -> torch.device:
    backend = _dist().get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce(t: Tensor, op: str = "mean") -> Tensor:
    """A new tensor: the sum or mean ("sum" | "mean") of ``t`` over ranks (float64 on the wire: meant for
    metrics and counts; the result has t's dtype and device)."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    if world_size() == 1:
        return t.clone()
    dev = _collective_device()
    buf = t.detach().to(dev, torch.float64).clone()
    _dist().all_reduce(buf)
    if op == "mean":
        buf /= world_size()
    return buf.to(t.device, t.dtype)


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite every tensor in place with rank ``src``'s values (parameters, buffers)."""
    if world_size() == 1:
        return
    dev = _collective_device()
    for t in tensors:
        buf = t.detach().to(dev).contiguous()
        _dist().broadcast(buf, src=src)
        with torch.no_grad():
            t.copy_(buf)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every ``.grad`` by its mean over ranks, in one flat fp32 all-reduce.

    Parameters whose grad is None are skipped: they must be None on every rank (the same parameters take part
    in every rank's loss), which holds for the trainers here.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    _dist().all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def shard(n: int, what: str = "the batch") -> slice:
    """This rank's contiguous part of ``n`` global rows: [rank * n / world, (rank + 1) * n / world).

    Raises ValueError when n is not divisible by the world size (unequal parts would weight rows unequally).
    """
    world = world_size()
    if n % world:
        raise ValueError(f"{what} has {n} rows, not divisible by the {world} processes: choose a global batch "
                         f"size that is a multiple of the number of processes")
    part = n // world
    return slice(rank() * part, (rank() + 1) * part)


# ------------------------------------------------------------------------------------------- FSDP (``--fsdp``)
def fully_shard_layers(model: torch.nn.Module, layers: Iterable[torch.nn.Module],
                       root: torch.nn.Module | None = None) -> torch.nn.Module:
    """FSDP2 (``fully_shard``): every module of ``layers`` (the decoder layers) its own unit, the rest (embeddings,
    norm, lm head) the root unit ``root`` (default ``model``); returns the root. In place: the parameters become
    DTensor shards (1 / world of each on every rank). Frozen parameters may sit next to trained ones; FSDP
    averages the gradients over ranks in its reduce-scatter, as ``average_gradients`` does."""
    from torch.distributed.fsdp import fully_shard
    for layer in layers:
        fully_shard(layer)
    return fully_shard(root if root is not None else model)


def full_tensor(t):
    """The whole tensor of a DTensor shard (a collective: every rank calls it); any other value unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with every sharded tensor gathered, on CPU (a collective with FSDP)."""
    return {k: full_tensor(v).detach().cpu() if isinstance(v, Tensor) else v
            for k, v in module.state_dict().items()}


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """Load a whole (unsharded) state dict into ``module``, sharded or not: each rank keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"the state dict lacks {missing[:5]}")
    with torch.no_grad():
        for k, target in own.items():
            value = state[k]
            if isinstance(target, DTensor):
                value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                          target.placements)
                target.to_local().copy_(value.to_local())
            else:
                target.copy_(value)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with every sharded state tensor gathered (a collective with FSDP): the format of an
    optimizer over whole parameters, so it loads with or without FSDP (``load_optimizer_state``)."""
    sd = opt.state_dict()
    state = {i: {k: full_tensor(v) for k, v in s.items()} for i, s in sorted(sd["state"].items())}
    return {**sd, "state": state}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a whole-parameter optimizer state dict (``full_optimizer_state`` or a plain one) into ``opt``, whose
    parameters may be DTensor shards: state tensors shaped like a sharded parameter are sharded like it."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            s = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                 if isinstance(v, Tensor) and v.shape == p.shape else v for k, v in s.items()}
        state[i] = s
    opt.load_state_dict({**sd, "state": state})
