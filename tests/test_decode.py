"""fastattn.hf.greedy_decode: fixed-shape greedy steps (a CUDA graph replay per token on a GPU) against
model.generate."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn import hf  # noqa: E402

from .test_hf import tiny_llama  # noqa: E402


def generate(model, ids, n, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("softmax_layers,window", [((), 0), ((1,), 0), ((), 3)], ids=["linear", "hybrid", "window"])
def test_greedy_decode_equals_generate_with_left_padding(softmax_layers, window):
    model = tiny_llama()
    hf.linearize(model, [5, 9, 13], softmax_layers=softmax_layers, window=window)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 61, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0                      # the second prompt is 4 tokens shorter
    out = hf.greedy_decode(model, ids, 9, attention_mask=mask)
    assert out.shape == (2, 21)
    assert torch.equal(out, generate(model, ids, 9, mask))
    assert hf.decode.graph_capturable(model) == (softmax_layers == () and window == 0)


def test_greedy_decode_rejects_bad_requests():
    model = tiny_llama(layers=2)
    hf.linearize(model, 4)
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        hf.greedy_decode(model, ids, 0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        hf.greedy_decode(model, ids, 3, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_steps():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_llama().cuda()
    hf.linearize(model, [5, 9, 13])
    ids = torch.randint(1, 61, (3, 17), generator=torch.Generator().manual_seed(4)).cuda()
    graph = hf.greedy_decode(model, ids, 12, cuda_graph=True)
    eager = hf.greedy_decode(model, ids, 12, cuda_graph=False)
    assert torch.equal(graph, eager)
    assert torch.equal(graph, generate(model, ids, 12, torch.ones_like(ids)))
