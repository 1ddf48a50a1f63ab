"""Linear attention: the public functions in interface.py over the backends reference (torch), cpu, triton, cuda."""
from __future__ import annotations


def auto_order(q, k, v) -> tuple[str, ...] | None:
    """The order in which backend "auto" tries the backends for a call (q [B, H, T, D]; decode steps arrive with
    T = 1), or None for the device's default. Measured on the H200 (bench/results/linear_attn_h200.md, bf16): the
    triton chunk kernels ran 3-12x faster than the CUDA ones (fp32 FMA, no tensor cores) at every sequence shape,
    while the CUDA decode step ran 1.7-3.3x faster than triton's with the host time included (eager decoding is
    host-bound). In device time alone (CUDA-graph replay, bench/results/linear_attn_h200_long.md) triton's step is
    the faster one (2.3 vs 5.5 us at B=1, 4.9 vs 7.0 us at B=64, H=9, D=64), which matters only inside a graph."""
    if q.device.type != "cuda":
        return None
    return ("cuda", "triton", "torch") if q.shape[2] == 1 else ("triton", "cuda", "torch")
