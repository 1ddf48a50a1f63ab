"""`fastattn pcfg`: preset < --config file.yaml < command-line flags; writes the run directory."""
from __future__ import annotations


from ..driver_config import add_flags, start_run_dir
from ..driver_config import resolve as resolve_config
from .config import PRESETS, PCFGRunConfig, make_config


def make_parser(parser):
    return add_flags(parser, PCFGRunConfig, PRESETS, "cpu", "cpu: ~40 min on a 2-core CPU; gpu: ~10M-parameter "
                     "model on one GPU, 8 runs at a time (~12 min, see config.py); tiny: smoke test", int_tuples=("seeds", "positions"))


def resolve(args) -> PCFGRunConfig:
    return resolve_config(args, PCFGRunConfig, make_config)


def main(args) -> int:
    """Under torchrun every rank trains; rank 0 alone evaluates and writes the files and the report."""
    from .. import distributed
    cfg = resolve(args)
    distributed.init()
    out, command = start_run_dir(cfg, "pcfg")
    from .report import write_report
    from .run import run
    metrics = run(cfg, progress=cfg.progress)
    if not distributed.is_main():
        return 0
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    for d, row in metrics["summary"]["per_meta_depth"].items():
        print(f"  D_M={d}: loss all-MASK {row['loss_mask']:.4f}, with metadata {row['loss_meta']:.4f}; grammatical "
              "accuracy " + " ".join(f"{k}:{v:.2f}" for k, v in row["grammar"].items()))
    for name, target in metrics["summary"].get("targets", {}).items():
        if "holds_every_seed" in target:
            print(f"  target {name}: {'holds' if target['holds_every_seed'] else 'does NOT hold'} on every seed")
    return 0
