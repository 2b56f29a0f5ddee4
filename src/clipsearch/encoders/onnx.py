"""ONNX exports: an open_clip or transformers (CLIP, SigLIP) model's image and text towers
exported once from the PyTorch model, into a tower folder (the layout ``towers`` reads, Immich's).

ONNX Runtime's CPU kernels are markedly faster than PyTorch's for these towers on many CPUs
(see ``benchmarks/``). The towers are exported into a cache folder keyed by a digest of the
weights, so a changed checkpoint is exported again and an unchanged one never is; ``towers``
runs the folder (without torch). ``fp32`` gives the PyTorch vectors (a test holds them to cosine
>= 0.99999, so they may share a namespace); ``int8`` applies ONNX Runtime's dynamic quantisation
to the image tower's weights (the text tower stays fp32, see ``towers.tower_file``) and is a
separate model identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError, option
from ..files import write_atomic
from ..identity import ModelIdentity, ModelSpec
from ..imaging import PreprocessSpec
from .interface import Encoder
from .openclip import OpenClipEncoder, encode_text_cut
from .towers import (
    EXPORT_VERSION,
    META,
    TowerEncoder,
    cache_root,
    import_ort,
    move_model,
    quantize,
    register_export,
    tower_file,
)


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


def _export(module: torch.nn.Module, example: torch.Tensor, dims: dict[int, Any], path: Path, name: str) -> None:
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
                # the input names Immich's towers take; the output is read by position (the
                # exporter names an inner node "embedding", Immich's output name)
                input_names=[name],
                output_names=["embeddings"],
                verbose=False,
            )
        # Weights in a file of their own: ONNX Runtime maps it instead of copying it out of the
        # protobuf, which halves a query's memory and load time (see towers).
        program.save(str(out), external_data=True)
        move_model(out, path)


def _portable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config without the local paths a folder checkpoint names its text model by
    (an export is a folder you can move): such a name keeps only its last part."""
    cfg = json.loads(json.dumps(cfg))
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if isinstance(text.get(key), str) and os.path.isabs(text[key]):
            text[key] = Path(text[key]).name
    return cfg


def prepare(base: OpenClipEncoder, precision: str) -> Path:
    """The cache folder holding this model's exported towers (exported now if missing), in the
    tower layout (``towers``)."""
    model = base.model
    folder = cache_root() / weights_digest(model, base.identity)
    h, w = base.preprocess_spec.size
    meta = folder / META
    _export_image_tower(folder, model, lambda m, x: m.encode_image(x), (h, w))
    if not (folder / tower_file("text", "fp32")).is_file():
        ctx = int(getattr(model, "context_length", 77))
        example = base.tokenizer(["a photo", "an example text"])
        batch = torch.export.Dim("batch", min=1, max=4096)
        if base.trim_text_padding:
            n = int(example.argmax(dim=-1).max()) + 1
            length = torch.export.Dim("length", min=2, max=ctx)
            # open_clip's causal text tower on tokens already cut to the batch's longest sequence
            _export(
                _Tower(model, encode_text_cut),
                example[:, : max(n, 3)],
                {0: batch, 1: length},
                folder / tower_file("text", "fp32"),
                "text",
            )
        else:
            _export(
                _Tower(model, lambda m, x: m.encode_text(x)),
                example,
                {0: batch},
                folder / tower_file("text", "fp32"),
                "text",
            )
    if precision == "int8" and not (folder / tower_file("image", "int8")).is_file():
        quantize(folder)
    if not meta.is_file():
        config = _portable_config(base.model_cfg or {})
        config["embed_dim"] = base.dim
        # the tokenizer's length: the text tower's own may be longer (an XLM-RoBERTa's positions)
        ctx = getattr(base.tokenizer, "context_length", None) or getattr(model, "context_length", 77)
        config.setdefault("text_cfg", {})["context_length"] = int(ctx)
        text = {
            "trim": base.trim_text_padding,
            "pool": getattr(model, "text_pool_type", None),
            "eos_id": getattr(model, "text_eos_id", None),
            "pad_id": getattr(base.tokenizer, "pad_token_id", None) or 0,
            "clean": _write_tokenizer(base, folder / "textual"),
        }
        _write_configs(folder, base, config, text)
    return folder


def _write_configs(folder: Path, base: Encoder, config: dict[str, Any], text: dict[str, Any]) -> None:
    """The files beside the towers: the preprocessing, the model config, and ``clipsearch.json``
    (the identity and how texts are pooled), written last since its presence means ready."""
    preprocess = {"mode": "RGB", **base.identity.preprocess}
    write_atomic(folder / "visual" / "preprocess_cfg.json", json.dumps(preprocess, indent=1), mode=0o644)
    write_atomic(folder / "config.json", json.dumps(config, indent=1), mode=0o644)
    model_meta = {
        "identity": base.identity.as_dict(),
        "export_version": EXPORT_VERSION,
        "image_tokens": base.image_tokens,
        "text": text,
    }
    write_atomic(folder / META, json.dumps(model_meta, indent=1), mode=0o644)


def _export_image_tower(
    folder: Path, model: Any, features: Callable[[Any, torch.Tensor], torch.Tensor], size: tuple[int, int]
) -> None:
    """The fp32 image tower, any batch, unless the folder has it."""
    if not (folder / tower_file("image", "fp32")).is_file():
        _export(
            _Tower(model, features),
            torch.zeros(2, 3, *size),
            {0: torch.export.Dim("batch", min=1, max=4096)},
            folder / tower_file("image", "fp32"),
            "image",
        )


_CLEANERS = {"_clean_lower": "lower", "_clean_whitespace": "whitespace", "_clean_canonicalize": "canonicalize"}
_TOKENIZER_CHECK = [
    "a photo of a cat",
    "東京の夜景、ネオン",
    "바닷가의 강아지",
    "&amp; don't <b>STOP</b> 🐶",
    "word " * 90,
]


def _write_tokenizer(base: OpenClipEncoder, textual: Path) -> str | None:
    """``tokenizer.json`` and ``tokenizer_config.json`` in ``textual``, so that queries can run
    without torch: CLIP's BPE written from open_clip's own vocabulary and merges, or a Hugging
    Face tokenizer as it saves itself. Kept only if it gives the model's own tokens on texts of
    several scripts; returns the text cleaning it was checked with (None: no tokenizer)."""
    from ..tokenizer import TextTokenizer, clip_tokenizer_json

    tok = base.tokenizer
    clean = _CLEANERS.get(getattr(getattr(tok, "clean_fn", None), "__name__", ""))
    if clean is None or getattr(tok, "reduction_fn", None) is not None:
        return None
    if type(tok).__name__ == "SimpleTokenizer":
        merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
        specials = [tok.decoder[i] for i in tok.all_special_ids]
        pad_id = int(getattr(tok, "pad_token_id", None) or 0)
        clip_tokenizer_json(textual, tok.encoder, merges, specials, tok.decoder[pad_id], lower=clean == "lower")
    elif type(tok).__name__ == "HFTokenizer" and getattr(tok, "tokenizer_mode", "") == "":
        textual.mkdir(parents=True, exist_ok=True)
        tok.tokenizer.save_pretrained(str(textual))
        if not (textual / "tokenizer.json").is_file():
            return None
    else:
        return None
    ctx = int(tok.context_length)
    ours = TextTokenizer(textual, ctx, clean, strip_sep=bool(getattr(tok, "strip_sep_token", False)))
    if np.array_equal(ours(_TOKENIZER_CHECK), tok(_TOKENIZER_CHECK).numpy()):
        return clean
    (textual / "tokenizer.json").unlink()
    return None


def prepare_hf(base: Any, precision: str) -> Path:
    """The cache folder holding a transformers model's exported towers (exported now if
    missing). Its tokenizer is saved as transformers saves it and must give the model's own ids
    without cleaning the text first (``clean: none``): otherwise the text tower could not run
    without torch, and the export is refused."""
    from .hf import _features

    model = base.model
    folder = cache_root() / weights_digest(model, base.identity)
    h, w = PreprocessSpec.from_dict(base.identity.preprocess).size
    ctx = base.text_length
    config = model.config
    # transformers' CLIP pools the first end-of-text token, or the largest id where the config
    # keeps the legacy eos id 2 (OpenAI's checkpoints); SigLIP reads every position of a text
    # padded to its full length
    eos = int(getattr(config.text_config, "eos_token_id", 2) or 2)
    pool = None if base.pads_text_to_length else ("argmax" if eos == 2 else "eos")
    _export_image_tower(folder, model, lambda m, x: _features(m.get_image_features(pixel_values=x)), (h, w))
    textual = folder / "textual"
    if not (folder / tower_file("text", "fp32")).is_file():
        ids = base.tokenizer(["a photo", "an example text"], return_tensors="pt", **base._text_kwargs)["input_ids"]
        dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
        if pool is not None:  # a causal tower: any length up to the context, cut per batch
            dims[1] = torch.export.Dim("length", min=2, max=ctx)
            ids = torch.cat([ids, torch.full((2, 2), int(base.tokenizer.pad_token_id or 0))], dim=1)
        _export(
            _Tower(model, lambda m, x: _features(m.get_text_features(input_ids=x))),
            ids,
            dims,
            folder / tower_file("text", "fp32"),
            "text",
        )
    if precision == "int8" and not (folder / tower_file("image", "int8")).is_file():
        quantize(folder)
    if not (folder / META).is_file():
        clean = _save_hf_tokenizer(base.tokenizer, textual, ctx)
        if clean is None:
            raise UsageError(
                f"{base.identity.model_id}: its tokenizer does not save as a tokenizer.json that gives the model's "
                f"own ids, so its text tower cannot run without torch; run it with {option('runtime')} torch",
                param="model",
            )
        portable = {
            "embed_dim": base.dim,
            "model_type": config.model_type,
            "vision_cfg": {"image_size": h},
            "text_cfg": {"context_length": ctx},
        }
        text = {
            "trim": pool is not None,
            "pool": pool,
            "eos_id": eos,
            "pad_id": int(base.tokenizer.pad_token_id or 0),
            "clean": clean,
        }
        _write_configs(folder, base, portable, text)
    return folder


def _save_hf_tokenizer(tok: Any, textual: Path, ctx: int) -> str | None:
    """A transformers tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` in
    ``textual``; returns the text cleaning with which it gives ``tok``'s own ids on texts of
    several scripts, or None (then no ``tokenizer.json`` is left). A fast tokenizer saves its
    own; SigLIP's SentencePiece tokenizer has no fast twin in transformers, so its model is
    converted (a Unigram with SentencePiece's normalisation, then ``</s>``), and its Python
    canonicalisation is the ``siglip`` cleaning."""
    from ..tokenizer import TextTokenizer

    textual.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(textual))
    if not (textual / "tokenizer.json").is_file() and type(tok).__name__ == "SiglipTokenizer":
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import SpmConverter

        converted = SpmConverter(tok).converted()
        eos = str(tok.eos_token)
        converted.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, int(tok.eos_token_id))]
        )
        converted.save(str(textual / "tokenizer.json"))
    if not (textual / "tokenizer.json").is_file():
        return None
    # the sides it pads and truncates on can be class defaults that save_pretrained leaves out
    # (Gemma's tokenizer pads on the left): written down for the tokenizer that reads the folder
    config_path = textual / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(padding_side=tok.padding_side, truncation_side=tok.truncation_side)
    config_path.write_text(json.dumps(config, indent=1, ensure_ascii=False))
    theirs = tok(_TOKENIZER_CHECK, padding="max_length", max_length=ctx, truncation=True)["input_ids"]
    for clean in ("none", "siglip"):
        if np.array_equal(TextTokenizer(textual, ctx, clean)(_TOKENIZER_CHECK), np.asarray(theirs)):
            return clean
    (textual / "tokenizer.json").unlink()
    return None


def load(spec: ModelSpec, base: Encoder, spin: bool = True) -> TowerEncoder:
    """``base`` loaded on the CPU; ``load_encoder`` has checked runtime, precision and device."""
    import_ort()
    if not isinstance(base, OpenClipEncoder):  # a transformers checkpoint (hf.HFEncoder)
        folder = prepare_hf(base, spec.precision)
        towers = TowerEncoder(folder, spec.precision, spin=spin)
        towers.notes = base.notes
        return towers
    folder = prepare(base, spec.precision)
    register_export(spec, folder)
    tokenize = None
    if not (folder / "textual" / "tokenizer.json").is_file():  # another tokenizer: the model's own, through torch
        tokenizer = base.tokenizer
        tokenize = lambda texts: tokenizer(texts).numpy()  # noqa: E731
    towers = TowerEncoder(folder, spec.precision, spin=spin, tokenize=tokenize)
    towers.notes = base.notes
    return towers
