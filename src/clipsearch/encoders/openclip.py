"""OpenCLIP backend: any open_clip architecture with a pretrained tag, a hub repo or local weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._compat import import_open_clip
from ..errors import MissingWeightsError, UsageError, Wording, option
from ..identity import weights_digest
from ..imaging import Preprocessor, PreprocessSpec
from ..tokenizer import bounded_text
from . import hub
from .base import ModelIdentity, ModelSpec, TorchEncoder, normalize, resolve_device

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
_WEIGHT_PATTERNS = [
    "open_clip_config.json",
    "*.safetensors",
    "open_clip_pytorch_model.bin",
    "*.json",
    "*.txt",
]


class OpenClipEncoder(TorchEncoder):
    def __init__(self, model: Any, tokenizer: Any, identity: ModelIdentity, device: torch.device):
        spec = PreprocessSpec.from_dict(identity.preprocess)
        super().__init__(identity, Preprocessor(spec), device)
        self.model = model
        self.tokenizer = tokenizer
        self.trim_text_padding = _can_trim_padding(model)
        # open_clip's model config (embed_dim, vision_cfg, text_cfg), written beside an export
        self.model_cfg: dict[str, Any] = {}

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self._token_features(self.tokenizer(texts))

    def _token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if self.trim_text_padding:
            return _encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return count_tokens(self.tokenizer, self._bounded(texts))

    def _bounded(self, texts: Sequence[str]) -> list[str]:
        context = int(getattr(self.tokenizer, "context_length", 77))
        return [bounded_text(str(t), context) for t in texts]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_texts_counted(texts)[0]

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        texts = self._bounded(texts)
        vectors, counts = [], []
        with torch.inference_mode():
            for i in range(0, len(texts), self.text_batch_size):
                tokens = self.tokenizer(texts[i : i + self.text_batch_size])
                counts += token_counts(self.tokenizer, tokens)
                vectors.append(normalize(self._token_features(tokens)))
        if not vectors:
            return np.zeros((0, self.dim), np.float32), []
        return np.concatenate(vectors), counts

    @property
    def image_tokens(self) -> int:
        grid = getattr(self.model.visual, "grid_size", None)
        if isinstance(grid, tuple | list) and len(grid) == 2:
            return int(grid[0]) * int(grid[1]) + 1
        return 0


def _can_trim_padding(model: Any) -> bool:
    """True for open_clip's built-in causal text tower that pools the end-of-text token.

    With a causal mask, no real token attends to a padding position, and pooling reads the
    end-of-text position: so every position after the longest real sequence in a batch can be
    cut without changing any vector (a test checks this against the padded output). SigLIP-style
    towers (no causal mask, or pooling the last or first position) read the padding and keep it.
    """
    return (
        type(model).__name__ == "CLIP"
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and hasattr(model, "positional_embedding")
    )


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Non-padding tokens of each text, special tokens included, after truncation."""
    return token_counts(tokenizer, tokenizer([str(t) for t in texts]))


def token_counts(tokenizer: Any, tokens: torch.Tensor) -> list[int]:
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    return (tokens != pad).sum(dim=-1).tolist()


def _text_ends(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Position of each sequence's end-of-text token, the one the tower pools."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)  # the end-of-text token has the highest id
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def trim_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens cut after the longest real sequence of the batch."""
    return tokens[:, : int(_text_ends(model, tokens).max()) + 1]


def encode_text_cut(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` for tokens of any length up to the context (already cut). Shapes
    come from the input only, so the ONNX export of this function keeps a dynamic length."""
    n = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), _text_ends(model, tokens)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut to the longest real sequence of the batch."""
    return encode_text_cut(model, trim_tokens(model, tokens))


def load(spec: ModelSpec, *, fast_cpu: bool = True) -> OpenClipEncoder:
    """``fast_cpu``: swap in oneDNN kernels on the CPU (not wanted when the model is only the
    source of an ONNX export)."""
    device = resolve_device(spec.device)
    open_clip = import_open_clip()
    precision = "fp16" if device.type == "cuda" else "fp32"
    weights = spec.weights

    if weights is not None and not weights.exists():
        raise MissingWeightsError(
            f"{option('weights')} {weights} does not exist; give a checkpoint file or a folder in open_clip's hub "
            "layout (open_clip_config.json + weights)"
        )

    notes: list[str] = []
    if weights is not None and weights.is_dir():
        model_name = f"local-dir:{weights}"
        model = _create(open_clip, model_name, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(model_name)
        model_cfg = _folder_config(weights)
        label = spec.recorded_model
        pretrained, digest = "", weights_digest(weights)
    elif spec.model.startswith("hf-hub:"):
        repo = spec.model.removeprefix("hf-hub:")
        folder = hub.snapshot_or_fetch(repo, _WEIGHT_PATTERNS, "open_clip_config.json", f"open_clip {spec.model}")
        model_name = f"local-dir:{folder}"
        model = _create(open_clip, model_name, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(model_name)
        model_cfg = _folder_config(folder)
        label, pretrained, digest = spec.model, "", weights_digest(folder)
    else:
        name = spec.model
        if name not in open_clip.list_models():
            raise UsageError(
                f"open_clip has no model {name!r}; use one of open_clip.list_models() (e.g. ViT-B-32, "
                "ViT-B-16, ViT-L-14), hf-hub:ORG/REPO, or hf:REPO for a transformers checkpoint"
            )
        tag = spec.pretrained or ""
        digest = weights_digest(weights) if weights is not None else ""
        if weights is not None and not tag:
            tag = _recognise(open_clip, name, weights, digest)
            notes.append(_activation_note(open_clip, name, weights, tag))
        tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
        if weights is not None:
            checkpoint = str(weights)
        elif not tag_cfg:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise UsageError(
                f"open_clip has no pretrained weights {tag!r} for {name} (known: {known}); "
                f"or give your own checkpoint with {option('weights')} PATH"
            )
        else:
            checkpoint = _tag_checkpoint(open_clip, name, tag, tag_cfg)
            digest = weights_digest(checkpoint)
        preprocess_overrides = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
        model = _create(
            open_clip,
            name,
            pretrained=checkpoint,
            device=device,
            precision=precision,
            # open_clip only warns when a tag was trained with QuickGELU and the config lacks it;
            # the resulting vectors would be subtly wrong, so follow the tag.
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_preprocess_cfg=preprocess_overrides,
        )
        tokenizer = open_clip.get_tokenizer(name)
        model_cfg = dict(open_clip.get_model_config(name) or {})
        if tag_cfg.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
        label, pretrained = name, tag or f"file:{Path(checkpoint).name}"

    model.eval()
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    dim = _embed_dim(model)
    identity = ModelIdentity(
        backend="open_clip",
        model=label,
        pretrained=pretrained,
        dim=dim,
        preprocess=PreprocessSpec.from_dict(preprocess_cfg).to_dict(),
        precision=precision,
        weights=digest,
    )
    encoder = OpenClipEncoder(model, tokenizer, identity, device)
    encoder.notes = tuple(notes)
    encoder.model_cfg = model_cfg
    if fast_cpu:
        encoder.use_onednn()
    return encoder


def _folder_config(folder: Path) -> dict[str, Any]:
    """The model config of a folder in open_clip's hub layout."""
    import json

    return dict(json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {}))


def _recognise(open_clip: Any, name: str, weights: Path, digest: str) -> str:
    """The pretrained tag of ``name`` whose published checkpoint ``weights`` is, or "": by the
    checksum open_clip's download URL carries (OpenAI's full SHA-256, open_clip's releases a
    prefix), or by the Hugging Face cache folder the file sits in."""
    sha = digest.removeprefix("sha256:")
    resolved = str(weights.expanduser().resolve())
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        url = cfg.get("url", "")
        if "openaipublic" in url and sha == url.split("/")[-2]:
            return tag
        if "mlfoundations" in url:
            prefix = os.path.splitext(os.path.basename(url))[0].split("-")[-1]
            if len(prefix) >= 8 and sha.startswith(prefix):
                return tag
        repo = cfg.get("hf_hub", "").strip("/")
        if repo and f"/models--{repo.replace('/', '--')}/" in resolved:
            return tag
    return ""


def _activation_note(open_clip: Any, name: str, weights: Path, tag: str) -> Wording:
    """Which activation a checkpoint file given without a pretrained tag runs with, and why."""
    given, tagged = option("weights"), option("pretrained")
    if tag:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        act = "QuickGELU" if cfg.get("quick_gelu") else "GELU"
        return Wording(f"{given} {weights.name} is {name} '{tag}' (recognised by its checksum): {act} activation")
    quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu"))
    act, other = ("QuickGELU", "GELU") if quick else ("GELU", "QuickGELU")
    return Wording(
        f"{given} {weights.name}: no {tagged} tag, so {name}'s own config applies ({act} activation); "
        f"for weights trained with {other} (OpenAI's are QuickGELU) name their tag, e.g. {tagged} openai"
    )


def _create(open_clip: Any, name: str, **kwargs: Any) -> Any:
    try:
        return open_clip.create_model(name, **kwargs)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingWeightsError(f"could not load open_clip model {name}: {first[:300]}") from None


def _tag_checkpoint(open_clip: Any, name: str, tag: str, cfg: dict[str, Any]) -> str:
    """Local path of a pretrained tag's checkpoint: cached, freshly downloaded, or an error."""
    from open_clip.pretrained import download_pretrained

    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename.replace(".bin", ".safetensors"), "open_clip_model.safetensors", filename]
        cached = hub.hub_file(repo, list(dict.fromkeys(candidates)))
        if cached:
            return cached
        where = f"the Hugging Face cache ({hub.hub_cache_dir()}/models--{repo.replace('/', '--')})"
        url = hub.hub_endpoint()
    else:
        url = cfg.get("url", "")
        cached_file = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached_file.is_file():
            return str(cached_file)
        where = str(cached_file)
    return str(hub.fetch_or_explain(f"open_clip {name} '{tag}'", where, url, lambda: download_pretrained(cfg)))


def _embed_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Parameter | torch.Tensor):
        return int(proj.shape[-1])
    with torch.inference_mode():
        size = model.visual.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        param = next(model.parameters())
        dummy = torch.zeros((1, 3, *size), dtype=param.dtype, device=param.device)
        return int(model.encode_image(dummy).shape[-1])
