"""The one backend registry: name -> availability, and per-call dispatch for every op.

Backends: "torch" (plain-torch reference, any device), "cpu" (C++ extension), "triton", "cuda" (C++/CUDA
extension). Each op lives in ``fastattn/ops/<op>/`` with one module per backend exposing the op's functions
and ``supports(*tensors) -> (ok, reason)``, the per-call verifier.

"auto" (or the env var FASTATTN_BACKEND) picks, for CUDA tensors, cuda -> triton -> torch and, for CPU
tensors, cpu -> torch, unless the op's package defines ``auto_order(*tensors)`` with a measured preference
(linear_attn: triton first for sequences, cuda first for decode steps; subspace_hvp: triton, torch, then
cuda); a rejection is logged once with its reason. An explicitly requested backend that cannot serve a call raises (never a silent fallback).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("fastattn")


def _extension() -> tuple[bool, str]:
    from . import _ext
    return (True, "") if _ext.available() else (False, f"extension fastattn._C not built: {_ext.load_error()}")


def _extension_kernel(dispatch_key: str) -> tuple[bool, str]:
    ok, why = _extension()
    if not ok:
        return ok, why
    from . import _ext
    if _ext.has_kernel("fastattn::linear_attn_fwd", dispatch_key):
        return True, ""
    return False, f"fastattn._C was built without {dispatch_key} kernels"


def _triton() -> tuple[bool, str]:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as e:
        return False, f"triton cannot be imported: {e}"
    return (True, "") if found else (False, "triton is not installed (pip install 'fastattn[triton]')")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                                    # module name inside fastattn/ops/<op>/
    available: Callable[[], tuple[bool, str]]      # build/import-time availability, independent of the call
    description: str


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "reference", lambda: (True, ""), "plain torch (chunked), any device; fp64 reference"),
    Backend("cpu", "cpu", lambda: _extension_kernel("CPU"), "C++ extension, CPU tensors"),
    Backend("triton", "triton", _triton, "Triton kernels, CUDA tensors (or TRITON_INTERPRET=1 on CPU)"),
    Backend("cuda", "cuda", lambda: _extension_kernel("CUDA"), "C++/CUDA extension, CUDA tensors"),
)}

AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@functools.lru_cache(maxsize=None)
def availability(name: str) -> tuple[bool, str]:
    return BACKENDS[name].available()


@functools.lru_cache(maxsize=None)
def _module(op: str, name: str):
    return importlib.import_module(f"fastattn.ops.{op}.{BACKENDS[name].module}")


def has_backend(op: str, name: str) -> bool:
    return importlib.util.find_spec(f"fastattn.ops.{op}.{BACKENDS[name].module}") is not None


def requested(backend: str) -> str:
    """The backend asked for: the argument, or FASTATTN_BACKEND when the argument is "auto"."""
    if backend == "auto":
        backend = os.environ.get("FASTATTN_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


_logged: set[tuple[str, str, str]] = set()


def _check(op: str, name: str, tensors) -> tuple[bool, str]:
    if not has_backend(op, name):
        return False, f"op {op} has no {name} backend"
    ok, why = availability(name)
    if not ok:
        return ok, why
    return _module(op, name).supports(*tensors)


@functools.lru_cache(maxsize=None)
def _op_preference(op: str):
    return getattr(importlib.import_module(f"fastattn.ops.{op}"), "auto_order", None)


def _auto_order(op: str, tensors) -> tuple[str, ...]:
    """The backends "auto" tries, in order: the op package's ``auto_order(*tensors)`` where it defines a measured
    preference for the call, else AUTO_ORDER of the tensors' device type."""
    prefer = _op_preference(op)
    return (prefer is not None and prefer(*tensors)) or AUTO_ORDER.get(tensors[0].device.type, ("torch",))


def resolve(op: str, backend: str, *tensors) -> str:
    """The backend name that serves this call of ``op`` on ``tensors`` (the op's verifier arguments)."""
    backend = requested(backend)
    if backend != "auto":
        ok, why = _check(op, backend, tensors)
        if not ok:
            raise RuntimeError(f"fastattn: backend {backend!r} cannot run {op} here: {why}")
        return backend
    for name in _auto_order(op, tensors):
        ok, why = _check(op, name, tensors)
        if ok:
            return name
        if (op, name, why) not in _logged:
            _logged.add((op, name, why))
            log.info("fastattn: %s backend %r rejected: %s", op, name, why)
    raise RuntimeError(f"fastattn: no backend can run {op} on {tensors[0].device}")  # torch never refuses


def get(op: str, name: str):
    """The backend module of ``op`` named ``name`` (already resolved)."""
    return _module(op, name)


def backend_info() -> dict[str, dict]:
    """What is built and importable, and why not: {name: {"available": bool, "reason": str, ...}}."""
    from . import _ext
    info = {}
    for name, b in BACKENDS.items():
        ok, why = availability(name)
        info[name] = {"available": ok, "reason": why, "description": b.description}
    info["_extension"] = {"loaded": _ext.available(), "error": _ext.load_error()}
    return info
