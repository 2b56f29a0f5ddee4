"""What keyword search indexes and matches, the same on every store.

Spaced scripts are cut into words (runs of letters and digits), matched whole and ranked by
the store's BM25. Japanese, Chinese and Korean are written without spaces between words (or,
in Korean, with particles glued to them: 지갑을), so a run of those characters is indexed as its
overlapping character pairs, the way Lucene's CJK analyzer does, plus its last character
alone; a query run becomes the phrase of its own pairs. A query then matches wherever it
occurs inside a run: ``財布`` inside ``赤い財布ケース``, which a whole-run word never would. A
one-character query matches the pairs that begin with it or a run's last character, so it too
finds every occurrence. Pairs rather than FTS5's trigrams because most Japanese and Chinese
words are two characters long, which trigrams cannot find through the index.

Every term is made of word characters only, so no store's query syntax reaches the backend.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .errors import UsageError

# Han (with 々 and 〇), kana, Hangul: the scripts written without spaces between words
_CJK = (
    "\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3041-\u309f\u30a0-\u30ff\u3130-\u318f"
    "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\u1100-\u11ff"
    "\U00020000-\U0003134f"
)
# letters and digits: "_" separates words too (red_circle, IMG_2041)
_WORD = re.compile(r"[^\W_]+")
_SEGMENT = re.compile(f"([{_CJK}]+)|([^{_CJK}]+)")


@dataclass(frozen=True)
class Term:
    """One thing a query looks for: a word, or a CJK run as the phrase of its character pairs
    (``tokens`` consecutive in the index); ``prefix``: one CJK character, which matches any
    indexed token that begins with it."""

    tokens: tuple[str, ...]
    prefix: bool = False


def _segments(text: str | None) -> list[tuple[str, bool]]:
    """(segment, is CJK) for each word of ``text``, after NFKC (half-width kana, full-width
    Latin) and case folding, split where the script changes (``ワンピースM``)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return [(m[1] or m[2], bool(m[1])) for word in _WORD.findall(text) for m in _SEGMENT.finditer(word)]


def _pairs(run: str) -> list[str]:
    return [run[i : i + 2] for i in range(len(run) - 1)]


def index_text(text: str | None) -> str:
    """``text`` as the space-separated tokens a store indexes."""
    tokens: list[str] = []
    for segment, cjk in _segments(text):
        tokens.extend([*_pairs(segment), segment[-1]] if cjk else [segment])
    return " ".join(tokens)


def query_terms(query: str) -> list[Term]:
    """The terms of a keyword query (any of them may match), or UsageError when it has no word."""
    terms: list[Term] = []
    for segment, cjk in _segments(query):
        if not cjk:
            terms.append(Term((segment,)))
        elif len(segment) == 1:
            terms.append(Term((segment,), prefix=True))
        else:
            terms.append(Term(tuple(_pairs(segment))))
    if not terms:
        raise UsageError(f"the keyword query {query!r} has no words to look for")
    return list(dict.fromkeys(terms))
