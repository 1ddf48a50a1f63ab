"""API contract of linear_attention: input errors, dispatch, torch.library registration, import hygiene."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import backends

from .linear_attn_cases import cpu_backends

B, H, T, D, Dv = 2, 3, 7, 5, 4


def _qkv(dtype=torch.float32):
    return torch.rand(B, H, T, D, dtype=dtype), torch.rand(B, H, T, D, dtype=dtype), torch.randn(B, 1, T, Dv,
                                                                                                   dtype=dtype)


def _state():
    return torch.zeros(B, H, D, Dv), torch.zeros(B, H, D)


BAD = [
    ("q rank", lambda q, k, v: dict(q=q[0]), ValueError, r"q must be 4-D \[B, H, T, D\]"),
    ("q type", lambda q, k, v: dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"),
    ("feature dims differ", lambda q, k, v: dict(k=k[..., :3]), ValueError, "k must have q's feature dim D"),
    ("k shape", lambda q, k, v: dict(k=k[:, :2]), ValueError, "k must have q's shape"),
    ("H % Hv", lambda q, k, v: dict(v=torch.randn(B, 2, T, Dv)), ValueError, "divisible by the value heads Hv=2"),
    ("T mismatch", lambda q, k, v: dict(v=v[:, :, :5]), ValueError, "v must be .* batch and length"),
    ("integer dtype", lambda q, k, v: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "floating"),
    ("mixed dtype", lambda q, k, v: dict(v=v.double()), TypeError, "v must have q's dtype"),
    ("empty D", lambda q, k, v: dict(q=q[..., :0], k=k[..., :0]), ValueError, "empty dimension"),
    ("empty H", lambda q, k, v: dict(q=q[:, :0], k=k[:, :0], v=v[:, :0]), ValueError, "empty dimension"),
    ("state shape", lambda q, k, v: dict(state=(torch.zeros(B, H, D, Dv + 1), torch.zeros(B, H, D))), ValueError,
     r"state S must have shape \(2, 3, 5, 4\)"),
    ("state dtype", lambda q, k, v: dict(state=(torch.zeros(B, H, D, Dv, dtype=torch.bfloat16),
                                                torch.zeros(B, H, D))), TypeError, "state S must be torch.float32"),
    ("state z missing", lambda q, k, v: dict(state=(torch.zeros(B, H, D, Dv), None)), TypeError, "needs z"),
    ("state not tuple", lambda q, k, v: dict(state=torch.zeros(B, H, D, Dv)), TypeError, "state must be a tuple"),
    ("non-causal state", lambda q, k, v: dict(state=_state(), causal=False), ValueError, "only defined for causal"),
    ("mask dtype", lambda q, k, v: dict(key_mask=torch.ones(B, T)), ValueError, r"key_mask must be a bool"),
    ("mask shape", lambda q, k, v: dict(key_mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError,
     r"key_mask must be a bool tensor \[B, T\]"),
    ("layout", lambda q, k, v: dict(layout="bdht"), ValueError, "layout must be"),
    ("backend name", lambda q, k, v: dict(backend="mps"), ValueError, "backend must be 'auto' or one of"),
    ("eps", lambda q, k, v: dict(eps=-1.0), ValueError, "eps must be"),
]


@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_any_kernel(name, change, exc, match):
    q, k, v = _qkv()
    kw = dict(q=q, k=k, v=v)
    kw.update(change(q, k, v))
    with pytest.raises(exc, match=match):
        fastattn.linear_attention(**kw)


def test_mixed_devices_raise_meta():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="all inputs must share a device"):
        fastattn.linear_attention(q, k.to("meta"), v)


def test_step_bad_input():
    q = torch.rand(B, H, D)
    with pytest.raises(ValueError, match=r"q must be 3-D \[B, H, D\]"):
        fastattn.linear_attention_step(q[None], q, torch.rand(B, H, Dv), None)
    with pytest.raises(ValueError, match=r"state S must have shape"):
        fastattn.linear_attention_step(q, q, torch.rand(B, H, Dv), (torch.zeros(B, H, D, 1), torch.zeros(B, H, D)))


def test_explicit_backend_that_cannot_serve_raises():
    q, k, v = _qkv()
    unavailable = [n for n in backends.BACKENDS if not backends.availability(n)[0]]
    unavailable += ["cuda"] if "cuda" not in unavailable else []
    for name in set(unavailable):
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run linear_attn"):
            fastattn.linear_attention(q, k, v, backend=name)


def test_env_var_selects_backend(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")  # CPU tensors: an explicit cuda request must fail loudly
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        fastattn.linear_attention(q, k, v)
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    fastattn.linear_attention(q, k, v)


def test_auto_prefers_cpu_extension_when_built():
    q, k, v = _qkv()
    expected = "cpu" if backends.availability("cpu")[0] else "torch"
    assert backends.resolve("linear_attn", "auto", q, k, v) == expected


def test_auto_order_is_the_measured_preference():
    """CUDA sequences: triton before cuda (3-12x faster chunk kernels on the H200); decode steps (T = 1): cuda
    first; other devices: the registry's default order. Checked on stand-ins, so it runs without a GPU."""
    from types import SimpleNamespace

    from fastattn.ops.linear_attn import auto_order

    def fake(device, T):
        return SimpleNamespace(device=torch.device(device), shape=(1, 2, T, 4))

    assert auto_order(fake("cuda", 100), None, None) == ("triton", "cuda", "torch")
    assert auto_order(fake("cuda", 1), None, None) == ("cuda", "triton", "torch")
    assert auto_order(fake("cpu", 100), None, None) is None
    assert backends._auto_order("linear_attn", (fake("cpu", 5),) * 3) == backends.AUTO_ORDER["cpu"]
    assert backends._auto_order("linear_attn", (fake("cuda", 5),) * 3)[0] == "triton"


def test_backend_info_reports_every_backend():
    info = fastattn.backend_info()
    assert set(backends.BACKENDS) <= set(info)
    for name in backends.BACKENDS:
        assert isinstance(info[name]["available"], bool)
        assert info[name]["available"] or info[name]["reason"]


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_torch_compile_fullgraph(backend):
    def f(q, k, v):
        o, (S, z) = fastattn.linear_attention(q, k, v, return_state=True, backend=backend)
        return (o * 2).sum() + S.sum() + z.sum()

    q, k, v = (t.requires_grad_() for t in _qkv())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    ref = f(q, k, v)
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got, (q, k, v))
    g2 = torch.autograd.grad(ref, (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_opcheck(backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    S0, z0 = (t.requires_grad_() for t in _state())
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    ops = torch.ops.fastattn
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # a "bthd" memory view
    for args in [(q, k, v, S0, z0, mask, True, True, 1e-6, backend),
                 (qt, k, v, None, None, None, True, False, 1e-6, backend),
                 (q, k, v, None, None, mask, False, True, 1e-6, backend)]:
        torch.library.opcheck(ops.linear_attention_fwd.default, args)
    o, S, z, den = ops.linear_attention_fwd(q, k, v, S0, z0, mask, True, True, 1e-6, backend)
    torch.library.opcheck(ops.linear_attention_bwd.default,
                          (torch.randn_like(o), torch.randn_like(S), torch.randn_like(z), q.detach(), k.detach(),
                           v.detach(), den.detach(), S0.detach(), z0.detach(), mask, True, True, 1e-6, backend))
    Sd, zd = (t.detach().clone() for t in _state())
    torch.library.opcheck(ops.linear_attention_step.default,
                          (q.detach()[:, :, 0], k.detach()[:, :, 0], v.detach()[:, :, 0], Sd, zd, True, 1e-6,
                           backend))


def test_import_initialises_no_cuda_and_needs_neither_triton_nor_extension():
    code = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton.") or name == "fastattn._C":
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import torch
import fastattn
assert not torch.cuda.is_initialized(), "import fastattn initialised CUDA"
assert "triton" not in sys.modules and "transformers" not in sys.modules
q = torch.rand(1, 2, 9, 3, dtype=torch.float64)
o, _ = fastattn.linear_attention(q, q, q)
info = fastattn.backend_info()
assert info["torch"]["available"] and not info["cpu"]["available"], info
print("ok", info["cpu"]["reason"])
"""
    env = {**os.environ, "FASTATTN_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
