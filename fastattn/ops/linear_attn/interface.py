"""Public linear attention: input checks, layouts, the registered torch ops and their autograd.

The torch.library ops ``fastattn::linear_attention_fwd``/``_bwd``/``_step`` pick a backend at run time
(``backends.resolve``), so ``torch.compile(fullgraph=True)`` sees three opaque ops with fake implementations.
The backward runs on the backend the forward used (resolved again from the same arguments, stored on ctx).
Eager calls that autograd does not record (inference, decode steps) run the same functions without the op
dispatch (``_eager``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from .layout import empty_output
from .reference import linear_attention_step_reference, state_dtype

OP = "linear_attn"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EMPTY = (0,)


def _fresh(t: Tensor | None, *inputs: Tensor | None) -> Tensor | None:
    """Custom ops may not return their inputs: copy a result that aliases one (e.g. S0 when T = 0)."""
    if t is None:
        return None
    if any(x is not None and x.numel() and t.data_ptr() == x.data_ptr() for x in inputs):
        return t.clone()
    return t


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty(_EMPTY, dtype=dtype)


# ---- registered ops --------------------------------------------------------------------------------------

def _fwd(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None,
         causal: bool, normalize: bool, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.get(OP, backends.resolve(OP, backend, q, k, v))
    o, S, z, den = impl.forward(q, k, v, S0, z0, key_mask, causal, normalize, eps)
    acc = state_dtype(q.dtype)
    z = _empty(q, acc) if z is None else _fresh(z, z0)
    den = _empty(q, acc) if den is None else den
    return o, _fresh(S, S0), z, den


_fwd_op = torch.library.custom_op("fastattn::linear_attention_fwd", mutates_args=())(_fwd)


@_fwd_op.register_fake
def _(q, k, v, S0, z0, key_mask, causal, normalize, eps, backend):
    B, H, T, D = q.shape
    acc = state_dtype(q.dtype)
    o = empty_output(q, v.shape[-1])
    S = q.new_empty(B, H, D, v.shape[-1], dtype=acc)
    z = q.new_empty(B, H, D, dtype=acc) if normalize else _empty(q, acc)
    den = q.new_empty(B, H, T, dtype=acc) if normalize else _empty(q, acc)
    return o, S, z, den


@torch.library.custom_op("fastattn::linear_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
            den: Tensor | None, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None, causal: bool,
            normalize: bool, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = backends.get(OP, backend)
    dq, dk, dv, dS0, dz0 = impl.backward(do, dS, dz, q, k, v, den, S0, z0, key_mask, causal, normalize, eps)
    acc = state_dtype(q.dtype)
    return dq, dk, dv, _fresh(dS0, dS), (_empty(q, acc) if dz0 is None else _fresh(dz0, dz))


@_bwd_op.register_fake
def _(do, dS, dz, q, k, v, den, S0, z0, key_mask, causal, normalize, eps, backend):
    B, H, _, D = q.shape
    acc = state_dtype(q.dtype)
    dS0 = q.new_empty(B, H, D, v.shape[-1], dtype=acc)
    dz0 = q.new_empty(B, H, D, dtype=acc) if normalize else _empty(q, acc)
    return empty_output(q, D), empty_output(k, D), empty_output(v, v.shape[-1]), dS0, dz0


def _setup_context(ctx, inputs, output):
    q, k, v, S0, z0, key_mask, causal, normalize, eps, backend = inputs
    ctx.save_for_backward(q, k, v, S0, z0, key_mask, output[3])
    ctx.flags = (causal, normalize, eps)
    ctx.backend = backends.resolve(OP, backend, q, k, v)


def _backward(ctx, do, dS, dz, _dden):
    q, k, v, S0, z0, key_mask, den = ctx.saved_tensors
    causal, normalize, eps = ctx.flags
    if do is None:
        do = torch.zeros_like(empty_output(q, v.shape[-1]))
    dz = dz if normalize else None
    dq, dk, dv, dS0, dz0 = _bwd_op(do, dS, dz, q, k, v, den if normalize else None, S0, z0, key_mask,
                                    causal, normalize, eps, ctx.backend)
    return (dq, dk, dv, dS0 if S0 is not None else None, dz0 if z0 is not None else None,
            None, None, None, None, None)


torch.library.register_autograd("fastattn::linear_attention_fwd", _backward, setup_context=_setup_context)


def _step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None, normalize: bool, eps: float,
          backend: str) -> Tensor:
    impl = backends.get(OP, backends.resolve(OP, backend, q[:, :, None], k[:, :, None], v[:, :, None]))
    return impl.step(q, k, v, S, z, normalize, eps)


_step_op = torch.library.custom_op("fastattn::linear_attention_step", mutates_args=("S", "z"))(_step)


@_step_op.register_fake
def _(q, k, v, S, z, normalize, eps, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def _eager(op, fn, *tensors):
    """The registered op where torch.compile traces or autograd records the call, else its plain function: the
    same code without the custom-op dispatch (~0.1 ms of host time a call, which bounds small decode and
    prefill calls on a GPU)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and
                                         any(t is not None and t.requires_grad for t in tensors)):
        return op
    return fn


# ---- input checks ----------------------------------------------------------------------------------------

def _check_tensor(name: str, t, rank: int, shape_doc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {shape_doc}, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, key_mask, state, causal, normalize, eps, qkv_doc):
    """Shared checks of linear_attention (rank 4) and linear_attention_step (rank 3) after the layout change."""
    if q.dtype not in _FLOAT:
        raise TypeError(f"q must be a floating tensor (fp16, bf16, fp32, fp64), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("key_mask", key_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if k.shape != q.shape:
        what = "feature dim D" if k.shape[:-1] == q.shape[:-1] else "shape"
        raise ValueError(f"k must have q's {what}: q {qkv_doc[0]} = {tuple(q.shape)}, k = {tuple(k.shape)}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    Hv, Dv = v.shape[1], v.shape[-1]
    if v.shape[0] != B or v.shape[2:-1] != q.shape[2:-1]:
        raise ValueError(f"v must be {qkv_doc[1]} with q's batch and length: q = {tuple(q.shape)}, "
                         f"v = {tuple(v.shape)}")
    if min(B, H, D, Hv, Dv) == 0:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, v {tuple(v.shape)} (only T may be 0)")
    if H % Hv:
        raise ValueError(f"the number of query heads H={H} must be divisible by the value heads Hv={Hv}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if key_mask is not None:
        T = q.shape[2]
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, T):
            got = tuple(key_mask.shape) if isinstance(key_mask, Tensor) else type(key_mask).__name__
            raise ValueError(f"key_mask must be a bool tensor [B, T] = {(B, T)}, got {got}")
    if state is None:
        return None, None
    if not causal:
        raise ValueError("state is only defined for causal=True (non-causal attention has no carried state)")
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("state must be a tuple (S [B, H, D, Dv], z [B, H, D] or None)")
    S, z = state
    acc = state_dtype(q.dtype)
    checks = [("state S", S, (B, H, D, Dv))] + ([("state z", z, (B, H, D))] if normalize else [])
    for name, t, shape in checks:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(t).__name__}"
                            + (" (normalize=True needs z)" if name == "state z" else ""))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != acc:
            raise TypeError(f"{name} must be {acc} (the fp32 state; fp64 for fp64 inputs), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return S, (z if normalize else None)


# ---- public functions ------------------------------------------------------------------------------------

def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, normalize: bool = True,
                     eps: float = 1e-6, state: tuple[Tensor, Tensor | None] | None = None,
                     return_state: bool = False, key_mask: Tensor | None = None, layout: str = "bhtd",
                     backend: str = "auto") -> tuple[Tensor, tuple[Tensor, Tensor | None] | None]:
    """Linear attention on feature-mapped queries and keys.

    Args:
        q, k: [B, H, T, D] feature-mapped queries/keys ([B, T, H, D] with layout="bthd"); D is any per-layer
            feature dim. Non-negative features keep the normalized form well defined.
        v: [B, Hv, T, Dv] values ([B, T, Hv, Dv] for "bthd"), H % Hv == 0; head h reads value head
            h // (H // Hv) (GQA without materialising repeats).
        causal: causal (``S_t = S_{t-1} + k_t^T v_t``) or non-causal (all unmasked keys) attention.
        normalize: divide by ``q_t . z_t + eps`` (fp32 denominator, fused).
        state: (S [B, H, D, Dv], z [B, H, D]) fp32 (fp64 for fp64 inputs) carried in before the first token;
            causal only; z may be None when normalize=False. Differentiable.
        return_state: also return the final (S, z) (z is None when normalize=False).
        key_mask: [B, T] bool, True = real token; masked keys contribute nothing.
        layout: "bhtd" (HF) or "bthd" (fla); handled through strides, no copies.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (see ``fastattn.backend_info()``).

    Returns:
        (o, state): o [B, H, T, Dv] (or [B, T, H, Dv]) in q's dtype; state (S, z) if return_state else None.
    """
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    doc = ("[B, H, T, D]", "[B, Hv, T, Dv]") if layout == "bhtd" else ("[B, T, H, D]", "[B, T, Hv, Dv]")
    for name, t, d in (("q", q, doc[0]), ("k", k, doc[0]), ("v", v, doc[1])):
        _check_tensor(name, t, 4, d)
    if layout == "bthd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    S0, z0 = _check_inputs(q, k, v, key_mask, state, causal, normalize, eps, doc)
    o, S, z, _ = _eager(_fwd_op, _fwd, q, k, v, S0, z0)(q, k, v, S0, z0, key_mask, bool(causal), bool(normalize),
                                                        float(eps), backends.requested(backend))
    if layout == "bthd":
        o = o.transpose(1, 2)
    return o, ((S, z if normalize else None) if return_state else None)


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor | None] | None,
                          normalize: bool = True, eps: float = 1e-6, backend: str = "auto"
                          ) -> tuple[Tensor, tuple[Tensor, Tensor | None]]:
    """One decode token per sequence.

    Args:
        q, k: [B, H, D]; v: [B, Hv, Dv] with H % Hv == 0.
        state: (S [B, H, D, Dv], z [B, H, D]) fp32 (z None when normalize=False), or None for an empty state.
            Updated in place (out of place, and differentiable, when autograd needs gradients).

    Returns:
        (o [B, H, Dv] in q's dtype, (S, z)).
    """
    for name, t, d in (("q", q, "[B, H, D]"), ("k", k, "[B, H, D]"), ("v", v, "[B, Hv, Dv]")):
        _check_tensor(name, t, 3, d)
    if state is None:
        acc = state_dtype(q.dtype) if q.dtype in _FLOAT else torch.float32
        B, H, D = q.shape
        state = (q.new_zeros(B, H, D, v.shape[-1], dtype=acc), q.new_zeros(B, H, D, dtype=acc))
    S, z = _check_inputs(q, k, v, None, state, True, normalize, eps, ("[B, H, D]", "[B, Hv, Dv]"))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, S, z))
    if needs_grad:
        o, S, z = linear_attention_step_reference(q, k, v, S, z, normalize, eps)
        return o, (S, z)
    o = _eager(_step_op, _step)(q, k, v, S, z, bool(normalize), float(eps), backends.requested(backend))
    return o, (S, z)
