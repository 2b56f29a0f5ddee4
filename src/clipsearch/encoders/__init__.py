"""Encoders: turn images and texts into L2-normalised vectors of one model's space.

``load_encoder(ModelSpec(...))`` picks the backend: ``hf:REPO`` (or a transformers folder given
with ``--weights``) uses transformers; anything else uses open_clip. Importing this package
imports no torch: the backends are imported when a model is loaded, and ``towers`` answers
queries with ONNX Runtime alone.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, ModelSpec
from .interface import Encoder

if TYPE_CHECKING:
    import torch


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    from .base import resolve_device as resolve

    return resolve(requested)


def check_runtime(spec: ModelSpec) -> None:
    """Refuse a runtime, precision and device that do not go together, before anything loads."""
    if spec.runtime not in ("torch", "onnx"):
        raise UsageError(f"unknown --runtime {spec.runtime!r}; use torch or onnx")
    if spec.precision not in ("fp32", "int8"):
        raise UsageError(f"unknown --precision {spec.precision!r}; use fp32 or int8")
    if spec.precision == "int8" and spec.runtime != "onnx":
        raise UsageError("--precision int8 needs --runtime onnx (dynamic int8 quantisation in ONNX Runtime)")
    if spec.decode not in ("fast", "exact"):
        raise UsageError(f"unknown --decode {spec.decode!r}; use fast or exact")
    if spec.runtime == "onnx" and spec.device not in ("auto", "cpu"):
        raise UsageError(f"--runtime onnx runs on the CPU; use --runtime torch for --device {spec.device}")


def load_encoder(spec: ModelSpec, *, serving: bool = False) -> Encoder:
    """Load the encoder ``spec`` describes. ``serving`` tunes thread pools for a server that
    shares the cores with its event loop (ONNX Runtime threads sleep instead of spinning)."""
    check_runtime(spec)
    if spec.backend == "hf":
        from . import hf

        base: Encoder = hf.load(spec)
    else:
        from . import openclip

        if spec.runtime == "onnx":
            base = openclip.load(dataclasses.replace(spec, device="cpu"), fast_cpu=False)
        else:
            base = openclip.load(spec)
    if spec.runtime == "onnx":
        from . import onnx

        return onnx.load(spec, base, spin=not serving)
    return base


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "Encoder",
    "ModelIdentity",
    "ModelSpec",
    "check_runtime",
    "load_encoder",
    "resolve_device",
]
