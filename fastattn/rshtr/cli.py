"""`fastattn rshtr`: preset < --config file.yaml < command-line flags; runs the comparison and writes the run
directory (config.json, command.txt, metrics.json, report.md, one PNG per problem)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..driver_config import add_flags
from ..driver_config import resolve as resolve_config
from .config import PRESETS, ExperimentConfig, make_config


def make_parser(parser):
    return add_flags(parser, ExperimentConfig, PRESETS, "cpu", "smoke: seconds; cpu, cpu_more: the committed "
                     "2-core runs; gpu: one GPU", int_tuples=("subspace_dims", "seeds"))


def resolve(args) -> ExperimentConfig:
    return resolve_config(args, ExperimentConfig, make_config)


def _machine(cfg: ExperimentConfig) -> dict:
    import platform
    import subprocess

    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else (platform.processor() or "cpu")
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit,
            "python": platform.python_version()}


def _command(args) -> str:
    """The command line that reproduces this run (from the parsed flags, not sys.argv)."""
    parts = ["fastattn", "rshtr"]
    for key, value in vars(args).items():
        if key == "command" or value is None:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def main(args) -> int:
    cfg = resolve(args)
    import torch

    from .harness import run_all
    from .report import write_report
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = _command(args)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (out / "command.txt").write_text(command + "\n")
    results = run_all(cfg, log=lambda line: print(line, flush=True))
    write_report(results, out, cfg.to_dict(), command, _machine(cfg))
    print(f"report: {out / 'report.md'}")
    return 0
