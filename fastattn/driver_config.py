"""What every driver's config and CLI share: presets merged under overrides, one flag per dataclass field, and
preset < ``--config file.yaml`` < command-line flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path


def from_preset(cls, presets: dict[str, dict], preset: str, **overrides):
    """``cls(**presets[preset], **overrides, preset=preset)`` with unknown presets and keys rejected."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return cls(**{**presets[preset], **overrides, "preset": preset})


def _flag_type(field: dataclasses.Field, int_tuples: tuple[str, ...]):
    default = field.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        inner = int if field.name in int_tuples else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x != "")
    return type(default)


def add_flags(parser, cls, presets: dict[str, dict], default_preset: str, preset_help: str,
              int_tuples: tuple[str, ...] = ()):
    """``--preset``, ``--config`` and one ``--field-name`` per dataclass field (tuples: comma-separated)."""
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets), help=preset_help)
    parser.add_argument("--config", default=None, help="YAML file of config keys (below command-line flags)")
    for field in dataclasses.fields(cls):
        if field.name == "preset":
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            type=_flag_type(field, int_tuples), help=f"(default from the preset: {field.default!r})")
    return parser


def resolve(args, cls, make_config):
    """The config of parsed ``args``: preset, then the YAML file, then the flags given."""
    overrides = {}
    if args.config:
        import yaml
        overrides.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if field.name != "preset" and value is not None:
            overrides[field.name] = value
    return make_config(overrides.pop("preset", args.preset), **overrides)


def start_run_dir(cfg, driver: str) -> tuple[Path, str]:
    """The run directory ``cfg.out`` and the command line that made it; rank 0 (the only process without
    torchrun) creates the directory and writes the resolved config (config.json) and the command (command.txt)."""
    import json
    import shlex
    import sys

    from . import distributed
    out = Path(cfg.out)
    argv = sys.argv[1:]
    command = "fastattn " + " ".join(shlex.quote(a) for a in argv) if argv else f"fastattn {driver}"
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        (out / "command.txt").write_text(command + "\n")
    return out, command
