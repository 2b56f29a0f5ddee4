"""The stores: one shared suite for SQLite (+ FAISS) and PostgreSQL (+ pgvector): identity
checks, writes, search, filters, keywords, text vectors, claims; then what is particular to each
(the FAISS index files and their freshness, SQLite migrations, PostgreSQL's schema and HNSW)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipsearch.encoders import ModelIdentity
from clipsearch.errors import DimensionError, ModelMismatchError, NotFoundError, UsageError
from clipsearch.index import IndexSettings
from clipsearch.store import FailureRecord, NewItem, SQLiteStore, open_store
from clipsearch.store.postgres import PostgresStore
from clipsearch.store.sqlite import SCHEMA_VERSION

IDENT = ModelIdentity("open_clip", "tiny", "", 8, {"size": [224, 224]})


def _vectors(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _store(tmp_path, **settings) -> SQLiteStore:
    return SQLiteStore(tmp_path / "s.db", IndexSettings(**settings))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def make_store(request, tmp_path):
    """A factory of stores of one backend on one fresh location (a SQLite file; a new
    PostgreSQL database); every store it made is closed at the end."""
    made = []

    def make(**settings):
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "s.db", IndexSettings(**settings))
        else:
            store = PostgresStore(request.getfixturevalue("pg_url"), IndexSettings(**settings))
        made.append(store)
        return store

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for store in made:
        store.close()


def _fill(store, n, ns="default", seed=0, labels=None):
    store.bind_namespace(ns, IDENT, {"model": "tiny"})
    vecs = _vectors(n, seed=seed)
    items = [
        NewItem(f"id{i}", {"path": f"/p/{i}.jpg", "label": (labels[i] if labels else "x")}, sha256=f"h{i}")
        for i in range(n)
    ]
    store.write_batch(ns, items, vecs)
    return vecs


def test_namespace_binding_refuses_another_model(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    store.bind_namespace("default", IDENT, {"model": "tiny", "weights": "/moved"})  # same model: fine
    assert store.namespace("default").model_spec["weights"] == "/moved"
    other = ModelIdentity("open_clip", "ViT-B-32", "openai", 512, {"size": [224, 224]})
    with pytest.raises(ModelMismatchError, match=r"namespace 'default' holds vectors of open_clip tiny \(8-d\)"):
        store.bind_namespace("default", other, {})
    store.bind_namespace("big", other, {})
    assert [n.name for n in store.namespaces()] == ["big", "default"]
    assert store.identity("big") == other and store.identity("default") == IDENT and store.identity("nope") is None
    with pytest.raises(UsageError, match="bad namespace"):
        store.bind_namespace("../evil", IDENT, {})


def test_search_finds_each_vector_first(make_store):
    store = make_store()
    vecs = _fill(store, 50)
    results = store.search("default", vecs[:5], k=3)
    for i, hits in enumerate(results):
        assert hits[0].item.id == f"id{i}"
        # PostgreSQL keeps halfvec: 11 significant bits a component
        assert hits[0].score == pytest.approx(1.0, abs=1e-3 if store.location.startswith("postgres") else 1e-5)
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    with pytest.raises(DimensionError, match="has 4 dimensions"):
        store.search("default", np.ones((1, 4), np.float32), 3)
    with pytest.raises(NotFoundError):
        store.search("nope", vecs[:1], 3)


def test_index_is_persisted_extended_and_rebuilt(tmp_path):
    store = _store(tmp_path)
    vecs = _fill(store, 20)
    store.search("default", vecs[:1], 1)
    assert store.index_status("default").fresh
    assert (tmp_path / "s.db-index" / "default.faiss").is_file()

    # appending makes it stale; the next search extends it and finds the new item
    new = _vectors(1, seed=99)
    store.write_batch("default", [NewItem("new", {"path": "/p/new.jpg"})], new)
    assert not store.index_status("default").fresh
    assert store.search("default", new, 1)[0][0].item.id == "new"
    assert store.index_status("default").fresh and store.index_status("default").vectors == 21

    # re-embedding an item (same id, new vector) and deleting force a rebuild
    store.write_batch("default", [NewItem("id0", {"path": "/p/0.jpg"})], new)
    top = store.search("default", new, 2)[0]
    assert {h.item.id for h in top} == {"id0", "new"}
    assert store.delete_items("default", ["new"]) == 1
    assert [h.item.id for h in store.search("default", new, 1)[0]] == ["id0"]
    assert store.index_status("default").vectors == 20

    # a second process (a fresh store object) reads the saved index and finds it fresh
    store.close()
    again = _store(tmp_path)
    assert again.index_status("default").fresh
    assert again.count("default") == 20


def test_missing_or_corrupt_index_is_rebuilt(tmp_path):
    store = _store(tmp_path)
    vecs = _fill(store, 10)
    store.build_index("default")
    store.close()
    (tmp_path / "s.db-index" / "default.faiss").write_bytes(b"garbage")
    store = _store(tmp_path)
    assert store.index_status("default").kind == "none"
    assert store.search("default", vecs[3:4], 1)[0][0].item.id == "id3"


def test_hnsw_above_threshold_agrees_with_exact(tmp_path):
    hnsw = SQLiteStore(tmp_path / "h.db", IndexSettings(hnsw_threshold=100))
    flat = SQLiteStore(tmp_path / "f.db", IndexSettings(kind="flat"))
    for s in (hnsw, flat):
        _fill(s, 400, seed=3)
    q = _vectors(20, seed=4)
    assert hnsw.build_index("default").kind == "hnsw"
    assert flat.build_index("default").kind == "flat"
    recall = np.mean(
        [
            len({h.item.id for h in a} & {h.item.id for h in b}) / 10
            for a, b in zip(hnsw.search("default", q, 10), flat.search("default", q, 10), strict=True)
        ]
    )
    assert recall >= 0.95


@pytest.mark.parametrize("exact_rows", [100_000, 50], ids=["exact-path", "wide-walk"])
def test_a_selective_filter_on_hnsw_returns_the_exact_top_k(tmp_path, exact_rows):
    """Above the HNSW threshold a filter used to restrict the graph walk, which ran out before it
    found the few allowed rows (6 of 50 queries got fewer than 10 hits at 1% of 100k). Up to
    ``exact_filter_rows`` allowed rows are scored exactly; above, the walk widens with the
    selectivity and a short answer is scored exactly."""
    n = 20_000
    store = SQLiteStore(tmp_path / "h.db", IndexSettings(hnsw_threshold=1000, exact_filter_rows=exact_rows))
    store.bind_namespace("default", IDENT, {})
    vecs = _vectors(n, dim=8, seed=5)
    rng = np.random.default_rng(6)
    rare = set(rng.choice(n, 100, replace=False).tolist())  # 0.5%
    items = [NewItem(f"id{i}", {"client": "Small" if i in rare else "Big"}, f"h{i}") for i in range(n)]
    store.write_batch("default", items, vecs)
    assert store.build_index("default").kind == "hnsw"
    queries = _vectors(30, dim=8, seed=7)
    allowed = np.array(sorted(rare))
    expected = np.argsort(-(queries @ vecs[allowed].T), axis=1)[:, :10]
    for q, want, hits in zip(queries, expected, store.search("default", queries, 10, {"client": "Small"}), strict=True):
        assert [h.item.id for h in hits] == [f"id{allowed[j]}" for j in want]
        assert [h.score for h in hits] == pytest.approx(
            sorted((q @ vecs[allowed[want]].T).tolist(), reverse=True), abs=1e-5
        )
    # more asked than allowed: every allowed row, once
    hits = store.search("default", queries[:1], 500, {"client": "Small"})[0]
    assert sorted(h.item.id for h in hits) == sorted(f"id{i}" for i in rare)


def test_a_filter_sees_every_change_to_the_rows_it_selects(tmp_path):
    """SQLite keeps the ids a filter lets through while the database is unchanged; a change by
    this store or by another process's must show at once."""
    store, other = SQLiteStore(tmp_path / "s.db"), None
    try:
        vecs = _fill(store, 20, labels=["cat" if i < 5 else "dog" for i in range(20)])
        cats = lambda: {h.item.id for h in store.search("default", vecs[:1], 20, {"label": "cat"})[0]}  # noqa: E731
        assert cats() == {f"id{i}" for i in range(5)} and cats() == {f"id{i}" for i in range(5)}
        store.write_batch("default", [], np.zeros((0, 8)), touched=[NewItem("id7", {"label": "cat"}, "h7")])
        assert "id7" in cats()
        other = SQLiteStore(tmp_path / "s.db")
        other.delete_items("default", ["id0"])
        other.write_batch("default", [NewItem("new", {"label": "cat"}, "hn")], vecs[:1])
        assert cats() == {"id1", "id2", "id3", "id4", "id7", "new"}
    finally:
        store.close()
        if other is not None:
            other.close()


def test_metadata_filters_are_exact(make_store):
    store = make_store()
    labels = ["cat" if i % 3 == 0 else "dog" for i in range(30)]
    vecs = _fill(store, 30, labels=labels)
    hits = store.search("default", vecs[1:2], 5, {"label": "cat"})[0]
    assert len(hits) == 5 and all(h.item.metadata["label"] == "cat" for h in hits)
    assert store.search("default", vecs[1:2], 5, {"label": ["cat", "dog"]})[0][0].item.id == "id1"
    assert store.search("default", vecs[1:2], 5, {"label": "bird"})[0] == []
    with pytest.raises(UsageError):
        store.search("default", vecs[1:2], 5, {"label') OR 1=1 --": "x"})


def test_a_day_filter_means_that_day(make_store):
    """The newcomer issue, point 7: ``taken_at=2024-06-15`` matched only the bare date, not the
    photos taken that day (stored with their time and offset), while a range already meant the
    whole day. Both stores."""
    store = make_store()
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    times = ["2024-06-15T09:30:00+02:00", "2024-06-15", "2024-06-15T23:59:59", "2024-06-16T00:00:00", "2024-06-14"]
    items = [NewItem(f"t{i}", {"taken_at": t}, sha256=f"t{i}") for i, t in enumerate(times)]
    vecs = _vectors(len(items))
    store.write_batch("default", items, vecs)
    hits = store.search("default", vecs[:1], 10, {"taken_at": "2024-06-15"})[0]
    assert sorted(h.item.id for h in hits) == ["t0", "t1", "t2"]
    # the same as the range a person would write for that day
    ranged = store.search("default", vecs[:1], 10, {"taken_at": {"gte": "2024-06-15", "lte": "2024-06-15"}})[0]
    assert sorted(h.item.id for h in ranged) == ["t0", "t1", "t2"]


def test_failures_and_file_states(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    f = FailureRecord("bad", "/p/bad.jpg", "not an image", size=5, mtime_ns=7)
    store.write_batch("default", [], np.zeros((0, 8), np.float32), [f])
    store.write_batch("default", [], np.zeros((0, 8), np.float32), [f])
    (fail,) = store.failures()
    assert (fail.source, fail.reason, fail.attempts) == ("/p/bad.jpg", "not an image", 2)
    assert store.failure_states("default", ["bad", "x"])["bad"].size == 5
    # a success clears the failure
    store.write_batch("default", [NewItem("bad", {}, "h", 5, 8)], _vectors(1))
    assert store.failures() == []
    assert store.file_states("default", ["bad"])["bad"].mtime_ns == 8
    with pytest.raises(DimensionError):
        store.write_batch("default", [NewItem("z", {})], np.ones((1, 3), np.float32))


def test_hash_groups(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    items = [NewItem("a", {}, "same"), NewItem("b", {}, "same"), NewItem("c", {}, "other")]
    store.write_batch("default", items, _vectors(3))
    groups = store.hash_groups("default")
    assert [[i.id for i in g] for g in groups] == [["a", "b"]]


def test_open_store_rejects_what_it_cannot_open(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite at all" * 100)
    with pytest.raises(UsageError, match="not a clipsearch database"):
        open_store(bad)
    with pytest.raises(UsageError, match="use a SQLite file path or a postgresql://"):
        open_store("mysql://u@localhost/db")
    with pytest.raises(UsageError, match=r"cannot connect to postgresql://u:\*\*\*@127.0.0.1:9/db"):
        open_store("postgresql://u:secret@127.0.0.1:9/db")


# The schema of clipsearch 0.1 files (schema 1), as that version created it.
_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE namespaces (name TEXT PRIMARY KEY, identity TEXT NOT NULL, model_spec TEXT NOT NULL,
    dim INTEGER NOT NULL, generation INTEGER NOT NULL DEFAULT 0,
    rebuild_generation INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL, sha256 TEXT, size INTEGER, mtime_ns INTEGER, metadata TEXT NOT NULL, vector BLOB NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE (namespace, id));
CREATE INDEX items_sha256 ON items (namespace, sha256);
CREATE TABLE failures (namespace TEXT NOT NULL, id TEXT NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL,
    sha256 TEXT, size INTEGER, mtime_ns INTEGER, metadata TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 1, first_failed_at TEXT NOT NULL, last_failed_at TEXT NOT NULL,
    PRIMARY KEY (namespace, id));
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_schema_1_file_is_migrated_and_keyword_indexed(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "old.db"
    vec = _vectors(2)
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1)
        conn.execute(
            "INSERT INTO namespaces (name, identity, model_spec, dim, created_at) VALUES (?, ?, ?, ?, ?)",
            ("default", json.dumps(IDENT.as_dict()), "{}", 8, "2026-01-01"),
        )
        for i, label in enumerate(["tabby cat", "red rocket"]):
            conn.execute(
                "INSERT INTO items (namespace, id, sha256, size, mtime_ns, metadata, vector, created_at, updated_at) "
                "VALUES ('default', ?, ?, 1, 1, ?, ?, 'x', 'x')",
                (f"id{i}", f"h{i}", json.dumps({"label": label, "sha256": f"h{i}"}), vec[i].tobytes()),
            )
    store = SQLiteStore(path)
    try:
        assert [h.item.id for h in store.keyword_search("default", "rocket", 5)] == ["id1"]
        assert store.search("default", vec[:1], 1)[0][0].item.id == "id0"
        assert store.file_states("default", ["id0"])["id0"].fingerprint is None
        store.write_batch("default", [NewItem("id2", {"label": "new"}, fingerprint="f", text="a new text")], vec[:1])
        assert [h.item.id for h in store.keyword_search("default", "text", 5)] == ["id2"]
        # schema 7: the metadata's values and key kinds, filled from the stored rows
        assert store.metadata_keys("default") == {"label": {"text": 3}, "sha256": {"text": 2}}
        assert [h.item.id for h in store.search("default", vec[:1], 5, {"label": "red rocket"})[0]] == ["id1"]
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        # schema 9: the live counts, counted from the rows once (two of schema 1, one added since)
        assert conn.execute("SELECT live_items, live_texts FROM namespaces").fetchone() == (3, 0)
    SQLiteStore(path).close()  # opening a migrated file again changes nothing


def test_schema_10_drops_the_namespace_indexes_every_delete_wrote(tmp_path):
    """Schema 9 indexed ``deleted`` and ``removals`` by namespace: two more B-tree inserts for
    each deleted row that no read needs. A schema 9 file loses them and keeps its marks."""
    import sqlite3

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    store.bind_namespace("default", IDENT, {})
    store.write_batch("default", [NewItem(f"id{i}", {}) for i in range(4)], _vectors(4))
    assert store.delete_items("default", ["id1", "id2"]) == 2
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE INDEX deleted_namespace ON deleted (namespace)")
        conn.execute("CREATE INDEX removals_namespace ON removals (namespace, mark)")
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE namespaces SET unpurged = 0")  # schema 9 had no such count
    store = SQLiteStore(path)
    assert store.count("default") == 2 and store.pending_purge("default") == 2  # counted once
    assert {h.item.id for h in store.search("default", _vectors(4), 4)[0]} == {"id0", "id3"}
    store.close()
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert not names & {"deleted_namespace", "removals_namespace"}
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


# each step: ("write", i, text) stores id i anew (with a text vector or none), ("touch", i, text)
# keeps its vector and sets or drops its text vector, ("delete", i) marks it, ("purge",) runs
# what `index build` does first
_steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["write", "touch"]), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("delete"), st.integers(0, 5)),
        st.tuples(st.just("purge")),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_the_live_counts_every_write_keeps_match_the_rows(tmp_path_factory, steps):
    """The live counts in the namespace row (what `info` shows and an index catching up checks
    itself against), and its count of marks awaiting a purge, agree with a count of the rows
    after any mix of writes, rewrites, text vectors set and dropped, deletes and purges."""
    store = SQLiteStore(tmp_path_factory.mktemp("counts") / "s.db")
    try:
        store.bind_namespace("default", IDENT, {})
        vec = _vectors(1)
        for step in steps:
            if step[0] == "purge":
                store.purge_deleted("default")
            elif step[0] == "delete":
                store.delete_items("default", [f"id{step[1]}"])
            else:
                item = NewItem(f"id{step[1]}", {"n": step[1]}, text_vector=vec[0] if step[2] else None)
                if step[0] == "write":
                    store.write_batch("default", [item], vec)
                else:
                    store.write_batch("default", [], vec[:0], touched=[item])
            for field in ("image", "text"):
                assert store._count("default", field) == store._scan_count(store._conn, "default", field), (step, field)
        assert store.namespace("default").items == store._count("default", "image")
        marked = store._conn.execute("SELECT count(*) FROM deleted WHERE namespace = 'default'").fetchone()[0]
        assert store.pending_purge("default") == marked, step
        assert store.has_text_vectors("default") == (store._count("default", "text") > 0)
    finally:
        store.close()


def test_text_vectors_have_their_own_index_and_follow_their_items(make_store):
    store = make_store()
    image = _fill(store, 6)
    text = _vectors(6, seed=7)
    touched = [NewItem(f"id{i}", {"path": f"/p/{i}.jpg"}, f"h{i}", text=f"t{i}", text_vector=text[i]) for i in range(6)]
    store.write_batch("default", [], np.zeros((0, 8), np.float32), touched=touched)
    assert store.has_text_vectors("default")
    for i in range(6):
        assert store.search("default", text[i : i + 1], 1, field="text")[0][0].item.id == f"id{i}"
        assert store.search("default", image[i : i + 1], 1)[0][0].item.id == f"id{i}"
    assert store.get_items("default", ["id0"])[0].metadata == {"path": "/p/0.jpg"}  # the source's, replaced
    store.delete_items("default", ["id0"])
    hits = store.search("default", text[:1], 6, field="text")[0]
    assert "id0" not in {h.item.id for h in hits} and len(hits) == 5
    with pytest.raises(DimensionError):
        store.write_batch("default", [], np.zeros((0, 8)), touched=[NewItem("id1", {}, text_vector=np.ones(3))])


def test_keyword_search_ranks_and_filters(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    rows = [
        ("a", "Red summer dress", {"client": "Big", "tags": ["red", "cotton"]}),
        ("b", "Blue evening dress", {"client": "Big"}),
        ("c", "Red leather boots", {"client": "Small"}),
        ("d", None, {"label": "dress rehearsal photo", "path": "/x/red.jpg", "url": "https://red.example/dress"}),
    ]
    items = [NewItem(i, meta, f"h{i}", text=text) for i, text, meta in rows]
    store.write_batch("default", items, _vectors(4))
    ids = [h.item.id for h in store.keyword_search("default", "red dress", 10)]
    assert ids[0] == "a" and set(ids) == {"a", "b", "c", "d"}
    assert [h.item.id for h in store.keyword_search("default", "COTTON", 10)] == ["a"]  # list values, any case
    assert [h.item.id for h in store.keyword_search("default", "example", 10)] == []  # URLs are not words
    assert {h.item.id for h in store.keyword_search("default", "dress", 10, {"client": "Big"})} == {"a", "b"}
    hits = store.keyword_search("default", "dress", 10)
    assert all(h.score > 0 for h in hits) and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    store.delete_items("default", ["a"])
    assert "a" not in {h.item.id for h in store.keyword_search("default", "red", 10)}
    with pytest.raises(UsageError, match="no words"):
        store.keyword_search("default", "?!", 10)


def test_keyword_search_finds_words_inside_japanese_chinese_and_korean_text(make_store):
    """Titles written without spaces: a query matches wherever it occurs in one, on both
    stores; the expected ids come from Python's substring test, not from the indexer."""
    rng = np.random.default_rng(3)
    parts = [
        "赤い",
        "財布",
        "ワンピース",
        "革",
        "長",
        "新品",
        "红色",
        "钱包",
        "连衣裙",
        "빨간",
        "지갑을",
        "원피스",
        "レザー",
    ]
    titles = ["".join(rng.choice(parts, size=rng.integers(1, 5))) + f" item{i}" for i in range(240)]
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    items = [NewItem(f"t{i}", {"title": title}, f"h{i}") for i, title in enumerate(titles)]
    store.write_batch("default", items, _vectors(len(items)))
    for query in ["財布", "ワンピース", "赤い", "い財", "赤", "钱包", "连衣", "지갑", "갑", "レザー財布", "item7"]:
        expected = {f"t{i}" for i, t in enumerate(titles) if (query in t.split() if query.isascii() else query in t)}
        found = {h.item.id for h in store.keyword_search("default", query, 1000)}
        assert found == expected and expected, query
    # pairs rank like words: the title that says it three times comes first
    store.bind_namespace("ranks", IDENT, {})
    rows = [NewItem(i, {"title": t}, i) for i, t in [("once", "財布"), ("thrice", "財布財布財布"), ("no", "革")]]
    store.write_batch("ranks", rows, _vectors(3, seed=9))
    assert [h.item.id for h in store.keyword_search("ranks", "財布", 5)] == ["thrice", "once"]


def test_count_by_counts_values_list_elements_and_items_without_the_key(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    metas = [{"client": "Big", "tags": ["red", "cotton"], "n": 3}, {"client": "Big", "tags": ["red"], "n": 3},
             {"client": "Small", "n": 4}, {"tags": [], "client": None}]  # fmt: skip
    store.write_batch("default", [NewItem(f"i{i}", m, f"h{i}") for i, m in enumerate(metas)], _vectors(4))
    assert store.count_by("default", "client") == [("Big", 2), ("Small", 1), (None, 1)]
    assert store.count_by("default", "tags") == [("red", 2), ("cotton", 1), (None, 1)]
    assert store.count_by("default", "n") == [(3, 2), (4, 1), (None, 1)]
    assert store.count_by("default", "colour") == [(None, 4)]


def test_list_items_pages_in_each_order_with_filters_and_folders(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    metas = [
        {"path": "/photos/2024/a.jpg", "taken_at": "2024-06-01T10:00:00", "width": 800},
        {"path": "/photos/2024/b.jpg", "width": 300},
        {"path": "/photos/2023/c.jpg", "taken_at": "2023-01-05T08:00:00", "width": 1200},
        {"path": "/photos/2024_x/d.jpg", "taken_at": "2025-02-02T00:00:00", "width": 640},  # not in 2024/
        {"path": "/photos/2024/deeper/e.jpg", "width": 900},
    ]
    store.write_batch("default", [NewItem(f"i{i}", m, f"h{i}") for i, m in enumerate(metas)], _vectors(5))

    def ids(**kw):
        items, total = store.list_items("default", **kw)
        return [it.id for it in items], total

    assert ids() == (["i4", "i3", "i2", "i1", "i0"], 5)
    assert ids(order="oldest", offset=1, limit=2) == (["i1", "i2"], 5)
    assert ids(order="taken") == (["i3", "i0", "i2", "i4", "i1"], 5)  # undated last, newest stored first
    assert ids(folder="/photos/2024") == (["i4", "i1", "i0"], 3)  # "_" and "%" are no wildcards
    assert ids(folder="/photos/2024/", filters={"width": {"gte": 500}}, limit=1) == (["i4"], 2)
    assert ids(offset=10) == ([], 5)
    with pytest.raises(UsageError, match="unknown order"):
        store.list_items("default", order="random")
    assert store.metadata_keys("default") == {"path": {"text": 5}, "taken_at": {"text": 3}, "width": {"number": 5}}
    store.write_batch("default", [NewItem("j", {"width": "wide", "tags": ["a"], "ok": True}, "hj")], _vectors(1))
    keys = store.metadata_keys("default")
    assert keys["width"] == {"number": 5, "text": 1} and keys["tags"] == {"list": 1} and keys["ok"] == {"bool": 1}


def test_prepare_search_loads_what_a_search_needs(make_store):
    """A cold query reads its index while the text tower opens: after ``prepare_search`` the
    index is up to date, and the search finds the same items."""
    store = make_store()
    vecs = _fill(store, 20)
    store.prepare_search("default")
    if make_store.kind == "sqlite":
        assert store.index_status("default").fresh
    assert store.search("default", vecs[:1], 1)[0][0].item.id == "id0"
    with pytest.raises(NotFoundError):
        store.prepare_search("nope")


def test_keyword_search_finds_folder_and_file_name_words(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    paths = ["/data/shapes/red_circle/003.png", "/data/shapes/blue_square/IMG_2041.png", "/home/u/pics/notes.png"]
    items = [NewItem(f"i{i}", {"path": p, "filename": p.rsplit("/", 1)[1]}, f"h{i}") for i, p in enumerate(paths)]
    store.write_batch("default", items, _vectors(3))

    def found(query):
        return sorted(h.item.id for h in store.keyword_search("default", query, 10))

    assert found("circle") == ["i0"]  # the folder's words, split at "_"
    assert found("shapes") == ["i0", "i1"]  # the folder above it too
    assert found("img") == ["i1"] and found("2041") == ["i1"]  # file names split at "_"
    assert found("data") == [] and found("home") == []  # not every folder up to the root


def test_claims_share_items_between_owners(make_store):
    store = make_store()
    store.bind_namespace("default", IDENT, {})
    ids = [f"i{n}" for n in range(10)]
    first = store.claim("default", ids[:6], "host-a:1")
    second = store.claim("default", ids, "host-b:2")
    assert first == set(ids[:6]) and second == set(ids[6:])
    assert store.claim("default", ids[:2], "host-a:1") == set(ids[:2])  # a holder keeps its claims
    store.release("default", "host-a:1")
    assert store.claim("default", ids, "host-b:2") == set(ids)
    # an expired lease is taken over; so is the claim of a process of this host that is gone
    assert store.claim("default", ["x"], "host-c:3", lease_seconds=-1) == {"x"}
    assert store.claim("default", ["x"], "host-d:4") == {"x"}
    import socket

    no_such_pid = 2**22 + 7  # above Linux's largest pid_max: no process has it
    assert store.claim("default", ["y"], f"{socket.gethostname()}:{no_such_pid}") == {"y"}
    assert store.claim("default", ["y"], "host-e:5") == {"y"}
    assert store.claim("default", ["y"], f"{socket.gethostname()}:{os.getpid()}") == set()  # a live holder


def test_iter_items_lists_what_iter_vectors_lists(make_store):
    store = make_store()
    _fill(store, 25)
    with_vectors = [it.id for items, _ in store.iter_vectors("default", batch_size=7) for it in items]
    assert [it.id for items in store.iter_items("default", batch_size=7) for it in items] == with_vectors
    assert len(with_vectors) == 25


def test_equality_filters_and_key_kinds_follow_every_write(tmp_path):
    """SQLite answers an equality filter from ``item_values`` and ``metadata_keys`` from
    ``key_kinds``, both kept by each write: new, replaced, touched, deleted and purged rows. Checked
    against the Python rules over what the table holds."""
    from clipsearch.filters import matches

    store = SQLiteStore(tmp_path / "s.db")
    store.bind_namespace("default", IDENT, {})
    long_text = "a long caption " * 20  # past what item_values holds: found from the JSON
    rng = np.random.default_rng(3)
    values = ["red", "blue", 7, 7.0, True, False, ["red", 3], long_text, None, {"nested": 1}]
    current: dict[str, dict] = {}
    for step in range(6):
        batch = {f"id{rng.integers(0, 30)}": {"c": values[rng.integers(0, len(values))], "n": int(rng.integers(0, 3))}
                 for _ in range(12)}  # fmt: skip
        items = [NewItem(i, m) for i, m in batch.items()]
        store.write_batch("default", items, _vectors(len(items), seed=step))
        current.update(batch)
        touched = [NewItem(i, {"c": "blue", "n": 9}) for i in list(current)[:2]]
        store.write_batch("default", [], np.zeros((0, 8), np.float32), touched=touched)
        current.update({t.id: t.metadata for t in touched})
        gone = list(current)[-3:]
        store.delete_items("default", gone)
        if step % 2:  # marked rows purged at some steps, left marked (and some written again) at others
            store.purge_deleted("default")
        for i in gone:
            del current[i]
        stored = {it.id: it.metadata for it in store.get_items("default", list(current))}
        assert stored == current
        for filters in ({"c": "red"}, {"c": 7}, {"c": ["blue", True]}, {"c": long_text}, {"c": "red", "n": 1},
                        {"n": [0, 9]}, {"c": False}, {"c": "7"}):  # fmt: skip
            seqs = store._allowed_seqs("default", filters)
            by_seq = store._items_by_seq(set(seqs.tolist()))
            assert sorted(it.id for it in by_seq.values()) == sorted(
                i for i, m in current.items() if matches(m, filters)
            )
        kinds: dict[str, dict[str, int]] = {}
        for m in current.values():
            for key, value in m.items():
                kind = {bool: "bool", int: "number", float: "number", str: "text", list: "list", dict: "object",
                        type(None): "null"}[type(value)]  # fmt: skip
                kinds.setdefault(key, {})[kind] = kinds.get(key, {}).get(kind, 0) + 1
        assert store.metadata_keys("default") == kinds
    # an equality filter is answered from item_values; a long text or a range is not
    assert store._values_sql("default", {"c": "red"})[0]
    assert not store._values_sql("default", {"c": long_text})[0]
    assert not store._values_sql("default", {"n": {"gte": 1}})[0]
    # the whole answer only where every condition is an equality it holds
    assert store._values_sql("default", {"c": "red", "n": [0, 9]})[2]
    assert not store._values_sql("default", {"c": "red", "n": {"gte": 1}})[2]
    store.close()


@pytest.mark.parametrize("apart", [False, True], ids=["one-connection", "looked-up-apart"])
def test_a_delete_is_a_mark_every_read_honours_until_index_build_purges_it(tmp_path, monkeypatch, apart):
    """SQLite deletes by marking: the rows stay in the file (a delete reads none of them) and
    every read skips them at once; writing a deleted id again makes a new item; `index build`
    purges the rows with their keywords, metadata values and key counts. A large delete looks
    its ids up on several connections at once, inside its transaction (here every delete does,
    on two: the marked id2 is not found again)."""
    import sqlite3

    from clipsearch.store import sqlite as sqlite_module

    read = []
    if apart:
        monkeypatch.setattr(sqlite_module, "_LOOKUP_APART_IDS", 1)
        monkeypatch.setattr(sqlite_module, "_LOOKUP_APART", 2)
        real = SQLiteStore._lookup_apart
        monkeypatch.setattr(
            SQLiteStore, "_lookup_apart", lambda self, ns, ids: (read.append(ids), real(self, ns, ids))[1]
        )

    store = SQLiteStore(tmp_path / "s.db")
    store.bind_namespace("default", IDENT, {})
    image, text = _vectors(6), _vectors(6, seed=7)
    metadata = [{"label": "red" if i < 3 else "blue", "path": f"/p/{i}.jpg"} for i in range(6)]
    metadata[1]["gone"] = 1  # a key only a deleted item has
    items = [
        NewItem(f"id{i}", metadata[i], sha256="same" if i in (1, 4, 5) else f"h{i}", text=f"word{i} shared",
                text_vector=text[i])
        for i in range(6)
    ]  # fmt: skip
    store.write_batch("default", items, image)
    store.search("default", image[:1], 1)  # an index built before the delete drops the rows too
    created = {it.id: it.created_at for it in store.get_items("default", ["id1"])}

    assert store.delete_items("default", ["id1", "id2", "id1", "nope"]) == 2
    assert store.delete_items("default", ["id2"]) == 0  # already gone
    assert read == ([["id1", "id2", "nope"], ["id2"]] if apart else [])
    if apart:  # the log is copied into the database after each delete, on a connection of its own
        assert [t.name for t in store._checkpoints] == ["clipsearch-checkpoint"] * len(store._checkpoints) != []
        for thread in store._checkpoints:
            thread.join()
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # the commits' own again
        # and the log emptied (no one was reading): the next writer appends to a new file instead
        # of rewriting the old one's frames, which from a cold page cache were read back first
        assert os.path.getsize(tmp_path / "s.db-wal") == 0
    raw = sqlite3.connect(tmp_path / "s.db")
    assert raw.execute("SELECT count(*) FROM items").fetchone()[0] == 6  # marked, not removed
    assert store.pending_purge("default") == 2

    live = ["id0", "id3", "id4", "id5"]
    assert store.count("default") == 4 and store.namespace("default").items == 4
    assert [it.id for it in store.get_items("default", [f"id{i}" for i in range(6)])] == live
    assert set(store.get_vectors("default", ["id1", "id3"])) == {"id3"}
    assert set(store.file_states("default", ["id1", "id2", "id3"])) == {"id3"}
    assert [it.id for batch in store.iter_items("default") for it in batch] == live
    assert [it.id for batch, _ in store.iter_vectors("default") for it in batch] == live
    for field, vecs in (("image", image), ("text", text)):
        hits = store.search("default", vecs, 6, field=field)
        assert all({h.item.id for h in row} == set(live) for row in hits)
    assert [h.item.id for h in store.search("default", image[:3], 6, {"label": "red"})[0]] == ["id0"]
    assert store.search("default", image[:1], 6, {"gone": 1}) == [[]]
    assert {h.item.id for h in store.keyword_search("default", "shared", 10)} == set(live)
    assert store.keyword_search("default", "word1", 10) == []
    page, total = store.list_items("default", limit=10, order="oldest")
    assert [it.id for it in page] == live and total == 4
    assert store.count_by("default", "label") == [("blue", 3), ("red", 1)]
    assert store.metadata_keys("default") == {"label": {"text": 4}, "path": {"text": 4}}
    # which keys there are, without reading the marked rows: theirs may be among them
    assert store.metadata_keys("default", exact=False)["gone"] == {"number": 1}
    assert [[it.id for it in g] for g in store.hash_groups("default")] == [["id4", "id5"]]

    # the id written again: a new item under a new seq, the marked row purged with it
    store.write_batch("default", [NewItem("id1", {"label": "red"}, "h1")], image[1:2])
    again = store.get_items("default", ["id1"])[0]
    assert again.created_at >= created["id1"] and again.metadata == {"label": "red"}
    assert store.pending_purge("default") == 1 and store.count("default") == 5
    assert store.search("default", image[1:2], 1)[0][0].item.id == "id1"
    assert store.metadata_keys("default") == {"label": {"text": 5}, "path": {"text": 4}}

    store.build_index("default")
    assert store.pending_purge("default") == 0
    assert raw.execute("SELECT count(*) FROM items").fetchone()[0] == 5
    assert raw.execute("SELECT count(*) FROM item_values WHERE seq NOT IN (SELECT seq FROM items)").fetchone() == (0,)
    assert raw.execute("SELECT count(*) FROM items_fts").fetchone()[0] == 5
    assert raw.execute("SELECT count(*) FROM text_vectors").fetchone()[0] == 4  # id1 came back without one
    assert dict(((k, kind), n) for k, kind, n in raw.execute("SELECT key, kind, n FROM key_kinds WHERE n > 0")) == {
        ("label", "text"): 5, ("path", "text"): 4
    }  # fmt: skip
    assert store.metadata_keys("default") == {"label": {"text": 5}, "path": {"text": 4}}
    assert {h.item.id for h in store.search("default", image, 6)[0]} == {"id0", "id1", "id3", "id4", "id5"}
    raw.close()
    store.close()


def test_a_large_delete_finds_its_rows_in_the_id_map_and_the_rest_in_the_database(tmp_path, monkeypatch):
    """`index build` writes the namespace's id map; a large delete takes the seqs it holds, and
    looks up in the database only the ids it does not (written since) or holds at a seq removed
    since (re-embedded, or deleted and written again). The removal log is kept back to the map."""
    from clipsearch.store import sqlite as sqlite_module
    from clipsearch.store.idmap import IdMap

    monkeypatch.setattr(sqlite_module, "_LOOKUP_APART_IDS", 2)
    asked = []
    real = SQLiteStore._lookup
    monkeypatch.setattr(SQLiteStore, "_lookup", lambda self, c, ns, ids: (asked.append(ids), real(self, c, ns, ids))[1])
    store = SQLiteStore(tmp_path / "s.db")
    vecs = _fill(store, 8)
    store.delete_items("default", ["id7"])  # purged by the build: not in the map
    store.search("default", vecs[:1], 3)
    assert store.index_status("default").id_map == 0  # a search writes the index, not the map
    assert store.build_index("default").id_map == 7
    ns = store._require("default")
    idmap = IdMap.open(store._idmap_path("default"), store._index_owner(ns))
    assert idmap is not None and idmap.count == 7
    seq_of = {r["id"]: r["seq"] for r in store._conn.execute("SELECT id, seq FROM live_items")}
    assert idmap.find(["id0", "id6", "id7"])[1].tolist() == [seq_of["id0"], seq_of["id6"], -1]
    plan = [r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sqlite_module._MAP_ROWS, ("default",))]
    assert "COVERING INDEX" in plan[0], plan  # the ids and seqs from the index alone

    store.write_batch("default", [NewItem("id3", {"label": "y"}, "h3b")], vecs[:1])  # re-embedded: a new seq
    store.write_batch("default", [NewItem("id9", {"label": "x"}, "h9")], vecs[1:2])  # new since the map
    store.delete_items("default", ["id5"])
    store.write_batch("default", [NewItem("id5", {"label": "z"}, "h5b")], vecs[2:3])  # deleted, then written again
    asked.clear()
    assert store.delete_items("default", ["id1", "id3", "id5", "id9", "nope"]) == 4
    assert asked == [["id3", "id5", "id9", "nope"]]  # id1 came from the map
    assert {it.id for it in store.get_items("default", [f"id{i}" for i in range(10)])} == {"id0", "id2", "id4", "id6"}
    assert store.count("default") == 4 == store._scan_count(store._conn, "default", "image")
    asked.clear()
    assert store.delete_items("default", ["id1", "id3", "id0"]) == 1  # the removals since the map, read again
    assert asked == [["id1", "id3"]]

    # a second build writes a new map from the live rows; the log before it goes
    store.build_index("default")
    fresh = IdMap.open(store._idmap_path("default"), store._index_owner(ns))
    assert fresh.count == 3 and fresh.token != idmap.token
    assert SQLiteStore(tmp_path / "s.db").index_status("default").id_map == 3  # another process reads it too
    assert store._conn.execute("SELECT count(*) FROM removals").fetchone()[0] == 0
    asked.clear()
    assert store.delete_items("default", ["id2", "id4"]) == 2 and asked == []
    assert [it.id for it in store.get_items("default", ["id2", "id4", "id6"])] == ["id6"]
    store.close()


def test_an_ingests_refresh_keeps_an_id_map_that_still_gives_most_ids(tmp_path):
    """`index build` always writes the map; the refresh at the end of an ingest (no kind asked)
    writes one where there is none or where a quarter of the live ids changed since, and keeps the
    removal log back to the map it keeps."""
    from clipsearch.store.idmap import IdMap

    store = SQLiteStore(tmp_path / "s.db")
    _fill(store, 8)

    def token() -> str:
        return IdMap.open(store._idmap_path("default"), store._index_owner(store._require("default"))).token

    store.build_index("default")  # an ingest's: no map yet
    first = token()
    store.delete_items("default", ["id0"])  # 1 of 7 live since
    store.build_index("default")
    assert token() == first
    assert store._conn.execute("SELECT count(*) FROM removals").fetchone()[0] == 1  # kept for the map
    assert store.delete_items("default", ["id0", "id1", "id2"]) == 2  # through the map and its log
    store.build_index("default")  # 3 of 5 live changed since
    second = token()
    assert second != first and store._conn.execute("SELECT count(*) FROM removals").fetchone()[0] == 0
    store.build_index("default", "auto")  # `index build`
    assert token() != second
    store.close()


# each step: ("write", i) stores id i anew, ("delete", ids) deletes them (looked up through the
# id map where `index build` wrote one), ("build",) runs `index build`
_map_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 7)),
        st.tuples(st.just("delete"), st.lists(st.integers(0, 9), min_size=1, max_size=4)),
        st.tuples(st.just("build")),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_map_steps)
def test_deletes_through_the_id_map_leave_exactly_the_live_ids_after_any_history(tmp_path_factory, monkeypatch, steps):
    from clipsearch.store import sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "_LOOKUP_APART_IDS", 1)  # every delete is a large one
    store = SQLiteStore(tmp_path_factory.mktemp("map") / "s.db")
    try:
        store.bind_namespace("default", IDENT, {})
        vecs, live = _vectors(8), set()
        for step in steps:
            if step[0] == "write":
                store.write_batch("default", [NewItem(f"id{step[1]}", {"n": step[1]})], vecs[step[1] : step[1] + 1])
                live.add(step[1])
            elif step[0] == "delete":
                gone = live & set(step[1])
                assert store.delete_items("default", [f"id{i}" for i in step[1]]) == len(gone), step
                live -= gone
            else:
                store.build_index("default")
            ids = {it.id for it in store.get_items("default", [f"id{i}" for i in range(10)])}
            assert ids == {f"id{i}" for i in live}, step
            assert store._count("default", "image") == store._scan_count(store._conn, "default", "image") == len(live)
    finally:
        store.close()


def test_a_namespace_is_read_in_stored_order_by_an_index_range(tmp_path):
    """Index builds, exports and folder syncs read a namespace's rows a page at a time in seq
    order: each page must be one range of an index, not a sort of every row after its start."""
    store = SQLiteStore(tmp_path / "s.db")
    _fill(store, 20)
    for table in ("live_items", "live_text_vectors"):
        sql = f"SELECT seq, vector FROM {table} WHERE namespace = ? AND seq > ? ORDER BY seq LIMIT ?"
        plan = " / ".join(r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql, ("default", 5, 10)))
        assert "TEMP B-TREE" not in plan and "USING INDEX" in plan, plan
    assert [it.id for page in store.iter_items("default", batch_size=7) for it in page] == [f"id{i}" for i in range(20)]
    # and the migration counts the live rows from indexes alone: a marked row's page is never read
    calls = []
    store._conn.set_trace_callback(calls.append)
    assert store._scan_count(store._conn, "default", "image") == 20
    assert store._scan_count(store._conn, "default", "text") == 0
    store._conn.set_trace_callback(None)
    assert calls
    for sql in calls:
        args = ("default",) * sql.count("'default'")
        plan = [r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql.replace("'default'", "?"), args)]
        # the marks themselves are a small table of their own (schema 10 scans it: no index by namespace)
        allowed = ("COVERING INDEX", "SUBQUERY", "SCAN CONSTANT", "SCAN deleted", "SCAN d")
        assert all(any(a in step for a in allowed) for step in plan), plan
    store.close()


def test_export_streams_and_stays_consistent_when_rows_change_meanwhile(tmp_path):
    """``export`` writes a chunk at a time, sized by the count when it starts; a row deleted
    while it runs leaves a matrix and metadata that still agree row for row."""
    import json

    from clipsearch.export import export_vectors
    from clipsearch.imports import open_import

    class DeletingStore(SQLiteStore):
        def iter_vectors(self, namespace, batch_size=10_000):
            self.delete_items(namespace, ["id3"])  # lands after the export counted the rows
            yield from super().iter_vectors(namespace, batch_size=4)

    store = DeletingStore(tmp_path / "s.db")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vecs = _vectors(10)
    store.write_batch("default", [NewItem(f"id{i}", {"n": i}) for i in range(10)], vecs)
    assert export_vectors(store, "default", tmp_path / "v.npy", tmp_path / "v.json") == 9
    matrix = np.load(tmp_path / "v.npy")
    meta = json.loads((tmp_path / "v.json").read_text())
    assert matrix.shape == (9, 8) and meta["count"] == 9 and meta["model_spec"] == {"model": "tiny"}
    assert [it["id"] for it in meta["items"]] == [f"id{i}" for i in range(10) if i != 3]
    assert np.allclose(matrix, np.delete(vecs, 3, axis=0), atol=1e-6)
    files = open_import(tmp_path / "v.npy", tmp_path / "v.json")
    assert files.count == 9 and files.model == IDENT
    store.close()


def test_postgres_builds_get_room_for_their_graph_within_the_budget():
    """maintenance_work_mem for an HNSW build: pgvector's graph (a halfvec row needs half the
    vector bytes of a vector row), a quarter spare, at least 64 MB, never past the budget."""
    from clipsearch.store.postgres import build_memory

    gib = 1 << 30
    half = build_memory(1_000_000, 512, "halfvec", 32, 6 * gib)
    full = build_memory(1_000_000, 512, "vector", 32, 6 * gib)
    assert 2.5 * gib < half < 3.2 * gib and full - half == int(1_000_000 * 1024 * 1.25)
    assert build_memory(1_000_000, 512, "halfvec", 32, gib) == gib
    assert build_memory(100, 512, "halfvec", 32, gib) == 64 << 20
