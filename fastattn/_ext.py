"""Loader of the compiled extension ``fastattn._C``.

Nothing is imported until the first call of ``load()`` (or ``available()``, ``load_error()``, ``has_kernel()``);
the import is attempted once and its failure kept, so ``fastattn env`` can say why the extension is missing.
Loading registers the ``torch.ops.fastattn.*`` operators; it initialises no CUDA.
"""
from __future__ import annotations

import functools
import importlib
import threading
from types import ModuleType

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """Import ``fastattn._C`` once; returns the module, or None when it cannot be imported."""
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                import torch  # noqa: F401  (the extension links against torch's libraries)
                _module = importlib.import_module("fastattn._C")
            except Exception as e:  # ImportError, OSError (undefined symbols, ABI mismatch), ...
                _error = f"{type(e).__name__}: {e}"
            _tried = True
    return _module


def available() -> bool:
    """Whether ``fastattn._C`` is importable (its operators are then registered)."""
    return load() is not None


def load_error() -> str | None:
    """Why ``fastattn._C`` could not be imported, or None when it loaded."""
    load()
    return _error


@functools.lru_cache(maxsize=None)
def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel of ``op_name`` ("linear_attn_fwd" or "fastattn::linear_attn_fwd")
    for ``dispatch_key`` ("CPU", "CUDA")."""
    if not available():
        return False
    import torch
    name = op_name if "::" in op_name else f"fastattn::{op_name}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key))
    except RuntimeError:  # unknown operator name
        return False
