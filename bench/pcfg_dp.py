"""Timing of the exact PCFG DP (fastattn.pcfg.inside, "matrix" method) on one device, checked against the CPU.

    python bench/pcfg_dp.py --depth 5 --docs 2000 --out results.json
Prints and writes {device, depth, docs, seconds, docs_per_s, max_abs_diff_vs_cpu (on a subset)}.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastattn.pcfg import LeveledPCFG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--check", type=int, default=16, help="documents also scored on the CPU and compared")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = LeveledPCFG(depth=args.depth, seed=0)
    s = g.sample(args.docs, seed=0)
    dev = torch.device(args.device)
    terminals, lengths = s.terminals.to(dev), s.lengths.to(dev)
    g.inside(terminals[:8], lengths[:8])                                   # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = g.inside(terminals, lengths)
    member = bool(res.is_member(s.meta.to(dev)).all())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref = g.inside(s.terminals[:args.check], s.lengths[:args.check])
    got = res.log_prefix[:args.check, :, :ref.log_prefix.shape[-1]].cpu()
    finite = ref.log_prefix.isfinite()
    out = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "depth": args.depth, "docs": args.docs, "mean_length": float(s.lengths.float().mean()),
           "seconds": seconds, "docs_per_s": args.docs / seconds, "all_members": member,
           "same_support_as_cpu": bool(torch.equal(got.isfinite(), finite)),
           "max_abs_diff_vs_cpu": float((got[finite] - ref.log_prefix[finite]).abs().max())}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
