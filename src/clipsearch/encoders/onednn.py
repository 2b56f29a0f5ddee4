"""oneDNN matrix products for PyTorch models on the CPU.

PyTorch runs ``nn.Linear`` on the CPU through MKL's sgemm, and MKL picks slow code paths on CPUs
it does not recognise (AMD EPYC among them): on our build machine a ViT-B-32 image tower spends
over 90% of its time there, at about a third of the cores' fp32 peak. oneDNN, which PyTorch also
ships, runs the same products about twice as fast on those CPUs and as fast elsewhere. This module
swaps the linear layers and self-attention blocks of a model for equivalents that call oneDNN's
linear kernel with the same weights. The results equal the original to fp32 rounding (the order of
the sums differs); ``accelerate`` checks that on a sample input and leaves the model untouched if
the kernel is missing or disagrees.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..files import JsonCache

log = logging.getLogger(__name__)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDnnLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _linear(x, self.weight, self.bias)


class OneDnnSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` for self-attention (query = key = value), as open_clip calls it.

    Any other call (cross-attention, attention weights wanted, a boolean mask, training) goes to
    the original module, which is kept.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.original = mha
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        mha = self.original
        usable = (
            query is key is value
            and not need_weights
            and kwargs.get("key_padding_mask") is None
            and not kwargs.get("is_causal")
            and (attn_mask is None or attn_mask.is_floating_point())
            and query.device.type == "cpu"
            and query.dtype == torch.float32
            and not torch.is_grad_enabled()
        )
        if not usable:
            return mha(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, width = x.shape
        qkv = _linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = _linear(out.transpose(1, 2).reshape(b, n, width), mha.out_proj.weight, mha.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _swap(module: nn.Module) -> int:
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):
            if child._qkv_same_embed_dim and child.in_proj_weight is not None and child.bias_k is None:
                setattr(module, name, OneDnnSelfAttention(child))
                swapped += 1
        elif isinstance(child, nn.Linear):
            setattr(module, name, OneDnnLinear(child))
            swapped += 1
        else:
            swapped += _swap(child)
    return swapped


def _restore(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, OneDnnSelfAttention):
            setattr(module, name, child.original)
        elif isinstance(child, OneDnnLinear):
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight, linear.bias = child.weight, child.bias
            setattr(module, name, linear)
        else:
            _restore(child)


def apply(model: nn.Module) -> bool:
    """Swap without checking: for a model whose check already passed (``verdicts``)."""
    return available() and bool(_swap(model))


def verdict_key(architecture: str) -> str:
    """What decides whether the swap gives the same vectors: the PyTorch build, the CPU, and the
    model's architecture (not its weights: the kernels compute the same products for any)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    cpu += "|" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return hashlib.sha256(f"{torch.__version__}|{cpu}|{architecture}".encode()).hexdigest()[:24]


class Verdicts:
    """Whether the swap passed its check, per ``verdict_key``, kept in a small JSON file: the
    check runs the model twice on sample inputs (seconds for ViT-B-32 on 2 cores), once per
    PyTorch, CPU and architecture instead of at every load."""

    def __init__(self, path: Path):
        self.cache = JsonCache(path)

    def get(self, key: str) -> bool | None:
        value = self.cache.read().get(key)
        return value if isinstance(value, bool) else None

    def put(self, key: str, verdict: bool) -> None:
        if not self.cache.update({key: verdict}):  # read-only: the check runs again next time
            log.debug("cannot keep the oneDNN verdict in %s", self.cache.path)


def accelerate(model: nn.Module, checks: list[Callable[[], torch.Tensor]], atol: float = 1e-5) -> bool:
    """Swap ``model``'s linear layers for oneDNN ones in place, if that gives the same vectors.

    ``checks`` are calls through the model (e.g. encoding a sample image); each must give the same
    L2-normalised features before and after the swap, within ``atol``. Returns whether the swap
    was kept.
    """
    if not available():
        return False
    with torch.inference_mode():
        expected = [F.normalize(check().float(), dim=-1) for check in checks]
        if not _swap(model):
            return False
        try:
            got = [F.normalize(check().float(), dim=-1) for check in checks]
            same = all(float((a - b).abs().max()) <= atol for a, b in zip(expected, got, strict=True))
        except RuntimeError as e:
            log.debug("oneDNN linear kernels failed (%s); keeping PyTorch's", e)
            same = False
    if not same:
        _restore(model)
    return same
