"""`fastattn env`: versions, devices, and for each backend whether it is built and importable (and why not)."""
from __future__ import annotations

import importlib.util
import platform


def make_parser(parser):
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def report() -> dict:
    import torch

    from .backends import backend_info
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for pkg in ("triton", "transformers", "fla"):
        spec = importlib.util.find_spec(pkg)
        info[pkg] = "installed" if spec is not None else "not installed"
    if info["cuda_available"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    info["backends"] = backend_info()
    return info


def main(args) -> int:
    info = report()
    if getattr(args, "json", False):
        import json
        print(json.dumps(info, indent=1))
        return 0
    for key, val in info.items():
        if key != "backends":
            print(f"{key:>16}: {val}")
    print("\nbackend   available  reason / description")
    for name, b in info["backends"].items():
        if name.startswith("_"):
            continue
        print(f"{name:<9} {str(b['available']):<10} {b['reason'] or b['description']}")
    ext = info["backends"]["_extension"]
    print(f"\nextension fastattn._C: {'loaded' if ext['loaded'] else 'not loaded: ' + str(ext['error'])}")
    return 0
