"""CLIP's byte-level BPE tokenizer in plain Python and numpy, for queries that run without torch.

It gives exactly the token ids of open_clip's ``SimpleTokenizer`` (a test compares them on
English, Japanese, Korean, emoji, HTML entities, mojibake and texts longer than the context):
the same text cleaning (ftfy, HTML unescaping, whitespace, lower case), the same pre-tokenising
pattern, the same merges, and the same truncation (the last kept position becomes end-of-text).
The merges come from the file open_clip ships, copied beside each ONNX export
(``TokenizerConfig``), so a query needs neither torch nor open_clip.
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

# open_clip's merges file holds a version line, then 48,894 merges (49,152 minus the 256 byte
# tokens and the two special tokens); only those are part of the vocabulary.
_MERGES = 49152 - 256 - 2
CLEANERS = ("lower", "whitespace", "canonicalize")


@dataclass(frozen=True)
class TokenizerConfig:
    """What a text tower expects: written as ``tokenizer.json`` beside an export."""

    merges_file: str  # gzip text, one merge per line, as open_clip ships it (relative to the export)
    context_length: int = 77
    clean: str = "lower"
    special_tokens: tuple[str, ...] = ("<start_of_text>", "<end_of_text>")
    pad_id: int = 0
    extra: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        data = asdict(self)
        data["special_tokens"] = list(self.special_tokens)
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> TokenizerConfig:
        data = json.loads(path.read_text())
        data["special_tokens"] = tuple(data.get("special_tokens") or cls.special_tokens)
        return cls(**data)


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Each byte's printable stand-in: printable Latin-1 bytes stand for themselves, the others
    take the code points from 256 on, in order (GPT-2's reversible table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ClipTokenizer:
    """``tokenizer(texts) -> int64 (n, context_length)``, zero-padded, like open_clip's."""

    def __init__(self, config: TokenizerConfig, root: Path | None = None):
        import regex

        self.config = config
        if config.clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {config.clean!r}")
        path = Path(config.merges_file)
        if root is not None and not path.is_absolute():
            path = root / path
        with gzip.open(path) as stream:
            lines = stream.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        alphabet = list(byte_alphabet().values())
        vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), *config.special_tokens]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot_id = self.ids[config.special_tokens[0]]
        self.eot_id = self.ids[config.special_tokens[1]]
        self.context_length = config.context_length
        self.pad_id = config.pad_id
        self._specials = set(config.special_tokens)
        specials = "|".join(regex.escape(t) for t in config.special_tokens)
        self._pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._bytes = byte_alphabet()
        self._cache: dict[str, list[int]] = {}

    def clean(self, text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        if self.config.clean == "canonicalize":
            import string

            text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
            return " ".join(text.split()).strip()
        text = " ".join(text.split()).strip()
        return text.lower() if self.config.clean == "lower" else text

    def _word_ids(self, word: str) -> list[int]:
        """The ids of one pre-token: its bytes' stand-ins, merged by rank, ``</w>`` on the last."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if word in self._specials:
            ids = [self.ids[word]]
        else:
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                best, at = min((self.ranks.get(pair, _MERGES), i) for i, pair in enumerate(itertools.pairwise(parts)))
                if best == _MERGES:
                    break
                first, second = parts[at], parts[at + 1]
                merged: list[str] = []
                i = 0
                while i < len(parts):  # every occurrence of the pair, left to right
                    if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids = [self.ids[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the special start and end tokens."""
        out: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            out += self._word_ids("".join(self._bytes[b] for b in piece.encode("utf-8")))
        return out

    def __call__(self, texts: list[str]) -> np.ndarray:
        n = self.context_length
        result = np.full((len(texts), n), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_id
            result[row, : len(ids)] = ids
        return result

    def counts(self, tokens: np.ndarray) -> list[int]:
        """Tokens each row occupies (special tokens included), as the server reports usage."""
        return (tokens != self.pad_id).sum(axis=1).tolist()
