"""Keyword terms: a CJK query matches exactly where it occurs inside a run, checked against
Python's own substring test on any text; spaced words stay whole words."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch.errors import UsageError
from clipsearch.keywords import Term, index_text, query_terms

# a few characters of each script, so that random texts share pairs and runs often
CJK = "赤い財布ワンピース革長中国钱包지갑을빨간"


def matches(term: Term, tokens: list[str]) -> bool:
    """What a store's phrase (or prefix) query does with the indexed tokens."""
    if term.prefix:
        return any(t.startswith(term.tokens[0]) for t in tokens)
    n = len(term.tokens)
    return any(tuple(tokens[i : i + n]) == term.tokens for i in range(len(tokens) - n + 1))


@settings(max_examples=400, deadline=None)
@given(doc=st.text(alphabet=CJK + " 、", max_size=30), query=st.text(alphabet=CJK, min_size=1, max_size=6))
def test_a_cjk_query_matches_where_python_finds_it(doc, query):
    (term,) = query_terms(query)
    assert matches(term, index_text(doc).split()) == (query in doc)


def test_spaced_words_stay_whole_and_scripts_split():
    assert index_text("Red summer DRESS") == "red summer dress"
    assert query_terms("dresses") == [Term(("dresses",))]
    assert index_text("ワンピースM 財布") == "ワン ンピ ピー ース ス m 財布 布"
    assert index_text("ﾜﾝﾋﾟｰｽ") == index_text("ワンピース")  # half-width kana, NFKC
    assert query_terms("赤 wallet 赤") == [Term(("赤",), prefix=True), Term(("wallet",))]
    with pytest.raises(UsageError, match="no words"):
        query_terms("?! 、。")
