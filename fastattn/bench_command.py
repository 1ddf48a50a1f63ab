"""`fastattn bench`: runs bench/linear_attn.py from a source checkout (benchmarks are not installed)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def make_parser(parser):
    parser.add_argument("bench_args", nargs="*", help="arguments passed to bench/linear_attn.py (after --)")
    return parser


def _script() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        path = root / "bench" / "linear_attn.py"
        if path.exists():
            return path
    return None


def main(args) -> int:
    script = _script()
    if script is None:
        print("fastattn bench: bench/linear_attn.py not found; run it from a fastattn source checkout",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
