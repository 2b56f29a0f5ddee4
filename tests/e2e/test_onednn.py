"""oneDNN kernels for PyTorch on the CPU: same vectors as PyTorch's own, and a safe way back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from clipsearch.encoders import ModelSpec, load_encoder, onednn

from ..conftest import sample_photo

TEXTS = ["a photo of a cat", "an astronaut on a horse", "", "word " * 100]

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN linear kernel")


def _kinds(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@needs_onednn
@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_onednn_encoders_give_pytorchs_vectors(backend, tiny_openclip, tiny_hf, monkeypatch):
    weights = tiny_openclip if backend == "open_clip" else tiny_hf
    fast = load_encoder(ModelSpec(weights=weights, device="cpu"))
    monkeypatch.setenv("CLIPSEARCH_ONEDNN", "0")
    plain = load_encoder(ModelSpec(weights=weights, device="cpu"))
    assert fast.onednn and not plain.onednn
    assert "OneDnnLinear" in _kinds(fast.model) and "OneDnnLinear" not in _kinds(plain.model)
    if backend == "open_clip":
        assert "OneDnnSelfAttention" in _kinds(fast.model)
    images = [sample_photo(n) for n in ("astronaut", "coffee", "chelsea")]
    np.testing.assert_allclose(fast.embed_images(images), plain.embed_images(images), atol=1e-5)
    np.testing.assert_allclose(fast.embed_texts(TEXTS), plain.embed_texts(TEXTS), atol=1e-5)
    assert fast.identity == plain.identity


@needs_onednn
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(48, 4, batch_first=batch_first).eval()
    fast = onednn.OneDnnSelfAttention(mha)
    x = torch.randn(3, 7, 48) if batch_first else torch.randn(7, 3, 48)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    with torch.inference_mode():
        for mask in (None, causal):
            want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            got, weights = fast(x, x, x, need_weights=False, attn_mask=mask)
            assert weights is None
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # calls the fast path does not cover go to the original module, unchanged
        other = torch.randn_like(x)
        torch.testing.assert_close(fast(x, other, other, need_weights=False)[0], mha(x, other, other)[0])
        out, weights = fast(x, x, x)  # attention weights asked for
        assert weights is not None
        padding = torch.zeros(3, 7, dtype=torch.bool)
        padding[:, -2:] = True
        torch.testing.assert_close(
            fast(x, x, x, need_weights=False, key_padding_mask=padding)[0],
            mha(x, x, x, need_weights=False, key_padding_mask=padding)[0],
        )
        bool_mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
        torch.testing.assert_close(
            fast(x, x, x, need_weights=False, attn_mask=bool_mask)[0],
            mha(x, x, x, need_weights=False, attn_mask=bool_mask)[0],
        )


@needs_onednn
def test_a_swap_that_changes_the_output_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    calls = iter(range(10))
    # the second call (after the swap) returns something else: the swap must be rolled back
    assert not onednn.accelerate(model, [lambda: model(x) + next(calls)])
    assert _kinds(model) == {"Sequential", "Linear", "GELU"}
    assert onednn.accelerate(model, [lambda: model(x)])
    assert "OneDnnLinear" in _kinds(model)
    with torch.enable_grad():  # training keeps PyTorch's own kernels (oneDNN's have no backward)
        y = model(x.requires_grad_())
        y.sum().backward()


def test_onednn_verdict_is_kept(tiny_openclip, monkeypatch, tmp_path):
    from clipsearch.encoders import ModelSpec, load_encoder, onednn

    if not onednn.available():
        pytest.skip("this PyTorch has no oneDNN linear kernel")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checks = []
    real = onednn.accelerate
    monkeypatch.setattr(onednn, "accelerate", lambda *a, **k: checks.append(1) or real(*a, **k))
    first = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    second = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    assert first.onednn and second.onednn and len(checks) == 1  # checked once, then remembered
    assert list(json.loads((tmp_path / "cache" / "clipsearch" / "onednn.json").read_text()).values()) == [True]
    texts = ["a photo of a cat", "a red dress"]
    np.testing.assert_allclose(first.embed_texts(texts), second.embed_texts(texts), atol=1e-6)
