"""`fastattn distill`: preset < --config file.yaml < command-line flags; writes the run directory."""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from .config import PRESETS, DistillConfig, make_config


def _flag_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        inner = int if field.name in ("seeds", "softmax_layers", "throughput_lengths") else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x != "")
    return type(default)


def make_parser(parser):
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="quick: 10-20 min on a 2-core CPU; full: one GPU; tiny: smoke test")
    parser.add_argument("--config", default=None, help="YAML file of config keys (below command-line flags)")
    for field in dataclasses.fields(DistillConfig):
        if field.name == "preset":
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            type=_flag_type(field), help=f"(default from the preset: {field.default!r})")
    return parser


def resolve(args) -> DistillConfig:
    overrides = {}
    if args.config:
        import yaml
        overrides.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for field in dataclasses.fields(DistillConfig):
        value = getattr(args, field.name, None)
        if field.name != "preset" and value is not None:
            overrides[field.name] = value
    return make_config(overrides.pop("preset", args.preset), **overrides)


def main(args) -> int:
    cfg = resolve(args)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "fastattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "fastattn distill"
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (out / "command.txt").write_text(command + "\n")
    from .report import write_report
    from .run import run
    metrics = run(cfg)
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    for rule, row in metrics["summary"].items():
        print(f"  {rule:>9}: held-out loss {row['loss_mean']:.4f} +- {row['loss_std']:.4f} "
              f"(gap {row['gap']:+.4f}), mean KL {row['kl_mean']:.4f}")
    return 0
