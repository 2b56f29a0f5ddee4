"""ONNX towers: an exported model's image and text towers on ONNX Runtime, without torch.

``encoders.onnx`` exports a PyTorch model's towers once into a cache folder (``image.onnx``,
``text.onnx``, their int8 variants, ``meta.json`` with the identity and the text pooling, and,
for models with CLIP's BPE tokenizer, ``tokenizer.json`` with the merges). ``TowerEncoder`` runs
such a folder: our own tokenizer (``clipsearch.tokenizer``), Pillow + numpy preprocessing, and
one ONNX Runtime session per tower, created on first use. So a text query loads the text tower
only and an image query the image tower only, and neither imports torch.

Each export is also listed under a key made from what the store records about a namespace's
model (name, tag, weights path with its files' sizes and mtimes), so that a query finds the
export of a namespace's model without loading the model (``find_export``). The identity in
``meta.json`` is still compared with the namespace's before any vector is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..files import write_atomic
from ..identity import ModelIdentity, ModelSpec
from ..imaging import Preprocessor, PreprocessSpec
from .interface import Encoder

# bump when the exported graphs or meta change (3: text pooling and tokenizer in meta; 4: weights
# digest and decode mode in the identity, int8 for the image tower only)
EXPORT_VERSION = 4
_BY_SPEC = "by-spec"

Tokenize = Callable[[list[str]], np.ndarray]  # texts -> int64 (n, context) token ids


def cache_root() -> Path:
    """Where exports live: ``CLIPSEARCH_ONNX_CACHE``, else ``$XDG_CACHE_HOME/clipsearch/onnx``."""
    from ..settings import settings

    return settings().onnx_cache


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--runtime onnx needs the 'onnx' extra: pip install 'clipsearch[onnx]'") from None
    return onnxruntime


def _weights_state(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a weights file, or of each file in a weights folder."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files]


def export_key(spec: ModelSpec) -> str | None:
    """The key an export of ``spec``'s model is listed under, computed without loading the
    model; None for models this path does not serve (transformers backends) or weights that are
    gone. A changed weights file (size or mtime) gives another key."""
    if spec.backend != "open_clip":
        return None
    parts: dict[str, Any] = {"model": spec.model, "pretrained": spec.pretrained or "", "export": EXPORT_VERSION}
    if spec.weights is not None:
        try:
            weights = Path(spec.weights).expanduser().resolve(strict=True)
            parts["weights"] = str(weights)
            parts["files"] = _weights_state(weights)
        except OSError:
            return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def register_export(spec: ModelSpec, folder: Path) -> None:
    """List ``folder`` as the export of ``spec``'s model (see ``find_export``)."""
    key = export_key(spec)
    if key is None:
        return
    write_atomic(cache_root() / _BY_SPEC / key, str(folder), mode=0o644)


def find_export(spec: ModelSpec, precision: str = "fp32") -> Path | None:
    """The export folder of ``spec``'s model if one was made and can run without torch: both
    towers in ``precision`` and a tokenizer of our own. None otherwise."""
    key = export_key(spec)
    if key is None:
        return None
    try:
        folder = Path((cache_root() / _BY_SPEC / key).read_text().strip())
    except OSError:
        return None
    needed = ("meta.json", "tokenizer.json", tower_file("image", precision), tower_file("text", precision))
    return folder if all((folder / name).is_file() for name in needed) else None


def tower_file(tower: str, precision: str) -> str:
    """The file a tower runs from. int8 quantises the image tower only: ONNX Runtime's dynamic
    quantisation scales activations per tensor, which costs the text tower too much (cosine
    0.988 to fp32 on a sensitive checkpoint), while a text query is cheap in fp32 anyway."""
    return f"{tower}.int8.onnx" if precision == "int8" and tower == "image" else f"{tower}.onnx"


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class TowerEncoder(Encoder):
    """An exported model on ONNX Runtime (CPU). Each tower's session is made when first used.

    ``tokenize``: the model's own tokenizer as a function returning numpy ids; by default the
    folder's ``tokenizer.json`` (our torch-free CLIP tokenizer). ``few_calls``: the encoder
    answers a query or two and exits (a command), so the weights are not repacked for faster
    matrix products: repacking takes longer than the few calls it would speed up. ``decode``:
    how images are decoded for it (``fast`` or ``exact``, see ``decoding``).
    """

    def __init__(
        self,
        folder: Path,
        precision: str = "fp32",
        *,
        spin: bool = True,
        threads: int | None = None,
        tokenize: Tokenize | None = None,
        few_calls: bool = False,
        decode: str = "fast",
    ):
        self.folder = folder
        meta = json.loads((folder / "meta.json").read_text())
        base = ModelIdentity.from_dict(meta["identity"])
        quantization = "int8-dynamic" if precision == "int8" else "none"
        self.identity = dataclasses.replace(
            base, runtime="onnx", precision=precision, quantization=quantization, decode=decode
        )
        self.preprocess = Preprocessor(PreprocessSpec.from_dict(base.preprocess))
        text = meta.get("text", {})
        self._trim = bool(text.get("trim", False))
        self._pool = text.get("pool")
        self._eos_id = text.get("eos_id")
        self._pad_id = int(text.get("pad_id", 0))
        self._image_tokens = int(meta.get("image_tokens", 0))
        self._precision = precision
        self._spin = spin
        self._threads = threads
        self._tokenize = tokenize
        self._few_calls = few_calls
        self._sessions: dict[str, Any] = {}
        self.device = "cpu"

    # -- sessions ------------------------------------------------------------------------
    def _session(self, tower: str) -> Any:
        session = self._sessions.get(tower)
        if session is None:
            ort = import_ort()
            options = ort.SessionOptions()
            options.intra_op_num_threads = self._threads or os.cpu_count() or 1
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not self._spin:
                # Idle worker threads spin by default: best for batch ingest, but in a server they
                # burn the cores the event loop needs between batches.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self._few_calls:
                options.add_session_config_entry("session.disable_prepacking", "1")
            path = str(self.folder / tower_file(tower, self._precision))
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self._sessions[tower] = session
        return session

    def loaded_towers(self) -> list[str]:
        """The towers whose sessions exist (a text query loads only ``text``)."""
        return sorted(self._sessions)

    # -- text ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenize is None:
            from ..tokenizer import ClipTokenizer, TokenizerConfig

            tokenizer = ClipTokenizer(TokenizerConfig.load(self.folder / "tokenizer.json"), root=self.folder)
            self._tokenize = tokenizer
        return np.asarray(self._tokenize(texts), dtype=np.int64)

    def _trimmed(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens cut after the longest real sequence (the exported graph takes any length)."""
        if not self._trim:
            return tokens
        ends = tokens.argmax(axis=1) if self._pool == "argmax" else (tokens == self._eos_id).argmax(axis=1)
        return np.ascontiguousarray(tokens[:, : int(ends.max()) + 1])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_texts_counted(texts)[0]

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        tokens = self.tokenize(texts)
        counts = (tokens != self._pad_id).sum(axis=1).tolist()
        out = self._session("text").run(None, {"clipsearch_input": self._trimmed(tokens)})[0]
        return _normalize(out), counts

    def count_tokens(self, texts: list[str]) -> list[int]:
        return (self.tokenize([str(t) for t in texts]) != self._pad_id).sum(axis=1).tolist()

    # -- images --------------------------------------------------------------------------
    @property
    def image_tokens(self) -> int:
        return self._image_tokens

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        feed = np.ascontiguousarray(pixels, dtype=np.float32)
        session = self._session("image")
        if self._precision == "int8":
            # Dynamic quantisation scales each activation tensor by its largest value, over the
            # whole batch: an image's vector would depend on what it was batched with (the
            # server's batches, an ingest's). One image per run keeps each vector its own, at the
            # same speed on the CPU (measured: 38 images/s either way for ViT-B-32).
            runs = [session.run(None, {"clipsearch_input": feed[i : i + 1]})[0] for i in range(len(feed))]
            out = np.concatenate(runs)
        else:
            out = session.run(None, {"clipsearch_input": feed})[0]
        return _normalize(out)
