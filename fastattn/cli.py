"""`fastattn <command>`: one console script over a registry of subcommands.

Each entry names a module with ``make_parser(parser)`` and ``main(args)``; heavy imports happen inside main.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("fastattn.distill.cli", "distill a pre-trained model's softmax attention into linear attention"),
    "env": ("fastattn.env_report", "show what is built and importable, and why not"),
    "ddro": ("fastattn.ddro.cli", "DDRO/RDRO experiments: consistency (synthetic), verifier (SmolLM2)"),
    "rshtr": ("fastattn.rshtr.cli", "random-subspace homogenized trust region: problems x methods, report and plots"),
    "bench": ("fastattn.bench_command", "run the linear-attention microbenchmark (bench/linear_attn.py)"),
    "pcfg": ("fastattn.pcfg.cli", "metadata conditioning on leveled PCFG data: train, exact Bayes references, figures"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).make_parser(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
