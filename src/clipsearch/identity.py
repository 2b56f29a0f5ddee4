"""Model identity, without torch: ``ModelSpec`` (what a user asked for: a model, its weights, where
and how to run it) and ``ModelIdentity`` (which vector space an encoder's vectors live in).

The store records both for every namespace; the collection compares them before it searches or
writes. Commands that only read the store (``info``, ``failures``, keyword search, ``export``)
import this module and never the encoders, so they never pay for torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


# OpenAI's CLIP weights by open_clip's architecture name: the Hugging Face repository (what
# transformers users send), OpenAI's own name, and the short form other embedding services use
OPENAI_CLIP_NAMES: dict[str, tuple[str, ...]] = {
    "ViT-B-32": ("openai/clip-vit-base-patch32", "ViT-B/32", "clip-vit-b/32"),
    "ViT-B-16": ("openai/clip-vit-base-patch16", "ViT-B/16", "clip-vit-b/16"),
    "ViT-L-14": ("openai/clip-vit-large-patch14", "ViT-L/14", "clip-vit-l/14"),
    "ViT-L-14-336": ("openai/clip-vit-large-patch14-336", "ViT-L/14@336px", "clip-vit-l/14-336"),
}


def is_repo_name(model: str) -> bool:
    """``OWNER/NAME`` without a scheme: a published ONNX repository. open_clip's names have no
    slash (``ViT-B-32``) and its hub form has a scheme (``hf-hub:OWNER/NAME``)."""
    return ":" not in model and model.count("/") == 1 and all(model.split("/"))


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a model name, its pretrained tag, optional local weights, a device."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    weights: Path | None = None
    device: str = "auto"
    runtime: str = "torch"  # torch | onnx
    precision: str = "fp32"  # fp32 | int8 (int8: ONNX Runtime on CPU only)
    decode: str = "fast"  # fast (JPEGs at reduced DCT scale) | exact (full decode)

    @property
    def backend(self) -> str:
        """``hf`` (transformers), ``onnx`` (a tower folder: ``--weights DIR`` in that layout, or a
        published repository named ``OWNER/NAME``, as Immich's) or ``open_clip``."""
        if self.model.startswith("hf:"):
            return "hf"
        if self.weights is None and is_repo_name(self.model):
            return "onnx"
        if self.weights is not None and self.weights.is_dir():
            if (self.weights / "visual" / "model.onnx").is_file() and (self.weights / "config.json").is_file():
                return "onnx"
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

    @property
    def recorded_model(self) -> str:
        """The model name the identity records: a checkpoint folder by its folder's name
        (open_clip's ``local:NAME``, transformers' ``hf:NAME``), unless the model names its hub
        repository (``hf-hub:REPO``, ``hf:REPO``); otherwise the model as given."""
        if self.weights is not None and self.weights.is_dir():
            name = self.weights.resolve().name
            backend = self.backend
            if backend == "hf" and not self.model.startswith("hf:"):
                return f"hf:{name}"
            if backend == "open_clip" and not self.model.startswith("hf-hub:"):
                return f"local:{name}"
        return self.model

    def to_dict(self) -> dict[str, Any]:
        d = {
            "model": self.model,
            "pretrained": self.pretrained,
            "weights": str(self.weights) if self.weights else None,
            "runtime": self.runtime,
            "precision": self.precision,
        }
        if self.decode != "fast":  # recorded specs from before the option stay equal
            d["decode"] = self.decode
        return d

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
            decode=data.get("decode") or "fast",
        )


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that determines which vector space an embedding lives in.

    Two encoders may write to one namespace only if their ``compat_key`` is equal. Runtime,
    float precision and the decode mode are recorded but not compared: fp16 on CUDA and fp32 on
    CPU give the same vectors to ~1e-4, and the fast decode stays close to the exact one (see the
    README). Quantisation changes them more, so it is part of the key. ``weights`` is a digest of
    local weight files (``sha256:…``): two files under one name are two models. Identities
    recorded before digests existed have none and are compared without it.
    """

    backend: str
    model: str
    pretrained: str
    dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"
    precision: str = "fp32"
    quantization: str = "none"
    weights: str = ""  # sha256:… of local weight files; "" for named hub weights
    decode: str = "fast"

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
            "weights": self.weights,
            "decode": self.decode,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def _compared(self) -> dict[str, Any]:
        d = self.as_dict()
        out = {k: d[k] for k in _COMPARED}
        if self.backend == "onnx" and self.weights:
            # a published tower folder is its files: the same files under another name or
            # folder are the same model (its digest decides)
            out["model"] = out["pretrained"] = ""
        # how a crop is rounded shifts it by at most one pixel, like the fast decode: not a space
        out["preprocess"] = {k: v for k, v in d["preprocess"].items() if k != "crop_rounding"}
        return out

    @property
    def compat_key(self) -> str:
        return json.dumps(self._compared(), sort_keys=True)

    def same_space(self, other: ModelIdentity) -> bool:
        """Whether vectors of ``self`` and ``other`` may share a namespace (``compat_key``, with
        a weights digest compared only when both identities have one)."""
        return not self.differences(other)

    @property
    def model_id(self) -> str:
        """Short stable name, e.g. ``ViT-B-32/openai`` or ``hf:openai/clip-vit-base-patch32``."""
        return f"{self.model}/{self.pretrained}" if self.pretrained else self.model

    def public_names(self) -> tuple[str, ...]:
        """The names other services and their clients use for this model, where the identity
        proves it is that model: OpenAI's weights as open_clip runs them (its ``openai`` tag) or
        as transformers loads them from OpenAI's own repository. Never for other weights, even
        of the same architecture."""
        if self.backend == "open_clip" and self.pretrained == "openai":
            return OPENAI_CLIP_NAMES.get(self.model, ())
        if self.backend == "hf":
            for names in OPENAI_CLIP_NAMES.values():
                if self.model.removeprefix("hf:") == names[0]:
                    return names
        return ()

    def describe(self) -> str:
        extra = "" if self.quantization == "none" else f", {self.quantization}"
        if not self.dim:  # an identity known from the request alone (see ``known_differences``)
            return f"{self.backend} {self.model_id}{f' ({extra[2:]})' if extra else ''}"
        return f"{self.backend} {self.model_id} ({self.dim}-d{extra})"

    def differences(self, other: ModelIdentity) -> list[str]:
        """Human-readable list of the compared fields that differ. Where both identities have a
        weights digest, the content decides: the ``pretrained`` tag of a local file
        (``file:NAME``) and the name of a checkpoint folder are labels, and the same bytes under
        another name are the same model."""
        a, b = self._compared(), other._compared()
        if self.weights and other.weights:
            # folder checkpoints are named after their folder (open_clip's ``local:NAME``,
            # transformers' ``hf:NAME``); their digest covers the config that names the
            # architecture. A checkpoint file's model stays compared: it is the architecture.
            labels = all(i.backend == "hf" or i.model.startswith("local:") for i in (self, other))
            for d in (a, b):
                d["pretrained"] = ""
                if labels:
                    d["model"] = ""
        out = [f"{k} {a[k]!r} vs {b[k]!r}" for k in _COMPARED if k != "weights" and a[k] != b[k]]
        if self.weights and other.weights and self.weights != other.weights:
            out.append(f"weights {_short(self.weights)} vs {_short(other.weights)} (other file contents)")
        return out


_COMPARED = ("backend", "model", "pretrained", "dim", "preprocess", "quantization", "weights")


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


# -- weights digests -------------------------------------------------------------------------
# The files of a model folder that decide its vectors (weights, configs, tokenizer files);
# anything else there (a README, a notebook) may change without making another model.
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model", ".gz"})


def weights_digest(path: str | Path) -> str:
    """``sha256:HEX`` of local weights: of the file itself (what ``sha256sum`` prints, and
    what open_clip's download URLs name), or, for a model folder, of the names and digests of
    its weight, config and tokenizer files. Hashing a large checkpoint takes a second or two, so
    each file's digest is cached by its path, size and modification time."""
    path = Path(path).expanduser().resolve()
    cache = _DigestCache()
    if path.is_file():
        digest = cache.file(path)
        cache.save()
        return "sha256:" + digest
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            h.update(f"{rel.as_posix()}\0{cache.file(f.resolve())}\n".encode())
    cache.save()
    return "sha256:" + h.hexdigest()


def folder_digest(folder: str | Path, names: list[str]) -> str:
    """``sha256:HEX`` of the files ``names`` (relative paths) of ``folder``: their names and
    contents, cached like ``weights_digest``."""
    folder = Path(folder).expanduser().resolve()
    cache = _DigestCache()
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{cache.file(folder / name)}\n".encode())
    cache.save()
    return "sha256:" + h.hexdigest()


class _DigestCache:
    """File digests by (path, size, mtime), in the user cache (``digests.json``)."""

    def __init__(self) -> None:
        from .files import JsonCache
        from .settings import Settings

        self.cache = JsonCache(Settings.user_cache() / "digests.json")
        self.known = self.cache.read()
        self.new: dict[str, str] = {}

    def file(self, path: Path) -> str:
        from .files import sha256_file

        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        digest = self.known.get(key)
        if not isinstance(digest, str):
            digest = self.known[key] = self.new[key] = sha256_file(path)
        return digest

    def save(self) -> None:
        if self.new:
            self.cache.update(self.new)
            self.new = {}


# -- what a request proves before anything loads ------------------------------------------
def known_differences(stored: ModelIdentity, spec: ModelSpec) -> tuple[ModelIdentity, list[str]]:
    """What already proves that ``spec`` names another model than the one that made ``stored``,
    without loading it: another backend, another open_clip architecture, another named tag of
    hub weights, another quantisation. Returns the requested model as far as it is known, and
    the differences (none: only loading the model can tell)."""
    backend = spec.backend
    quantization = "int8-dynamic" if spec.precision == "int8" else "none"
    requested = ModelIdentity(
        backend=backend, model=spec.recorded_model, pretrained=spec.pretrained or "", dim=0, quantization=quantization
    )
    out: list[str] = []
    if backend == "onnx" or stored.backend == "onnx":
        return requested, out  # a tower folder's identity comes from its files, read cheaply on load
    if backend != stored.backend:
        out.append(f"backend {stored.backend!r} vs {backend!r}")
    elif backend == "open_clip" and (spec.weights is None or not spec.weights.is_dir()):
        if stored.model != spec.model:
            out.append(f"model {stored.model!r} vs {spec.model!r}")
        elif spec.weights is None and not stored.weights and (spec.pretrained or "") != stored.pretrained:
            out.append(f"pretrained {stored.pretrained!r} vs {spec.pretrained or ''!r}")
    if quantization != stored.quantization:
        out.append(f"quantization {stored.quantization!r} vs {quantization!r}")
    return requested, out
