"""Text towers' tokenizers without torch: Hugging Face ``tokenizers`` over a ``tokenizer.json``,
with open_clip's own text cleaning in front, so that queries need neither torch nor open_clip.

A tower folder (``encoders.towers``) keeps its tokenizer as Hugging Face saves one
(``textual/tokenizer.json`` and ``textual/tokenizer_config.json``), the layout Immich publishes.
open_clip cleans a text before it tokenises it (ftfy, HTML entities, white space, and lower case
for its CLIP tokenizer, or ``canonicalize`` for SigLIP's); ``clean_text`` does the same here, so
the ids equal open_clip's (a test compares them on English, Japanese, Korean, emoji, HTML
entities and texts longer than the context). ``clip_tokenizer_json`` writes CLIP's byte-level BPE
(open_clip's ``SimpleTokenizer``) in that format, for exports of models that use it.
"""

from __future__ import annotations

import functools
import html
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# "none": the text as given (a transformers tokenizer normalises it itself); "siglip": as
# transformers' SiglipTokenizer canonicalises it before SentencePiece
CLEANERS = ("lower", "whitespace", "canonicalize", "none", "siglip")
# CLIP's pre-tokenising pattern (open_clip's SimpleTokenizer, OpenAI's clip)
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# No token of a text tower spans this many characters that are not white space (the longest
# vocabulary entries are a few dozen; an HTML entity cleans to one character), so a text's first
# ``context_length`` tokens lie within its first ``context_length * CHARS_PER_TOKEN`` of them.
CHARS_PER_TOKEN = 64


def bounded_text(text: str, context_length: int) -> str:
    """The start of ``text`` that holds every token a tower of ``context_length`` reads: the
    work of cleaning and tokenising a text is bounded by the context, not by the text (a 30 MB
    string took a minute and held every other text back). Texts that are not longer than the
    bound come back as they are."""
    limit = context_length * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    match = _first_non_space(limit).match(text)
    return text[: match.end()] if match else text


@functools.cache
def _first_non_space(count: int) -> re.Pattern[str]:
    return re.compile(rf"(?:\s*\S){{{count}}}")


def clean_text(text: str, mode: str) -> str:
    """open_clip's cleaning: ``lower`` (its CLIP tokenizer), ``whitespace`` (its Hugging Face
    tokenizers' default) or ``canonicalize`` (SigLIP: no punctuation, lower case); ``none``
    leaves it as it is, as transformers' tokenizers take it; ``siglip`` is transformers'
    SiglipTokenizer's own (lower case, punctuation removed, white space collapsed: no ftfy and no
    HTML entities, unlike open_clip's ``canonicalize``)."""
    if mode == "none":
        return text
    if mode == "siglip":
        text = text.lower().translate(str.maketrans("", "", string.punctuation))
        return " ".join(text.split())
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        return " ".join(text.split()).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


def _fix_text(text: str) -> str:
    """ftfy's repair, without importing ftfy (130 ms of a cold query) for printable ASCII
    without entities, which it leaves as it is (tests/unit/test_tokenizer.py holds it to that)."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text
    import ftfy

    return ftfy.fix_text(text)


class TextTokenizer:
    """``tokenizer(texts) -> int64 (n, context_length)``, padded with the pad id, truncated as the
    model's reference truncates (the end-of-text token kept last)."""

    def __init__(self, folder: Path, context_length: int, clean: str, *, strip_sep: bool = False):
        from tokenizers import Tokenizer

        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}")
        self.clean = clean
        self.context_length = context_length
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        pad = _token_text(config.get("pad_token"))
        pad_id = self._tokenizer.token_to_id(pad) if pad is not None else None
        self.pad_id = int(pad_id) if pad_id is not None else 0
        # the sides transformers pads and truncates on, as its tokenizer_config.json says
        # (Gemma's tokenizer, SigLIP 2's, pads on the left)
        self._tokenizer.enable_truncation(max_length=context_length, direction=_side(config.get("truncation_side")))
        self._tokenizer.enable_padding(
            length=context_length,
            pad_id=self.pad_id,
            pad_token=pad or "",
            direction=_side(config.get("padding_side")),
        )
        # open_clip's ``strip_sep_token``: the separator becomes padding
        sep = _token_text(config.get("sep_token")) if strip_sep else None
        self._sep_id = self._tokenizer.token_to_id(sep) if sep else None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self._tokenizer.encode_batch([clean_text(str(t), self.clean) for t in texts])
        ids = np.asarray([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), self.context_length)
        if self._sep_id is not None:
            ids[ids == self._sep_id] = self.pad_id
        return ids

    def counts(self, tokens: np.ndarray) -> list[int]:
        """Tokens each row occupies (special tokens included), as the server reports usage."""
        return (tokens != self.pad_id).sum(axis=1).tolist()


def _side(value: Any) -> str:
    return "left" if value == "left" else "right"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return token if isinstance(token, str) else None


def clip_tokenizer_json(
    folder: Path,
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    special_tokens: Sequence[str],
    pad_token: str,
    lower: bool,
) -> None:
    """Write CLIP's byte-level BPE as ``tokenizer.json`` + ``tokenizer_config.json`` in
    ``folder``: ``vocab`` and ``merges`` as open_clip's SimpleTokenizer holds them,
    ``special_tokens`` its start and end of text, ``pad_token`` the token whose id pads."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sot, eot = special_tokens[0], special_tokens[1]
    bpe = models.BPE(
        vocab=dict(vocab), merges=list(merges), continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False
    )
    tokenizer = Tokenizer(bpe)
    steps = [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")]
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Lowercase()] if lower else steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, vocab[sot]), (eot, vocab[eot])]
    )
    tokenizer.add_special_tokens(list(special_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": sot, "eos_token": eot, "pad_token": pad_token, "unk_token": eot}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
