"""Query arithmetic: ``search "beach" --add sunset --subtract people`` (the photo-library issue)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import clipsearch
from clipsearch.encoders import load_encoder
from clipsearch.errors import UsageError
from clipsearch.search import weighted_term
from clipsearch.server import ServerSettings, create_app

from ..conftest import RunningServer, write_photos


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_openclip):
    root = tmp_path_factory.mktemp("arith")
    write_photos(root / "photos")
    db = root / "a.db"
    with clipsearch.open(db, weights=tiny_openclip, device="cpu") as col:
        col.ingest([root / "photos"])
    return db


def _expected(col, text, add, subtract, limit=6):
    """The combined query computed here, independently: q + sum(w * add) - sum(w * subtract)."""
    q = col.embed_texts([text])[0].astype(np.float64)
    for term in add:
        w, t = weighted_term(term)
        q += w * col.embed_texts([t])[0]
    for term in subtract:
        w, t = weighted_term(term)
        q -= w * col.embed_texts([t])[0]
    return col.search(vector=(q / np.linalg.norm(q)).astype(np.float32), limit=limit)


def test_add_and_subtract_move_the_query(library):
    with clipsearch.open(library) as col:
        plain = col.search("a beach", limit=6)
        hits = col.search("a beach", add=["2:a sunset"], subtract=["people"], limit=6)
        expected = _expected(col, "a beach", ["2:a sunset"], ["people"])
        assert [h.id for h in hits] == [h.id for h in expected]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], atol=1e-5)
        assert [round(h.score, 5) for h in hits] != [round(h.score, 5) for h in plain]  # it did move
        # an image query takes texts too
        photo = next(h.path for h in plain)
        assert col.search(image=photo, add=["a cat"], limit=3)


def test_weights_and_refusals(library):
    assert weighted_term("2:sunset") == (2.0, "sunset")
    assert weighted_term("0.5: dusk") == (0.5, "dusk")
    assert weighted_term("time: 12:00") == (1.0, "time: 12:00")  # not a number: part of the text
    with clipsearch.open(library) as col:
        with pytest.raises(UsageError, match="vector mode"):
            col.search("x", add=["y"], mode="keyword")
        with pytest.raises(UsageError, match="weight of 'y' is 0"):
            col.search("x", add=["0:y"])


def test_cli_and_http_give_the_library_s_answer(library, cli, tiny_openclip):
    with clipsearch.open(library) as col:
        expected = [h.id for h in col.search("a beach", add=["a sunset"], subtract=["2:people"], limit=4)]
    code, out, err = cli(
        "search",
        "a beach",
        "--add",
        "a sunset",
        "--subtract",
        "2:people",
        "--limit",
        "4",
        "--json",
        "--db",
        str(library),
    )
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == expected
    with clipsearch.open(library) as col:
        spec = col.spec
    app = create_app(ServerSettings(db=str(library)), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        body = {"text": "a beach", "add": ["a sunset"], "subtract": ["2:people"], "limit": 4}
        got = c.post("/api/v1/search", json=body).json()["results"]
        assert [r["id"] for r in got] == expected
        bad = c.post("/api/v1/search", json={**body, "mode": "keyword"})
        assert bad.status_code == 400 and "vector mode" in bad.json()["error"]["message"]
