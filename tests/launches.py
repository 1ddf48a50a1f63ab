"""Test helper: record the launches of Triton kernels while they still run."""
from __future__ import annotations


def spy_launches(monkeypatch, module, names) -> dict[str, list[dict]]:
    """Wrap the kernels ``names`` of ``module`` (e.g. fastattn.ops.linear_attn.triton_kernels) so that every launch
    records its keyword (compile-time) arguments: {name: [meta of each launch]}."""
    seen: dict[str, list[dict]] = {name: [] for name in names}
    for name in names:
        class Launcher:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **meta):
                    seen[self.name].append(meta)
                    return self.kernel[grid](*args, **meta)
                return launch
        monkeypatch.setattr(module, name, Launcher(getattr(module, name), name))
    return seen
