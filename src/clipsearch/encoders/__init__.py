"""Encoders: turn images and texts into L2-normalised vectors of one model's space.

``load_encoder(ModelSpec(...))`` picks the backend: a tower folder or published ONNX repository
(``towers``) runs on ONNX Runtime alone; ``hf:REPO`` (or a transformers folder given with
``--weights``) uses transformers; anything else uses open_clip, whose towers are exported to ONNX
once (``onnx``). Importing this package imports no torch: only the PyTorch backends and the
export do, and they need the ``torch`` extra.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..errors import MissingExtraError, UsageError, option
from ..identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, ModelSpec
from .interface import Encoder

if TYPE_CHECKING:
    import torch


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    from .base import resolve_device as resolve

    return resolve(requested)


def torch_installed() -> bool:
    """Whether the ``torch`` extra (torch and open_clip) is installed, without importing it."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "open_clip"))
    except ImportError:  # a finder that refuses the name outright: not importable either
        return False


def require_torch(what: str, hint: str = "") -> None:
    """MissingExtraError naming ``what`` unless the ``torch`` extra is installed."""
    if not torch_installed():
        raise MissingExtraError(what, "torch", hint=hint)


def gpu_present() -> bool:
    """Whether ``--device auto`` would likely find a GPU here (NVIDIA's driver, or Apple
    silicon's MPS), asked without importing torch, whose import alone takes seconds."""
    import os
    import platform
    import shutil
    import sys

    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def choose_runtime(spec: ModelSpec, runtime_asked: bool) -> tuple[ModelSpec, str]:
    """``spec`` as this install runs it, and why. A runtime that was asked for stays. An
    open_clip model in fp32 on the CPU gives the same vectors on PyTorch and on its ONNX export
    (cosine >= 0.9999), so there the runtime is chosen per run rather than taken from the
    namespace: ONNX Runtime once the towers are exported (it starts in a fraction of a second,
    PyTorch and open_clip take about 5 s to import and build; per image they are level), else
    PyTorch, whose ingest then exports the towers for the runs after it; without the torch
    extra, the export (loading then says which extra is missing). A GPU keeps PyTorch; a
    namespace ingested on ONNX Runtime stays on it."""
    if runtime_asked:
        if spec.runtime == "torch":
            require_torch(f"the torch runtime for {spec.label}")
        return spec, "asked for"
    if spec.backend == "onnx":
        return spec, "the model is an ONNX tower folder"
    if spec.backend != "open_clip":
        return spec, "as recorded with the namespace"
    if spec.precision != "fp32":
        return spec, f"{spec.precision} runs on ONNX Runtime only"
    if spec.device not in ("auto", "cpu"):
        return dataclasses.replace(spec, runtime="torch"), f"the device asked for is {spec.device}"
    if spec.runtime == "onnx":
        return spec, "as recorded with the namespace"
    if not torch_installed():
        return dataclasses.replace(spec, runtime="onnx", device="cpu"), (
            "the torch extra is not installed: the model's ONNX export runs without it"
        )
    if spec.device == "auto" and gpu_present():
        return dataclasses.replace(spec, runtime="torch"), "this machine has a GPU"
    from .towers import find_export

    if find_export(spec, "fp32") is not None:
        return dataclasses.replace(spec, runtime="onnx", device="cpu"), (
            "the model's ONNX export is made: ONNX Runtime starts in under a second where PyTorch "
            "takes about 5 s, for the same vectors"
        )
    return dataclasses.replace(spec, runtime="torch"), (
        "no ONNX export of the model yet; an ingest on PyTorch exports it for the runs after it"
    )


def runnable_spec(spec: ModelSpec, runtime_asked: bool) -> ModelSpec:
    """``spec`` as this install runs it (see ``choose_runtime``)."""
    return choose_runtime(spec, runtime_asked)[0]


def check_runtime(spec: ModelSpec) -> None:
    """Refuse a runtime, precision and device that do not go together, before anything loads."""
    if spec.runtime not in ("torch", "onnx"):
        raise UsageError(f"unknown {option('runtime')} {spec.runtime!r}; use torch or onnx")
    if spec.precision not in ("fp32", "int8"):
        raise UsageError(f"unknown {option('precision')} {spec.precision!r}; use fp32 or int8")
    if spec.precision == "int8" and spec.runtime != "onnx":
        raise UsageError(
            f"{option('precision')} int8 needs {option('runtime')} onnx (dynamic int8 quantisation in ONNX Runtime)"
        )
    if spec.decode not in ("fast", "exact"):
        raise UsageError(f"unknown {option('decode')} {spec.decode!r}; use fast or exact")
    if spec.backend == "onnx" and spec.runtime != "onnx":
        raise UsageError(
            f"{spec.label} is an ONNX model: it runs on ONNX Runtime only; leave out {option('runtime')} torch"
        )
    if spec.runtime == "onnx" and spec.device not in ("auto", "cpu"):
        raise UsageError(
            f"{option('runtime')} onnx runs on the CPU; "
            f"use {option('runtime')} torch for {option('device')} {spec.device}"
        )


def load_encoder(spec: ModelSpec, *, serving: bool = False, few_calls: bool = False) -> Encoder:
    """Load the encoder ``spec`` describes. ``serving`` tunes thread pools for a server that
    shares the cores with its event loop (ONNX Runtime threads sleep instead of spinning);
    ``few_calls``: a command that answers a query or two (see ``towers.TowerEncoder``).

    A tower folder runs without torch. So does an open_clip model on the onnx runtime once its
    towers are exported (``towers.find_export``); exporting them, the torch runtime and the
    transformers backend need the ``torch`` extra."""
    check_runtime(spec)
    return decoded_as(_load(spec, serving, few_calls), spec.decode)


def decoded_as(encoder: Encoder, decode: str) -> Encoder:
    """``encoder`` with its images decoded ``decode`` (``fast`` or ``exact``). How images are
    decoded is the pipeline's choice, not the model's, but it shapes the vectors, so the
    identity records it: here, once, for every backend."""
    encoder.identity = dataclasses.replace(encoder.identity, decode=decode)
    return encoder


def _load(spec: ModelSpec, serving: bool, few_calls: bool) -> Encoder:
    from . import towers

    if spec.backend == "onnx":
        return towers.load(spec, spin=not serving, few_calls=few_calls)
    if spec.runtime == "onnx" and spec.backend == "open_clip":
        folder = towers.find_export(spec, spec.precision)
        if folder is not None:
            return towers.TowerEncoder(folder, spec.precision, spin=not serving, few_calls=few_calls)
    require_torch(f"{'exporting ' if spec.runtime == 'onnx' else 'running '}{spec.label}", hint=TOWER_HINT)
    if spec.backend == "hf":
        from . import hf

        if spec.runtime == "onnx":
            base: Encoder = hf.load(dataclasses.replace(spec, device="cpu"), fast_cpu=False)
        else:
            base = hf.load(spec)
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


# what a user without the torch extra can do instead
TOWER_HINT = (
    f"; or use a model exported to ONNX ({option('model')} immich-app/ViT-B-32__openai, "
    f"or {option('weights')} DIR from `clipsearch models export`)"
)


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "Encoder",
    "ModelIdentity",
    "ModelSpec",
    "check_runtime",
    "choose_runtime",
    "gpu_present",
    "load_encoder",
    "require_torch",
    "resolve_device",
    "runnable_spec",
    "torch_installed",
]
