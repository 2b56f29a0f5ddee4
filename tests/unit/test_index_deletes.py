"""Deleted and replaced items leave the FAISS index without a rebuild: exact and IVF indexes drop
their vectors, an HNSW graph keeps them as tombstones that searches skip, until ``index build``
compacts it (or tombstones pass a quarter of the graph). Checked against a brute-force search
over what the table holds after every step of a seeded random history."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.encoders import ModelIdentity
from clipsearch.index import IndexSettings, SaveCancelled, VectorIndex
from clipsearch.store import NewItem, SQLiteStore

DIM = 16
IDENT = ModelIdentity("open_clip", "tiny", "", DIM, {"size": [224, 224]})


def _unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _open(tmp_path, **settings) -> SQLiteStore:
    return SQLiteStore(tmp_path / "s.db", IndexSettings(**settings))


def _write(store, ids, vectors):
    store.write_batch("default", [NewItem(i, {"path": f"/p/{i}.jpg"}) for i in ids], vectors)


def _exact_top(current: dict[str, np.ndarray], query: np.ndarray, k: int) -> list[str]:
    ids = list(current)
    scores = np.stack([current[i] for i in ids]) @ query
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def _index(store, field="image") -> VectorIndex:
    return store._indexes[("default", field)]


# IVF-PQ visiting every list and re-ranking every candidate is exact: what is checked here is
# that deletes and adds reach it (its recall at real settings is test_index_kinds's)
_EXACT_IVF = {"nprobe": 64, "rerank": 1000}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_random_history_matches_brute_force_without_rebuilds(tmp_path, kind):
    store = _open(tmp_path, kind=kind, **_EXACT_IVF)
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    rng = np.random.default_rng(7)
    current: dict[str, np.ndarray] = {}
    first = _unit(rng, 300)
    _write(store, [f"id{i}" for i in range(300)], first)
    current.update({f"id{i}": v for i, v in enumerate(first)})
    store.build_index("default")
    built = _index(store)
    next_id = 300
    removed = 0  # vectors that left: deleted items and the old vectors of replaced ones
    for step in range(12):
        ids = list(current)
        gone = [ids[j] for j in rng.choice(len(ids), 3, replace=False)]
        assert store.delete_items("default", gone) == 3
        for i in gone:
            del current[i]
        replaced = [ids[j] for j in rng.choice(len(ids), 4, replace=False) if ids[j] in current]
        removed += len(gone) + len(replaced)
        new = [f"id{next_id + j}" for j in range(4)]
        next_id += 4
        vectors = _unit(rng, len(replaced) + len(new))
        _write(store, replaced + new, vectors)
        current.update(zip(replaced + new, vectors, strict=True))

        queries = np.concatenate([_unit(rng, 3), np.stack([current[i] for i in replaced[:2]])])
        results = store.search("default", queries, 10)
        for query, hits in zip(queries, results, strict=True):
            got = [h.item.id for h in hits]
            assert not set(got) & set(gone), f"step {step}: a deleted item was returned"
            want = _exact_top(current, query, 10)
            if kind == "ivfpq":  # scored from fp16 vectors: near-ties may swap, the scores agree
                assert [current[i] @ query for i in got] == pytest.approx([current[i] @ query for i in want], abs=2e-3)
            else:
                assert got == want, f"step {step}"
        # the same index object, brought up to date: removals applied, new rows appended
        assert _index(store) is built
        status = store.index_status("default")
        assert status.fresh and status.vectors == len(current) == store.count("default")
    assert status.tombstones == (removed if kind == "hnsw" else 0)
    # a second process reads the saved index, tombstones and all, and agrees
    again = _open(tmp_path, kind=kind, **_EXACT_IVF)
    query = _unit(rng, 1)
    assert [h.item.id for h in again.search("default", query, 10)[0]] == _exact_top(current, query[0], 10)
    assert again.index_status("default").fresh
    again.close()
    store.close()


def test_hnsw_tombstones_are_compacted_by_index_build(tmp_path):
    store = _open(tmp_path, kind="hnsw")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 200)
    _write(store, [f"id{i}" for i in range(200)], vectors)
    store.build_index("default")
    store.delete_items("default", [f"id{i}" for i in range(10)])
    _write(store, ["id10"], _unit(rng, 1))  # replaced: its old vector is a tombstone too
    hits = store.search("default", vectors[:12], 1)
    assert hits[11][0].item.id == "id11"
    assert all(h[0].item.id not in {f"id{i}" for i in range(10)} for h in hits)
    status = store.index_status("default")
    assert (status.vectors, status.tombstones) == (190, 11)

    compacted = store.build_index("default")
    assert (compacted.kind, compacted.vectors, compacted.tombstones) == ("hnsw", 190, 0)
    assert _index(store).index.ntotal == 190
    store.close()


def test_hnsw_with_too_many_tombstones_is_rebuilt(tmp_path):
    store = _open(tmp_path, kind="hnsw")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(5), 100)
    _write(store, [f"id{i}" for i in range(100)], vectors)
    store.build_index("default")
    store.delete_items("default", [f"id{i}" for i in range(20)])
    store.search("default", vectors[:1], 1)
    assert store.index_status("default").tombstones == 20
    store.delete_items("default", [f"id{i}" for i in range(20, 30)])  # 30 of 100 dead: past a quarter
    assert store.search("default", vectors[30:31], 1)[0][0].item.id == "id30"
    status = store.index_status("default")
    assert (status.vectors, status.tombstones) == (70, 0)
    store.close()


def test_filtered_search_after_deletes(tmp_path):
    store = _open(tmp_path, kind="hnsw")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(9), 60)
    store.write_batch(
        "default", [NewItem(f"id{i}", {"label": "even" if i % 2 == 0 else "odd"}) for i in range(60)], vectors
    )
    store.build_index("default")
    store.delete_items("default", ["id0", "id2"])
    hits = store.search("default", vectors[0:1], 5, {"label": "even"})[0]
    assert len(hits) == 5 and {h.item.id for h in hits}.isdisjoint({"id0", "id2"})
    assert all(h.item.metadata["label"] == "even" for h in hits)
    store.close()


def test_auto_kind_keeps_hnsw_after_a_few_deletes_below_the_threshold(tmp_path):
    store = _open(tmp_path, hnsw_threshold=100)
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(2), 100)
    _write(store, [f"id{i}" for i in range(100)], vectors)
    assert store.build_index("default").kind == "hnsw"
    built = _index(store)
    store.delete_items("default", ["id1", "id2"])  # 98 left, under the threshold
    assert store.search("default", vectors[3:4], 1)[0][0].item.id == "id3"
    assert _index(store) is built and store.index_status("default").kind == "hnsw"


def test_text_index_follows_replaced_and_deleted_items(tmp_path):
    store = _open(tmp_path, kind="flat")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    rng = np.random.default_rng(4)
    images, texts = _unit(rng, 20), _unit(rng, 21)
    items = [NewItem(f"id{i}", {}, text=f"t{i}", text_vector=texts[i]) for i in range(20)]
    store.write_batch("default", items, images)
    store.build_index("default")
    store.write_batch("default", [NewItem("id5", {}, text="t5", text_vector=texts[20])], images[5:6])
    store.delete_items("default", ["id6"])
    assert store.search("default", texts[20:21], 1, field="text")[0][0].item.id == "id5"
    assert store.search("default", texts[5:6], 1, field="text")[0][0].item.id != "id5"
    assert all(h.item.id != "id6" for h in store.search("default", texts[6:7], 20, field="text")[0])
    assert store.index_status("default", "text").vectors == 19


def _large_hnsw(tmp_path, monkeypatch, seed: int) -> tuple[SQLiteStore, np.ndarray, Path]:
    """A built HNSW index of 400 vectors that counts as large (written once 1% changed), and its
    state file."""
    monkeypatch.setattr("clipsearch.index.SAVE_ALWAYS_BELOW", 0)
    store = _open(tmp_path, kind="hnsw")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(seed), 400)
    _write(store, [f"id{i}" for i in range(400)], vectors)
    store.build_index("default")
    return store, vectors, tmp_path / "s.db-index" / "default.json"


def test_a_large_index_is_written_only_once_enough_changed(tmp_path, monkeypatch):
    """Catching an older index file up costs only what changed; writing one costs its whole size.
    So a large index is written once the changes pass 1% of it, and another process that reads
    the older file catches up the same way, to the same answers."""
    store, vectors, state_file = _large_hnsw(tmp_path, monkeypatch, seed=8)
    written = state_file.read_text()
    store.delete_items("default", ["id1", "id2", "id3"])  # 3 of 400: under 1%
    assert store.search("default", vectors[1:2], 1)[0][0].item.id != "id1"
    assert state_file.read_text() == written
    other = _open(tmp_path, kind="hnsw")
    assert not other.index_status("default").fresh  # the file lags; the next search catches up
    assert [h.item.id for h in other.search("default", vectors[4:5], 3)[0]] == [
        h.item.id for h in store.search("default", vectors[4:5], 3)[0]
    ]
    other.close()
    store.delete_items("default", ["id5"])  # 4 changes: 1% of 396 live
    store.search("default", vectors[5:6], 1)
    store.wait_for_saves()  # written after the answer (the next test)
    assert state_file.read_text() != written and store.index_status("default").fresh
    assert _open(tmp_path, kind="hnsw").index_status("default").tombstones == 4
    # `index build` also drops the removal log the indexes and the id map it writes have applied
    store.build_index("default", "hnsw")
    assert store._query("SELECT count(*) AS n FROM removals")[0]["n"] == 0
    store.close()


def _removed_stopped_writes() -> None:
    """Wait for the removal of what stopped writes left (done beside whatever stopped them)."""
    for thread in threading.enumerate():
        if thread.name == "clipsearch-unlink":
            thread.join()


class _SetAfter(threading.Event):
    """An event that reads as set from its ``n``-th question on: a write stopped part-way."""

    def __init__(self, n: int):
        super().__init__()
        self.asked, self.n = 0, n

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_file_is_written_in_pieces_and_a_stopped_write_leaves_the_old_one(tmp_path, monkeypatch, kind):
    """The file goes to disk a piece at a time (here 4 KiB) and reads back whole; a write stopped
    part-way raises SaveCancelled, leaves no temporary file, and the file it was to replace is
    the one read back."""
    monkeypatch.setattr("clipsearch.index.SAVE_PIECE", 4096)
    vectors = _unit(np.random.default_rng(12), 300)
    index = VectorIndex.empty(kind, vectors.shape[1], IndexSettings())
    index.add(np.arange(1, 201, dtype=np.int64), vectors[:200])
    path = tmp_path / "ix" / "default.faiss"
    index.save(path)
    index.add(np.arange(201, 301, dtype=np.int64), vectors[200:])
    with pytest.raises(SaveCancelled):
        index.save(path, _SetAfter(3))  # the third write of several
    _removed_stopped_writes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["default.faiss", "default.json"]
    old = VectorIndex.load(path, IndexSettings())
    assert old is not None and old.state.count == 200 and index.unsaved == 100
    index.save(path, threading.Event())
    new = VectorIndex.load(path, IndexSettings())
    assert new is not None and new.state.count == 300 and index.unsaved == 0
    _, seqs = new.search(vectors[250:251], 1)
    assert seqs[0][0] == 251


def test_an_index_file_a_crash_emptied_is_rebuilt(tmp_path):
    """A small index file is not synced when written (it is rewritten at every change): one that
    a crash left empty is read as no index, and rebuilt from the store."""
    store = _open(tmp_path)
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(13), 30)
    _write(store, [f"id{i}" for i in range(30)], vectors)
    assert store.search("default", vectors[7:8], 1)[0][0].item.id == "id7"
    store.close()
    (tmp_path / "s.db-index" / "default.faiss").write_bytes(b"")
    store = _open(tmp_path)
    assert store.search("default", vectors[7:8], 1)[0][0].item.id == "id7"
    assert (tmp_path / "s.db-index" / "default.faiss").stat().st_size > 0
    store.close()


def test_a_large_index_is_written_after_the_answer_not_before(tmp_path, monkeypatch):
    """At 10M vectors the IVF-PQ file is 1.3 GB: the first search after a large delete answers
    while the caught-up index is written beside it, other searches go on, and the next delete
    stops the write instead of waiting for it (its lookups would share the disk with it, and the
    file would be out of date on arrival); the answer after that delete writes the file again."""
    store, vectors, state_file = _large_hnsw(tmp_path, monkeypatch, seed=9)
    written = state_file.read_text()
    writing, release = threading.Event(), threading.Event()
    save = VectorIndex.save
    outcomes: list[str] = []

    def held_save(index, path, cancel=None):
        writing.set()
        while not release.is_set() and not (cancel is not None and cancel.is_set()):
            time.sleep(0.01)
        try:
            save(index, path, cancel)
        except SaveCancelled:
            outcomes.append("stopped")
            raise
        outcomes.append("written")

    monkeypatch.setattr(VectorIndex, "save", held_save)
    store.delete_items("default", [f"id{i}" for i in range(10)])
    hits = {h.item.id for h in store.search("default", vectors[0:1], 3)[0]}
    assert len(hits) == 3 and not hits & {f"id{i}" for i in range(10)}
    assert writing.wait(10) and state_file.read_text() == written  # answered; the file is being written
    assert store.search("default", vectors[20:21], 1)[0][0].item.id == "id20"
    writing.clear()
    store.delete_items("default", ["id20"])  # returns without the release: the write was stopped
    assert outcomes == ["stopped"] and state_file.read_text() == written
    _removed_stopped_writes()
    assert not list(state_file.parent.glob("*.tmp"))
    assert store.search("default", vectors[20:21], 1)[0][0].item.id != "id20"
    assert writing.wait(10)  # the answer after the delete writes the file again
    release.set()
    store.wait_for_saves()
    assert outcomes == ["stopped", "written"]
    assert json.loads(state_file.read_text())["dead"] == [*range(1, 11), 21]  # id0..id9, id20

    # a delete that deletes nothing stops the write too; the next answer, with nothing to change,
    # writes the file all the same
    release.clear()
    store.delete_items("default", [f"id{i}" for i in range(200, 210)])
    store.search("default", vectors[50:51], 1)
    assert writing.wait(10)
    store.delete_items("default", ["no such id"])
    assert outcomes[-1] == "stopped"
    store.search("default", vectors[50:51], 1)
    release.set()
    store.wait_for_saves()
    assert outcomes[-1] == "written" and len(json.loads(state_file.read_text())["dead"]) == 21
    store.search("default", vectors[50:51], 1)
    assert len(outcomes) == 4  # a written index is not written again

    # a write that fails (a full disk) is said by the next wait, not lost in its thread
    def full_disk(index, path, cancel=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VectorIndex, "save", full_disk)
    store.delete_items("default", [f"id{i}" for i in range(100, 110)])
    assert len(store.search("default", vectors[50:51], 1)[0]) == 1
    with pytest.raises(OSError, match="No space left"):
        store.wait_for_saves()
    monkeypatch.setattr(VectorIndex, "save", save)
    store.close()

    # a process that answers and exits has written the file, and left no orphans
    orphan = tmp_path / "s.db-index" / "default.faiss.4194305-0badc0de.tmp"  # past Linux's largest pid
    orphan.write_bytes(b"left by a killed process")
    code = (
        "import sys; import clipsearch.index as i; i.SAVE_ALWAYS_BELOW = 0\n"
        "import numpy as np; from clipsearch.index import IndexSettings; from clipsearch.store import SQLiteStore\n"
        "s = SQLiteStore(sys.argv[1], IndexSettings(kind='hnsw'))\n"
        "s.delete_items('default', ['id%d' % k for k in range(30, 40)])\n"
        "print(s.search('default', np.load(sys.argv[2])[None], 1)[0][0].item.id)\n"
    )
    np.save(tmp_path / "q.npy", vectors[50])
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s.db"), str(tmp_path / "q.npy")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "id50"
    # caught up past the failed write: 10 + 1 + 10 + 10 + the subprocess's 10
    assert len(json.loads(state_file.read_text())["dead"]) == 41 and not orphan.exists()


def test_building_after_a_search_uses_every_faiss_thread(tmp_path):
    """A search of a few queries sets FAISS to one thread on its thread; a rebuild there later
    (a compaction in a server, a second round of deletes) must not stay at one."""
    import faiss

    from clipsearch import index as index_module

    store = _open(tmp_path, kind="hnsw")
    store.bind_namespace("default", IDENT, {"model": "tiny"})
    vectors = _unit(np.random.default_rng(1), 50)
    _write(store, [f"id{i}" for i in range(50)], vectors)
    store.search("default", vectors[:1], 1)
    store.delete_items("default", ["id0"])
    store.search("default", vectors[:1], 1)  # a tombstone, and one thread
    assert faiss.omp_get_max_threads() == 1
    store.build_index("default")  # compacts: a rebuild
    assert faiss.omp_get_max_threads() == index_module._MAX_THREADS[0] > 1
    store.close()
