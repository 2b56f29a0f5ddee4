"""ONNX Runtime encoders: open_clip's image and text towers exported once, run on the CPU.

ONNX Runtime's CPU kernels are markedly faster than PyTorch's for these towers on many CPUs
(see ``benchmarks/``). The towers are exported from the loaded PyTorch model into a cache folder
keyed by a digest of the weights, so a changed checkpoint is exported again and an unchanged one
never is. ``fp32`` gives the PyTorch vectors (a test holds them to cosine >= 0.9999, so they may
share a namespace); ``int8`` applies ONNX Runtime's dynamic quantisation to the weights and is a
separate model identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .base import Encoder, ModelIdentity, ModelSpec
from .openclip import OpenClipEncoder, count_tokens, encode_text_cut, token_counts, trim_tokens

EXPORT_VERSION = 2  # bump when the exported graphs change (2: text pooling follows the model)


def cache_root() -> Path:
    env = os.environ.get("CLIPSEARCH_ONNX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "clipsearch" / "onnx"


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--runtime onnx needs the 'onnx' extra: pip install 'clipsearch[onnx]'") from None
    return onnxruntime


class _Tower(torch.nn.Module):
    """One of the model's towers as a module to export: ``forward(x) = fn(model, x)``."""

    def __init__(self, model: Any, fn: Callable[[Any, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x)


def weights_digest(model: torch.nn.Module, identity: ModelIdentity) -> str:
    """Content digest of the model: its identity plus every weight's bytes."""
    h = hashlib.sha256()
    h.update(identity.compat_key.encode())
    h.update(f"export-v{EXPORT_VERSION} torch-{torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _export(module: torch.nn.Module, example: torch.Tensor, dims: dict[int, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        # the exporter reports progress with print() and warns about its own internals
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                (example,),
                dynamo=True,
                dynamic_shapes=(dims,),
                input_names=["clipsearch_input"],
                output_names=["clipsearch_features"],
                verbose=False,
            )
        program.save(str(out), external_data=False)
        os.replace(out, path)


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        os.replace(out, dst)


class OnnxEncoder(Encoder):
    def __init__(
        self, base: OpenClipEncoder, folder: Path, precision: str, threads: int | None = None, spin: bool = True
    ):
        ort = _import_ort()
        self.preprocess = base.preprocess
        self.tokenizer = base.tokenizer
        self.trim_text_padding = base.trim_text_padding
        self._image_tokens = base.image_tokens
        # trim_tokens needs only the pooling rule; the PyTorch model itself is not kept
        self._pooling = SimpleNamespace(
            text_pool_type=getattr(base.model, "text_pool_type", None),
            text_eos_id=getattr(base.model, "text_eos_id", None),
        )
        self.folder = folder
        quantization = "int8-dynamic" if precision == "int8" else "none"
        self.identity = dataclasses.replace(
            base.identity, runtime="onnx", precision=precision, quantization=quantization
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            # Idle worker threads spin by default: best for batch ingest, but in a server they
            # burn the cores the event loop needs between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        suffix = ".int8.onnx" if precision == "int8" else ".onnx"
        providers = ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(str(folder / f"image{suffix}"), options, providers=providers)
        self._text = ort.InferenceSession(str(folder / f"text{suffix}"), options, providers=providers)
        self.device = "cpu"

    @property
    def image_tokens(self) -> int:
        return self._image_tokens

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._image.run(None, {"clipsearch_input": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return _normalize(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_texts_counted(texts)[0]

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        tokens = self.tokenizer(texts)
        counts = token_counts(self.tokenizer, tokens)
        if self.trim_text_padding:
            tokens = trim_tokens(self._pooling, tokens)
        feed = np.ascontiguousarray(tokens.numpy(), dtype=np.int64)
        return _normalize(self._text.run(None, {"clipsearch_input": feed})[0]), counts

    def count_tokens(self, texts: list[str]) -> list[int]:
        return count_tokens(self.tokenizer, texts)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def prepare(base: OpenClipEncoder, precision: str) -> Path:
    """The cache folder holding this model's exported towers (exported now if missing)."""
    model = base.model
    folder = cache_root() / weights_digest(model, base.identity)
    h, w = base.preprocess_spec.size
    meta = folder / "meta.json"
    if not (folder / "image.onnx").is_file():
        batch = torch.export.Dim("batch", min=1, max=4096)
        _export(
            _Tower(model, lambda m, x: m.encode_image(x)), torch.zeros(2, 3, h, w), {0: batch}, folder / "image.onnx"
        )
    if not (folder / "text.onnx").is_file():
        ctx = int(getattr(model, "context_length", 77))
        example = base.tokenizer(["a photo", "an example text"])
        batch = torch.export.Dim("batch", min=1, max=4096)
        if base.trim_text_padding:
            n = int(example.argmax(dim=-1).max()) + 1
            length = torch.export.Dim("length", min=2, max=ctx)
            # open_clip's causal text tower on tokens already cut to the batch's longest sequence
            _export(
                _Tower(model, encode_text_cut), example[:, : max(n, 3)], {0: batch, 1: length}, folder / "text.onnx"
            )
        else:
            _export(_Tower(model, lambda m, x: m.encode_text(x)), example, {0: batch}, folder / "text.onnx")
    if precision == "int8":
        for tower in ("image", "text"):
            if not (folder / f"{tower}.int8.onnx").is_file():
                _quantize(folder / f"{tower}.onnx", folder / f"{tower}.int8.onnx")
    if not meta.is_file():
        meta.write_text(json.dumps({"identity": base.identity.as_dict(), "export_version": EXPORT_VERSION}, indent=1))
    return folder


def load(spec: ModelSpec, base: Encoder, spin: bool = True) -> OnnxEncoder:
    """``base`` loaded on the CPU; ``load_encoder`` has checked runtime, precision and device."""
    if not isinstance(base, OpenClipEncoder):
        raise UsageError(
            "--runtime onnx supports open_clip models; use --runtime torch for transformers (hf:) checkpoints"
        )
    _import_ort()
    folder = prepare(base, spec.precision)
    return OnnxEncoder(base, folder, spec.precision, spin=spin)
