"""Model identity, without torch: ``ModelSpec`` (what a user asked for: a model, its weights, where
and how to run it) and ``ModelIdentity`` (which vector space an encoder's vectors live in).

The store records both for every namespace; the collection compares them before it searches or
writes. Commands that only read the store (``info``, ``failures``, keyword search, ``export``)
import this module and never the encoders, so they never pay for torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a model name, its pretrained tag, optional local weights, a device."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    weights: Path | None = None
    device: str = "auto"
    runtime: str = "torch"  # torch | onnx
    precision: str = "fp32"  # fp32 | int8 (int8: ONNX Runtime on CPU only)

    @property
    def backend(self) -> str:
        if self.model.startswith("hf:"):
            return "hf"
        if self.weights is not None and self.weights.is_dir():
            if (self.weights / "open_clip_config.json").is_file():
                return "open_clip"
            if (self.weights / "config.json").is_file():
                return "hf"
        return "open_clip"

    @property
    def label(self) -> str:
        """How to name this model to a person: the weights when they are local files."""
        if self.weights is None:
            return self.model
        if self.backend == "hf" or self.weights.is_dir():
            return f"{self.weights.name} (from {self.weights})"
        return f"{self.model} (weights {self.weights})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "weights": str(self.weights) if self.weights else None,
            "runtime": self.runtime,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: str = "auto") -> ModelSpec:
        weights = data.get("weights")
        return cls(
            model=data.get("model") or DEFAULT_MODEL,
            pretrained=data.get("pretrained"),
            weights=Path(weights) if weights else None,
            device=device,
            runtime=data.get("runtime") or "torch",
            precision=data.get("precision") or "fp32",
        )


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that determines which vector space an embedding lives in.

    Two encoders may write to one namespace only if their ``compat_key`` is equal. Runtime and
    float precision are recorded but not compared: fp16 on CUDA and fp32 on CPU give the same
    vectors to ~1e-4. Quantisation changes them more, so it is part of the key.
    """

    backend: str
    model: str
    pretrained: str
    dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"
    precision: str = "fp32"
    quantization: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "preprocess": self.preprocess,
            "runtime": self.runtime,
            "precision": self.precision,
            "quantization": self.quantization,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def compat_key(self) -> str:
        keep = ("backend", "model", "pretrained", "dim", "preprocess", "quantization")
        return json.dumps({k: self.as_dict()[k] for k in keep}, sort_keys=True)

    @property
    def model_id(self) -> str:
        """Short stable name, e.g. ``ViT-B-32/openai`` or ``hf:openai/clip-vit-base-patch32``."""
        return f"{self.model}/{self.pretrained}" if self.pretrained else self.model

    def describe(self) -> str:
        extra = "" if self.quantization == "none" else f", {self.quantization}"
        return f"{self.backend} {self.model_id} ({self.dim}-d{extra})"

    def differences(self, other: ModelIdentity) -> list[str]:
        """Human-readable list of the compared fields that differ."""
        a, b = self.as_dict(), other.as_dict()
        keys = ("backend", "model", "pretrained", "dim", "preprocess", "quantization")
        return [f"{k} {a[k]!r} vs {b[k]!r}" for k in keys if a[k] != b[k]]
