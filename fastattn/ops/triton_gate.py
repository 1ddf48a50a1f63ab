"""What every Triton backend shares: the guarded import of its kernels (with the interpreter fixes), the checks
its ``supports()`` starts with (each backend adds its own dtype and size limits), and TMA descriptors."""
from __future__ import annotations

import functools
import importlib
import os
import types

import torch
from torch import Tensor


def triton_gate(x: Tensor, import_error: str | None, min_capability: tuple[int, int] | None = None
                ) -> tuple[bool, str]:
    """(True, "") when triton imported, ``x`` is a CUDA tensor (or TRITON_INTERPRET=1 runs the kernels on the
    CPU) and, for CUDA tensors, the GPU has at least ``min_capability``; else (False, reason)."""
    if import_error is not None:
        return False, f"triton is not importable ({import_error})"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpret:
        return False, f"tensors are on {x.device.type}, not CUDA (and TRITON_INTERPRET is not set)"
    if min_capability and x.is_cuda and not interpret and torch.cuda.get_device_capability(x.device) < min_capability:
        return False, f"needs an sm_{min_capability[0]}{min_capability[1]}+ GPU (bf16 / tf32 tensor-core dots)"
    return True, ""


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor
    except ImportError:   # an older Triton: pointer loads only
        return None


def tma_ready(*ts: Tensor) -> bool:
    """Whether TMA descriptors can take these tensors: Triton has them, the tensors are on an sm_90+ GPU (or run in
    the interpreter), their bases are 16-byte aligned, their last strides 1 and their other strides positive
    multiples of 16 bytes."""
    if _descriptor_class() is None or (ts[0].is_cuda and torch.cuda.get_device_capability(ts[0].device) < (9, 0)):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in ts)


def tma_descriptor(t: Tensor, block: list[int]):
    """A TMA descriptor over all of ``t`` (which ``tma_ready`` accepted) with blocks of shape ``block``; reads past
    its ends give zeros, writes there are dropped."""
    return _descriptor_class()(t, list(t.shape), list(t.stride()), list(block))


def import_kernels(package: str):
    """(triton, <package>.triton_kernels, None), or (None, None, reason) when triton or the kernels cannot be
    imported. Under TRITON_INTERPRET=1 the interpreter fixes below are applied first (idempotent)."""
    try:
        import triton
        if os.environ.get("TRITON_INTERPRET") == "1":
            _interpreter_compat()
        return triton, importlib.import_module(f"{package}.triton_kernels"), None
    except Exception as e:  # noqa: BLE001 - any failure means "not available", with the reason kept
        return None, None, f"{type(e).__name__}: {e}"


def _interpreter_compat() -> None:
    """Bugs of Triton 3.6's interpreter (TRITON_INTERPRET=1: CPU runs and CI) that these kernels hit:
    - loop bounds become ints through ``int(array of shape [1])``, which numpy >= 2.4 rejects: take the element;
    - ``tl.dot`` multiplies bf16 tiles as their raw uint16 storage: widen bf16 operands to fp32 first (exact);
    - fp32 -> bf16 casts truncate: round to nearest even, as the GPU (and torch) does;
    - inline PTX is not supported: the kernels' two fp32 instructions (add.rn.f32 and fma.rn.f32, used where Triton
      must not fold an add into a dot) are evaluated with numpy (the fma through fp64, where x y is exact).
    Compiled kernels are unaffected; the patches are idempotent and touch only the interpreter."""

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor
    if not getattr(original_patch, "_fastattn_fix", False):
        try:
            int(np.zeros(1, dtype=np.int32))
        except TypeError:
            def patch_lang_tensor(tensor, scope):
                original_patch(tensor, scope)
                scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

            patch_lang_tensor._fastattn_fix = True
            interpreter._patch_lang_tensor = patch_lang_tensor

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot
    if not getattr(original_dot, "_fastattn_fix", False):
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype.scalar == tl.bfloat16:
                a = self.cast_impl(a, tl.float32)
            if b.dtype.scalar == tl.bfloat16:
                b = self.cast_impl(b, tl.float32)
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        create_dot._fastattn_fix = True
        builder.create_dot = create_dot

    original_cast = builder.cast_impl
    if not getattr(original_cast, "_fastattn_fix", False):
        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
                rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # finite values
                return interpreter.TensorHandle(rne, tl.bfloat16)
            return original_cast(self, src, dst_type)

        cast_impl._fastattn_fix = True
        builder.cast_impl = cast_impl

    original_asm = builder.create_inline_asm
    if not getattr(original_asm, "_fastattn_fix", False):
        ops = {"add.rn.f32 $0, $1, $2;": lambda x, y: x + y,
               "fma.rn.f32 $0, $1, $2, $3;": lambda x, y, z: (x.astype(np.float64) * y + z).astype(np.float32)}

        def create_inline_asm(self, asm, constraints, values, type, is_pure, pack):
            if asm not in ops or pack != 1:
                return original_asm(self, asm, constraints, values, type, is_pure, pack)
            args = np.broadcast_arrays(*(np.asarray(v.data, dtype=np.float32) for v in values))
            out = interpreter.TensorHandle(np.asarray(ops[asm](*args), dtype=np.float32), tl.float32)
            return types.SimpleNamespace(get_result=lambda i: out)   # the call's results, as the IR op gives them

        create_inline_asm._fastattn_fix = True
        builder.create_inline_asm = create_inline_asm
