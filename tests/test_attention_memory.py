"""Memory-bounded attention: chunked attention equals full attention, forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from realdgen_core.models import content
from realdgen_core.models.content import SelfAttention, chunked_attention


def test_chunked_attention_matches_full_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g, requires_grad=True) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v)
    gq, gk, gv = torch.autograd.grad(full.square().sum(), (q, k, v))
    out = chunked_attention(q, k, v, budget=2 * 3 * 50 * 7)  # chunks of 7 queries (last one 1)
    cq, ck, cv = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    for a, b in ((cq, gq), (ck, gk), (cv, gv)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_large_maps_attend_in_bounded_chunks(monkeypatch):
    """A 96x96 map (9216 positions) never asks SDPA for more than the budget of scores at once;
    a 64x64 map (the generation path) still makes one full call."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(content.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(content, "CHUNK_SCORES_BUDGET", 2**22)
    torch.manual_seed(0)
    attn = SelfAttention(8, 4)
    x = torch.randn(1, 8, 96, 96, requires_grad=True)
    y = attn(x)
    y.mean().backward()  # recomputed chunk by chunk (checkpointed)
    assert len(calls) > 2 and max(calls) <= 2**22 < 96**4
    assert x.grad is not None and torch.isfinite(x.grad).all()
    calls.clear()
    with torch.no_grad():
        attn(torch.randn(1, 8, 64, 64))
    assert calls == [64**4]
    # Same values as one full attention call on the large map.
    with torch.no_grad():
        monkeypatch.setattr(content, "FULL_ATTENTION_MAX_SCORES", 96**4)
        ref = attn(x)
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
