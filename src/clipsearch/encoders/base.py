"""The encoder interface, model identity and device selection shared by every backend."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DeviceUnavailableError, UsageError
from ..imaging import Preprocessor, PreprocessSpec

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


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. An explicit device that is absent is an error."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {requested} was asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu (or auto)"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {requested} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError(
                "--device mps was asked for, but Apple's MPS backend is not available here; use --device cpu"
            )
        return torch.device("mps")
    raise UsageError(f"unknown --device {requested!r}; use auto, cpu, cuda, cuda:N or mps")


class Encoder(ABC):
    """Maps images and texts into one L2-normalised vector space.

    ``embed_images`` and ``embed_texts`` return float32 arrays of shape (n, dim).
    """

    identity: ModelIdentity
    preprocess: Preprocessor

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.preprocess.spec

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_pixels(self.preprocess.batch(list(images)))

    @abstractmethod
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed preprocessed images, float32 (n, 3, H, W)."""

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embed resized and cropped images, uint8 (n, H, W, 3): normalised here, per batch."""
        return self.embed_pixels(self.preprocess.normalize(crops))

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a list of strings."""

    @abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text occupies in the text tower (special tokens included, after truncation)."""

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """``embed_texts`` plus ``count_tokens``; backends override it to tokenise only once."""
        texts = [str(t) for t in texts]
        return self.embed_texts(texts), self.count_tokens(texts)

    @property
    def image_tokens(self) -> int:
        """Tokens one image occupies in a ViT image tower (patches + class token); 0 if unknown."""
        return 0


class TorchEncoder(Encoder):
    """Shared inference plumbing for PyTorch backends: device, fp16 on CUDA, batching, norm."""

    text_batch_size = 256
    model: torch.nn.Module
    onednn = False  # whether the matrix products run on oneDNN (see ``use_onednn``)

    def __init__(self, identity: ModelIdentity, preprocess: Preprocessor, device: torch.device):
        self.identity = identity
        self.preprocess = preprocess
        self.device = device
        # fp16 halves memory traffic on GPUs; on CPU it is slower and less exact.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        # uint8 crops are normalised on the device: x * scale + offset, per channel
        self._scale = torch.from_numpy(preprocess.scale).to(device).view(1, 3, 1, 1)
        self._offset = torch.from_numpy(preprocess.offset).to(device).view(1, 3, 1, 1)

    def use_onednn(self) -> bool:
        """On the CPU, run the model's matrix products with oneDNN instead of MKL (``onednn``
        explains why); kept only if a sample image and text give the same vectors as before.
        ``CLIPSEARCH_ONEDNN=0`` turns it off."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or os.environ.get("CLIPSEARCH_ONEDNN") == "0":
            return False
        from . import onednn

        h, w = self.preprocess_spec.size
        pixels = torch.randn((2, 3, h, w), generator=torch.Generator().manual_seed(0))
        texts = ["a photo of a cat", "a diagram of a bicycle with two wheels"]
        self.onednn = onednn.accelerate(
            self.model, [lambda: self._image_features(pixels), lambda: self._text_features(texts)]
        )
        return self.onednn

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor: ...

    def _to_device(self, array: np.ndarray, dtype: type) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tensor = self._to_device(pixels, np.float32)
        with torch.inference_mode():
            return normalize(self._image_features(tensor.to(self.dtype)))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tensor = self._to_device(crops, np.uint8)
        with torch.inference_mode():
            pixels = torch.addcmul(self._offset, tensor.permute(0, 3, 1, 2).float(), self._scale)
            return normalize(self._image_features(pixels.contiguous().to(self.dtype)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.text_batch_size):
                out.append(normalize(self._text_features(texts[i : i + self.text_batch_size])))
        return np.concatenate(out)


def normalize(feats: torch.Tensor) -> np.ndarray:
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    return feats.cpu().numpy().astype(np.float32, copy=False)
