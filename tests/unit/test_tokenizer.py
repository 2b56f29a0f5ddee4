"""The torch-free tokenizer (Hugging Face tokenizers behind open_clip's cleaning, over a
tokenizer.json written from open_clip's vocabulary) gives open_clip's token ids exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch._compat import import_open_clip
from clipsearch.tokenizer import TextTokenizer, bounded_text, clip_tokenizer_json

TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "",
    "   lots   of\n\twhitespace  ",
    "東京タワーの夜景、ネオンが光る",
    "바닷가를 달리는 강아지",
    "emoji 🐶🏖️ and flags 🇯🇵",
    "&amp;lt;b&amp;gt; html entities &eacute;",
    "schÃ¶n mojibake that ftfy repairs",
    "don't it's we've I'll you'd",
    "3.14159 and 1234567 numbers",
    "<start_of_text> special <end_of_text> tokens in text",
    "word " * 100,  # longer than the context: truncated, ending in end-of-text
    "naïve café über façade",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed-script strings: Latin, CJK, Hangul, Cyrillic, punctuation, digits, emoji, spaces."""
    rng = np.random.default_rng(seed)
    ranges = [(0x20, 0x7E), (0xC0, 0x24F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x400, 0x4FF)]
    ranges += [(0x1F300, 0x1F64F), (0x2000, 0x206F)]
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(int(rng.integers(1, 60))):
            lo, hi = ranges[int(rng.integers(len(ranges)))]
            chars.append(chr(int(rng.integers(lo, hi + 1))))
        texts.append("".join(chars))
    return texts


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_ascii_skips_ftfy_only_where_ftfy_changes_nothing(text):
    """clean_text leaves ftfy out for printable ASCII without '&' (its import costs a cold query
    130 ms): on every such text ftfy gives the text back unchanged."""
    import ftfy

    from clipsearch.tokenizer import _fix_text

    assert _fix_text(text) == ftfy.fix_text(text)
    assert _fix_text(text + "&amp;") == ftfy.fix_text(text + "&amp;")


def test_token_ids_equal_open_clip(tmp_path):
    import_open_clip()
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.__getitem__)
    specials = [reference.decoder[i] for i in reference.all_special_ids]
    clip_tokenizer_json(tmp_path, reference.encoder, merges, specials, reference.decoder[0], lower=True)
    ours = TextTokenizer(tmp_path, 77, "lower")
    texts = TEXTS + _random_texts(300)
    np.testing.assert_array_equal(ours(texts), reference(texts).numpy())
    assert ours.counts(ours(["a photo"])) == [4]
    # the bounded start of a long text tokenises as the whole text does: spaces, entities,
    # one endless word and a long tail of words all cut where no read token lies
    long_texts = [
        " ".join(_random_texts(400, seed=1)),
        "a  dog \n\t" * 3000,
        "&amp;" * 20_000 + " a cat",
        "x" * 50_000,
        "word " * 20_000,
    ]
    bounded = [bounded_text(t, 77) for t in long_texts]
    assert all(len(b) < len(t) / 2 for b, t in zip(bounded, long_texts, strict=True))
    np.testing.assert_array_equal(ours(bounded), reference(long_texts).numpy())
