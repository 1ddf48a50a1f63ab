"""Plain-torch linear attention: the token-by-token recurrence (ground truth) and the chunked form (fallback).

Both take the "bhtd" layout (any strides): q, k [B, H, T, D]; v [B, Hv, T, Dv] with H % Hv == 0; an optional
initial state S0 [B, H, D, Dv], z0 [B, H, D]; an optional key_mask [B, T] (True = real token). They return
(o [B, H, T, Dv] in q's dtype, S [B, H, D, Dv], z [B, H, D] or None, den [B, H, T] or None) where S, z and
den are fp32 (fp64 for fp64 inputs). Everything is differentiable by autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation and state, fp64 for fp64 inputs (reference checks, gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(q, k, v, S0, z0, key_mask, normalize):
    B, H, T, D = q.shape
    Hv, Dv = v.shape[1], v.shape[3]
    acc = state_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if Hv != H:  # GQA: query head h reads value head h // (H // Hv)
        v = v.repeat_interleave(H // Hv, dim=1)
    if key_mask is not None:
        k = k * key_mask[:, None, :, None].to(acc)
    S = q.new_zeros(B, H, D, Dv) if S0 is None else S0.to(acc)
    z = None
    if normalize:
        z = q.new_zeros(B, H, D) if z0 is None else z0.to(acc)
    return q, k, v, S, z


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None = None,
                               z0: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = True,
                               normalize: bool = True, eps: float = 1e-6):
    """Token-by-token recurrence ``S_t = S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t / (q_t . z_t + eps)``."""
    out_dtype = q.dtype
    T = q.shape[2]
    q, k, v, S, z = _prepare(q, k, v, S0, z0, key_mask, normalize)
    if not causal:
        S = S + torch.einsum("bhtd,bhte->bhde", k, v)
        if normalize:
            z = z + k.sum(2)
    outs, dens = [], []
    for t in range(T):
        if causal:
            S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
            if normalize:
                z = z + k[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", q[:, :, t], S)
        if normalize:
            den = (q[:, :, t] * z).sum(-1) + eps
            num = num / den[..., None]
            dens.append(den)
        outs.append(num)
    B, H, _, Dv = q.shape[0], q.shape[1], None, v.shape[3]
    o = torch.stack(outs, 2) if T else q.new_zeros(B, H, 0, Dv)
    den = (torch.stack(dens, 2) if T else q.new_zeros(B, H, 0)) if normalize else None
    return o.to(out_dtype), S, z, den


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None = None,
                             z0: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = True,
                             normalize: bool = True, eps: float = 1e-6, chunk_size: int = 64):
    """Chunked form: per chunk ``tril(Q K^T) V + Q S_prev``; the state only ever holds one [B,H,D,Dv] tile.

    The denominator runs as an extra fp32 value column (``z`` next to ``S``); keys are never cumulatively
    summed in the input dtype.
    """
    out_dtype = q.dtype
    T = q.shape[2]
    q, k, v, S, z = _prepare(q, k, v, S0, z0, key_mask, normalize)
    if not causal:
        S = S + torch.einsum("bhtd,bhte->bhde", k, v)
        num = q @ S
        den = None
        if normalize:
            z = z + k.sum(2)
            den = (q @ z[..., None]).squeeze(-1) + eps
            num = num / den[..., None]
        return num.to(out_dtype), S, z, den
    outs, dens = [], []
    for s in range(0, T, chunk_size):
        qc, kc, vc = q[:, :, s:s + chunk_size], k[:, :, s:s + chunk_size], v[:, :, s:s + chunk_size]
        A = (qc @ kc.transpose(-1, -2)).tril()
        num = A @ vc + qc @ S
        S = S + kc.transpose(-1, -2) @ vc
        if normalize:
            den = A.sum(-1) + (qc @ z[..., None]).squeeze(-1) + eps
            z = z + kc.sum(2)
            num = num / den[..., None]
            dens.append(den)
        outs.append(num)
    B, H, Dv = q.shape[0], q.shape[1], v.shape[3]
    o = torch.cat(outs, 2) if T else q.new_zeros(B, H, 0, Dv)
    den = (torch.cat(dens, 2) if T else q.new_zeros(B, H, 0)) if normalize else None
    return o.to(out_dtype), S, z, den


def linear_attention_step_reference(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None,
                                    normalize: bool = True, eps: float = 1e-6):
    """One decode token: q, k [B, H, D]; v [B, Hv, Dv]; returns (o [B, H, Dv], S_new, z_new) out of place."""
    acc = S.dtype
    H, Hv = q.shape[1], v.shape[1]
    vq = v.to(acc).repeat_interleave(H // Hv, dim=1) if Hv != H else v.to(acc)
    qa, ka = q.to(acc), k.to(acc)
    S = S + ka[..., :, None] * vq[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", qa, S)
    if normalize:
        z = z + ka
        o = o / ((qa * z).sum(-1) + eps)[..., None]
    return o.to(q.dtype), S, z


def linear_attention_chunked_backward(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor,
                                      v: Tensor, den: Tensor | None, S0: Tensor | None, z0: Tensor | None,
                                      key_mask: Tensor | None, causal: bool = True, normalize: bool = True,
                                      chunk_size: int = 64):
    """Explicit chunked backward of ``linear_attention_chunked`` (README.md in this folder has the math).

    A forward-order pass gives ``u_t = S_t g_t`` (``g_t = do_t / den_t``), ``c_t = -(q_t . u_t) / den_t``
    (exact: never from the rounded o) and ``dq_t = u_t + c_t z_t``; a reverse pass carries
    ``R = dS + sum_{t>=s} q_t^T g_t`` and ``r = dz + sum_{t>=s} c_t q_t`` for dk and dv.
    Returns (dq, dk, dv [B, Hv, T, Dv], dS0, dz0 or None) in the accumulation dtype.
    """
    T, H, Hv = q.shape[2], q.shape[1], v.shape[1]
    q, k, v, S, z = _prepare(q, k, v, S0, z0, key_mask, normalize)
    g = do.to(q.dtype)
    if normalize:
        g = g / den[..., None]
    R = torch.zeros_like(S) if dS is None else dS.to(q.dtype)
    r = (torch.zeros_like(z) if dz is None else dz.to(q.dtype)) if normalize else None
    if not causal:
        S = S + k.transpose(-1, -2) @ v
        dq = g @ S.transpose(-1, -2)
        R = R + q.transpose(-1, -2) @ g
        dk, dv = v @ R.transpose(-1, -2), k @ R
        if normalize:
            c = -(q * dq).sum(-1) / den
            dq = dq + c[..., None] * (z + k.sum(2))[:, :, None, :]
            r = r + (c[..., None] * q).sum(2)
            dk = dk + r[:, :, None, :]
    else:
        starts = range(0, T, chunk_size)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cs = {}
        for s in starts:
            sl = slice(s, s + chunk_size)
            qc, kc, vc, gc = q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl]
            u = gc @ S.transpose(-1, -2) + (gc @ vc.transpose(-1, -2)).tril() @ kc
            dq[:, :, sl] = u
            if normalize:
                c = cs[s] = -(qc * u).sum(-1) / den[:, :, sl]
                # c_t z_t with z_t = z_prev + sum_{s<=t} k_s in fp32: the prefix of keys is never materialised
                dq[:, :, sl] += c[..., None] * z[:, :, None, :] + (c[..., None] * _tril_ones(qc)) @ kc
                z = z + kc.sum(2)
            S = S + kc.transpose(-1, -2) @ vc
        for s in reversed(starts):
            sl = slice(s, s + chunk_size)
            qc, kc, vc, gc = q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl]
            P = (gc @ vc.transpose(-1, -2)).tril()                  # P[t, s] = g_t . v_s for s <= t
            if normalize:
                P = P + cs[s][..., None] * _tril_ones(qc)
            dk[:, :, sl] = P.transpose(-1, -2) @ qc + vc @ R.transpose(-1, -2)
            if normalize:
                dk[:, :, sl] += r[:, :, None, :]
                r = r + (cs[s][..., None] * qc).sum(2)
            dv[:, :, sl] = (qc @ kc.transpose(-1, -2)).tril().transpose(-1, -2) @ gc + kc @ R
            R = R + qc.transpose(-1, -2) @ gc
    if key_mask is not None:
        dk = dk * key_mask[:, None, :, None].to(dk.dtype)
    if Hv != H:
        dv = dv.unflatten(1, (Hv, H // Hv)).sum(2)
    return dq, dk, dv, R, r


def _tril_ones(x: Tensor) -> Tensor:
    n = x.shape[2]
    return torch.ones(n, n, dtype=x.dtype, device=x.device).tril()


# ---- the "torch" backend: chunked forward, backward by recomputation under autograd -------------------------

def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    return True, ""


def forward(q, k, v, S0, z0, key_mask, causal, normalize, eps):
    o, S, z, den = linear_attention_chunked(q, k, v, S0, z0, key_mask, causal, normalize, eps)
    return _in_layout(o, q), S, z, den


def backward(do, dS, dz, q, k, v, den, S0, z0, key_mask, causal, normalize, eps):
    dq, dk, dv, dS0, dz0 = linear_attention_chunked_backward(do, dS, dz, q, k, v, den, S0, z0, key_mask,
                                                             causal, normalize)
    return _in_layout(dq, q), _in_layout(dk, k), _in_layout(dv, v), dS0, dz0


def step(q, k, v, S, z, normalize, eps):
    o, S_new, z_new = linear_attention_step_reference(q, k, v, S, z, normalize, eps)
    S.copy_(S_new)
    if normalize:
        z.copy_(z_new)
    return o


def _in_layout(x: Tensor, like: Tensor) -> Tensor:
    from .layout import empty_output
    return empty_output(like, x.shape[-1], like.dtype).copy_(x)
