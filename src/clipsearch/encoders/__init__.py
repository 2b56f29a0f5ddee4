"""Encoders: turn images and texts into L2-normalised vectors of one model's space.

``load_encoder(ModelSpec(...))`` picks the backend: ``hf:REPO`` (or a transformers folder given
with ``--weights``) uses transformers; anything else uses open_clip.
"""

from __future__ import annotations

from .base import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    Encoder,
    ModelIdentity,
    ModelSpec,
    resolve_device,
)


def load_encoder(spec: ModelSpec) -> Encoder:
    if spec.backend == "hf":
        from . import hf

        return hf.load(spec)
    from . import openclip

    return openclip.load(spec)


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "Encoder",
    "ModelIdentity",
    "ModelSpec",
    "load_encoder",
    "resolve_device",
]
