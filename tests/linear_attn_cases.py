"""Shared input generation and fp64 reference runs for the linear-attention tests (CPU and GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import fastattn
from fastattn import backends
from fastattn.ops.linear_attn.reference import linear_attention_recurrent


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 1
    H: int = 3
    Hv: int = 3
    T: int = 63
    D: int = 9
    Dv: int = 5
    causal: bool = True
    normalize: bool = True
    layout: str = "bhtd"
    mask: bool = False          # left padding of a few tokens in each sequence but the first
    state: bool = False         # an initial state carried in
    hf_view: bool = False       # "bhtd" views of [B, T, H, D] memory (HF's transposed q/k/v)
    heavy: bool = False         # too slow for the Triton interpreter

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("base_state", B=2, state=True),
    Case("gqa_bthd_mask_state", H=3, Hv=1, D=37, Dv=16, layout="bthd", mask=True, state=True),
    Case("unnormalized_gqa_mask", B=2, Hv=1, T=65, D=60, Dv=24, normalize=False, mask=True, state=True),
    Case("noncausal_bthd_mask", B=2, D=9, Dv=7, causal=False, layout="bthd", mask=True),
    Case("noncausal_unnormalized", T=40, D=37, Dv=3, causal=False, normalize=False),
    Case("hf_view_gqa", B=2, Hv=1, T=70, D=96, Dv=16, hf_view=True),
    Case("T1_D96", Hv=1, T=1, D=96, Dv=1, state=True),
    Case("T0", T=0, D=9, Dv=4, state=True),
    Case("D1_unnormalized", T=63, D=1, Dv=8, normalize=False, mask=True),  # normalized D=1: dq is pure cancellation
    Case("D130_gqa", Hv=1, T=100, D=130, Dv=33, state=True),
    Case("D257_Dv1", T=40, D=257, Dv=1),
    # D == Dv == the tile: the Triton kernels compile the dims in (EXACT); T = 150 is three segments in the interpreter
    Case("exact_64_gqa_mask_state", Hv=1, T=150, D=64, Dv=64, mask=True, state=True),
    Case("exact_16_noncausal_bthd", B=2, T=40, D=16, Dv=16, causal=False, layout="bthd"),
    Case("T1000_gqa_mask", Hv=1, T=1000, D=60, Dv=64, mask=True, state=True, heavy=True),
    Case("T1000_bthd_D130", T=1000, D=130, Dv=40, layout="bthd", heavy=True),
]


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Leaf tensors (requires_grad) for one case, in the case's layout, plus output/state cotangents."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hv, T, D, Dv = case.B, case.H, case.Hv, case.T, case.D, case.Dv
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, positive=False):
        x = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
        return x

    pos = case.normalize  # positive random features keep the normalized form well defined
    if case.layout == "bthd" or case.hf_view:
        q, k = rand(B, T, H, D, positive=pos), rand(B, T, H, D, positive=pos)
        v = rand(B, T, Hv, Dv)
    else:
        q, k, v = rand(B, H, T, D, positive=pos), rand(B, H, T, D, positive=pos), rand(B, Hv, T, Dv)
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    inputs = {"q": q, "k": k, "v": v, "state": None, "key_mask": None}
    if case.state:
        S0 = (rand(B, H, D, Dv).abs() if pos else rand(B, H, D, Dv)).to(device, acc).requires_grad_()
        z0 = rand(B, H, D, positive=True).to(device, acc).requires_grad_() if case.normalize else None
        inputs["state"] = (S0, z0)
    if case.mask:
        mask = torch.ones(B, T, dtype=torch.bool)
        for b in range(1, B + 1):
            mask[b - 1, : min(T - 1, 3 * b)] = False
        inputs["key_mask"] = mask.to(device)
    cot = {"do": rand(B, H, T, Dv).to(device), "dS": rand(B, H, D, Dv).to(device, acc),
           "dz": rand(B, H, D).to(device, acc) if case.normalize else None}
    return inputs, cot


def leaves(inputs) -> list[torch.Tensor]:
    out = [inputs["q"], inputs["k"], inputs["v"]]
    if inputs["state"] is not None:
        out += [t for t in inputs["state"] if t is not None]
    return out


def _loss(o_bhtd, S, z, cot):
    loss = (o_bhtd.double() * cot["do"].double()).sum()
    if cot["dS"] is not None and S is not None:
        loss = loss + (S.double() * cot["dS"].double()).sum()
    if cot["dz"] is not None and z is not None:
        loss = loss + (z.double() * cot["dz"].double()).sum()
    return loss


def _bhtd(case: Case, t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2) if (case.layout == "bthd" or case.hf_view) else t


def run_fastattn(case: Case, inputs, cot, backend: str):
    """fastattn.linear_attention through the public API; returns {name: tensor} of outputs and gradients."""
    layout = case.layout
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if case.hf_view:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o, state = fastattn.linear_attention(q, k, v, causal=case.causal, normalize=case.normalize,
                                         state=inputs["state"], return_state=True, key_mask=inputs["key_mask"],
                                         layout=layout, backend=backend)
    S, z = state
    o_bhtd = o.transpose(1, 2) if layout == "bthd" else o
    return _collect(o_bhtd, S, z, inputs, cot)


def run_reference(case: Case, inputs, cot, to64: bool = True, chunked: bool = False):
    """The token-by-token recurrence (or the chunked fallback) on fp64 copies of the inputs."""
    from fastattn.ops.linear_attn.reference import linear_attention_chunked
    fn = linear_attention_chunked if chunked else linear_attention_recurrent
    cast = (lambda t: t.detach().double().requires_grad_()) if to64 else (lambda t: t.detach().requires_grad_())
    ins = {key: (cast(t) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t)
           for key, t in inputs.items() if key != "state"}
    ins["state"] = None
    if inputs["state"] is not None:
        ins["state"] = tuple(None if t is None else cast(t) for t in inputs["state"])
    S0, z0 = ins["state"] if ins["state"] is not None else (None, None)
    o, S, z, _ = fn(_bhtd(case, ins["q"]), _bhtd(case, ins["k"]), _bhtd(case, ins["v"]), S0, z0,
                    ins["key_mask"], case.causal, case.normalize, 1e-6)
    return _collect(o, S, z, ins, cot)


def _collect(o_bhtd, S, z, inputs, cot):
    out = {"o": o_bhtd, "S": S}
    if z is not None:
        out["z"] = z
    names = ["dq", "dk", "dv"] + (["dS0", "dz0"][: len(leaves(inputs)) - 3])
    ls = leaves(inputs)
    if o_bhtd.numel() or inputs["state"] is not None:
        grads = torch.autograd.grad(_loss(o_bhtd, S, z, cot), ls, allow_unused=True)
        for n, g, x in zip(names, grads, ls):
            out[n] = torch.zeros_like(x) if g is None else g
    return {key: t.detach() for key, t in out.items()}


def cpu_backends() -> list[str]:
    """Backends testable on CPU here: torch always, cpu if built, triton under the interpreter."""
    names = ["torch"]
    if backends.availability("cpu")[0]:
        names.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and backends.availability("triton")[0] \
            and backends.has_backend("linear_attn", "triton"):
        names.append("triton")
    return names

