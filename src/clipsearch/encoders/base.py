"""What every PyTorch backend shares: device selection, fp16 on CUDA, batching, normalisation."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DeviceUnavailableError, UsageError, option
from ..identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelIdentity, ModelSpec  # noqa: F401 - re-exported
from ..imaging import Preprocessor
from ..settings import Settings, settings
from .interface import Encoder


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
                f"{option('device')} {requested} was asked for, but this PyTorch ({torch.__version__}) sees no CUDA "
                "GPU; "
                f"use {option('device')} cpu (or auto)"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"{option('device')} {requested} was asked for, but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
        return dev
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError(
                f"{option('device')} mps was asked for, but Apple's MPS backend is not available here; "
                f"use {option('device')} cpu"
            )
        return torch.device("mps")
    raise UsageError(f"unknown {option('device')} {requested!r}; use auto, cpu, cuda, cuda:N or mps")


class TorchEncoder(Encoder):
    """Shared inference plumbing for PyTorch backends: device, fp16 on CUDA, batching, norm."""

    text_batch_size = 256
    model: torch.nn.Module
    onednn = False  # whether the matrix products run on oneDNN (see ``use_onednn``)

    def __init__(self, identity: ModelIdentity, preprocess: Preprocessor, device: torch.device):
        self._threads = torch.get_num_threads()
        self.identity = identity
        self.preprocess = preprocess
        self.device = device
        # fp16 halves memory traffic on GPUs; on CPU it is slower and less exact.
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        # uint8 crops are normalised on the device: x * scale + offset, per channel
        self._scale = torch.from_numpy(preprocess.scale).to(device).view(1, 3, 1, 1)
        self._offset = torch.from_numpy(preprocess.offset).to(device).view(1, 3, 1, 1)

    @property
    def can_share_cores(self) -> bool:  # type: ignore[override]
        return self.device.type == "cpu"

    def share_cores(self, shared: bool) -> None:
        # OpenMP's thread count is the calling thread's own: other threads keep theirs
        if self.device.type == "cpu":
            torch.set_num_threads(1 if shared else self._threads)

    def use_onednn(self) -> bool:
        """On the CPU, run the model's matrix products with oneDNN instead of MKL (``onednn``
        explains why); kept only if a sample image and text give the same vectors as before.
        ``CLIPSEARCH_ONEDNN=0`` turns it off."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or not settings().onednn:
            return False
        from . import onednn

        # the architecture without the weights: the module tree and its sizes
        architecture = json.dumps(
            {"class": type(self.model).__name__, "dim": self.dim, "modules": str(self.model)}, sort_keys=True
        )
        key = onednn.verdict_key(architecture)
        verdicts = onednn.Verdicts(Settings.user_cache() / "onednn.json")
        known = verdicts.get(key)
        if known is not None:
            self.onednn = onednn.apply(self.model) if known else False
            return self.onednn
        h, w = self.preprocess_spec.size
        pixels = torch.randn((2, 3, h, w), generator=torch.Generator().manual_seed(0))
        texts = ["a photo of a cat", "a diagram of a bicycle with two wheels"]
        self.onednn = onednn.accelerate(
            self.model, [lambda: self._image_features(pixels), lambda: self._text_features(texts)]
        )
        if onednn.available():
            verdicts.put(key, self.onednn)
        return self.onednn

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor: ...

    def _to_device(self, array: np.ndarray, dtype: type) -> torch.Tensor:
        array = np.ascontiguousarray(array, dtype=dtype)
        if not array.flags.writeable:  # a crop straight from a PIL image is a read-only view
            array = array.copy()
        tensor = torch.from_numpy(array)
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
