"""Hugging Face ``transformers`` backend: CLIP, SigLIP and fixed-resolution SigLIP 2 checkpoints
(``--model hf:REPO``).

Preprocessing is read from the checkpoint's ``preprocessor_config.json`` (or the
``processor_config.json`` that transformers 5's ``save_pretrained`` writes) and done by our own
imaging module with the processors' geometry (short edge to ``shortest_edge``, centre crop
starting at the floor of the margin), so no transformers image processor (nor torchvision) runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._compat import ensure_torchvision_importable
from ..errors import MissingExtraError, MissingWeightsError, UsageError, option
from ..identity import weights_digest
from ..imaging import Preprocessor, PreprocessSpec
from ..tokenizer import bounded_text
from . import hub
from .base import ModelIdentity, ModelSpec, TorchEncoder, resolve_device

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# SigLIP 2 at a fixed resolution (google/siglip2-base-patch16-224 and the like) is model_type
# siglip with a Gemma tokenizer; the NaFlex variants (model_type siglip2) take patch sequences
# of a variable resolution, which the image pipeline here does not make
_SUPPORTED_TYPES = ("clip", "siglip")


class HFEncoder(TorchEncoder):
    def __init__(self, model: Any, tokenizer: Any, identity: ModelIdentity, device: torch.device):
        super().__init__(identity, Preprocessor(PreprocessSpec.from_dict(identity.preprocess)), device)
        self.model = model
        self.tokenizer = tokenizer
        model_type = model.config.model_type
        if model_type.startswith("siglip"):
            # SigLIP was trained on text padded to a fixed length; its pooling reads every position.
            self._text_kwargs = {
                "padding": "max_length",
                "max_length": _text_max_length(model),
                "truncation": True,
            }
        else:
            # CLIP's text tower is causal and pools the end-of-text token: padding can stop at
            # the longest text of the batch without changing any vector.
            self._text_kwargs = {"padding": True, "max_length": _text_max_length(model), "truncation": True}

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        texts = [bounded_text(t, self.text_length) for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", **self._text_kwargs)
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc and not self.model.config.model_type.startswith("siglip"):
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        return _features(self.model.get_text_features(**kwargs))

    @property
    def text_length(self) -> int:
        """The longest token sequence the text tower takes (SigLIP: every text is padded to it)."""
        return int(self._text_kwargs["max_length"])

    @property
    def pads_text_to_length(self) -> bool:
        return self._text_kwargs["padding"] == "max_length"

    def count_tokens(self, texts: list[str]) -> list[int]:
        kwargs = {k: v for k, v in self._text_kwargs.items() if k != "padding"}
        enc = self.tokenizer([bounded_text(str(t), self.text_length) for t in texts], **kwargs)
        return [len(ids) for ids in enc["input_ids"]]

    @property
    def image_tokens(self) -> int:
        vc = self.model.config.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1


def _features(out: Any) -> torch.Tensor:
    # transformers 4.x returns the projected tensor; 5.x a model output whose pooler_output it is.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text_max_length(model: Any) -> int:
    return int(model.config.text_config.max_position_embeddings)


def load(spec: ModelSpec, *, fast_cpu: bool = True) -> HFEncoder:
    """``spec``'s checkpoint; ``fast_cpu``: run its matrix products on oneDNN where that gives
    the same vectors (off for an export, which traces the model as it is)."""
    device = resolve_device(spec.device)
    ensure_torchvision_importable()  # transformers' model modules import torchvision
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("the transformers backend (hf:)", "hf") from None

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our CLI shows its own progress
    repo = spec.model.removeprefix("hf:")
    if spec.weights is not None:
        folder = spec.weights
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(
                f"{option('weights')} {folder} is not a transformers model folder (no config.json); save one with "
                "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
            )
        label = spec.recorded_model
    else:
        if not repo:
            raise UsageError(f"{option('model')} hf: needs a repository name, e.g. hf:openai/clip-vit-base-patch32")
        folder = hub.snapshot_or_fetch(repo, _WEIGHT_PATTERNS, "config.json", f"transformers model {repo}")
        label = spec.model

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type == "siglip2":
        raise UsageError(
            f"{label} is a SigLIP 2 NaFlex checkpoint (model_type siglip2: variable resolution, patch inputs), "
            "which clipsearch does not run; use a fixed-resolution SigLIP 2 checkpoint such as "
            "hf:google/siglip2-base-patch16-224 (model_type siglip)"
        )
    if model_type not in _SUPPORTED_TYPES:
        raise UsageError(
            f"{label} is a {model_type or 'unknown'!r} model; the transformers backend supports "
            f"{', '.join(_SUPPORTED_TYPES)} checkpoints"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        model = transformers.AutoModel.from_pretrained(folder, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingWeightsError(f"could not load {label} from {folder}: {first[:300]}") from None
    model.to(device).eval()

    preprocess = _preprocess_spec(folder, model, label)
    dim = int(model.config.projection_dim) if hasattr(model.config, "projection_dim") else 0
    if not dim:
        dim = int(model.config.text_config.hidden_size)
    identity = ModelIdentity(
        backend="hf",
        model=label,
        pretrained="",
        dim=dim,
        preprocess=preprocess.to_dict(),
        precision="fp16" if dtype == torch.float16 else "fp32",
        weights=weights_digest(folder),
    )
    encoder = HFEncoder(model, tokenizer, identity, device)
    if fast_cpu:
        encoder.use_onednn()
    return encoder


def image_processor_config(folder: Path, label: str) -> dict[str, Any]:
    """The image processor's settings: ``preprocessor_config.json``, else the ``image_processor``
    part of ``processor_config.json`` (transformers 5 writes only that one). Without either, the
    mean, std, size and resampling would be guesses, and wrong guesses cost accuracy silently:
    refused."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise MissingWeightsError(f"{label}: {path} is not valid JSON ({e})") from None
        if name == "processor_config.json":
            cfg = cfg.get("image_processor") or {}
        if cfg:
            return cfg
    raise MissingWeightsError(
        f"{label} has no image processor settings ({folder} holds neither preprocessor_config.json nor "
        "processor_config.json); save the model's processor beside it: "
        "AutoProcessor.from_pretrained(REPO).save_pretrained(DIR)"
    )


def _preprocess_spec(folder: Path, model: Any, label: str) -> PreprocessSpec:
    """Translate a transformers image processor config into our PreprocessSpec."""
    cfg = image_processor_config(folder, label)
    image_size = int(model.config.vision_config.image_size)
    size = cfg.get("size", {"shortest_edge": image_size})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = cfg.get("crop_size", size)
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    resize_edge = 0
    if "shortest_edge" in size and cfg.get("do_center_crop", True):
        target = (int(crop.get("height", image_size)), int(crop.get("width", image_size)))
        mode = "shortest"
        edge = int(size["shortest_edge"])
        if (edge, edge) != target:
            resize_edge = edge
    elif "height" in size:
        target, mode = (int(size["height"]), int(size["width"])), "squash"
    else:
        edge = int(size.get("shortest_edge", image_size))
        target, mode = (edge, edge), "squash"
    return PreprocessSpec(
        size=target,
        mean=tuple(cfg.get("image_mean", PreprocessSpec.mean)),  # type: ignore[arg-type]
        std=tuple(cfg.get("image_std", PreprocessSpec.std)),  # type: ignore[arg-type]
        interpolation=_PIL_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"),
        resize_mode=mode,
        resize_edge=resize_edge,
        crop_rounding="floor",  # transformers' center_crop: (size - crop) // 2
    )
