"""The id map file: what a large delete reads instead of the database's id index."""

from __future__ import annotations

import numpy as np

from clipsearch.store.idmap import IdMap, hash_ids


def _write(path, ids, seqs, owner="db/default/t0", mark=7):
    hi, lo = hash_ids(ids)
    return IdMap.write(path, owner, mark, np.asarray(seqs, dtype=np.int64), hi, lo)


def test_a_written_map_finds_each_id_at_its_seq_and_holds_no_other(tmp_path):
    ids = [f"item-{i}" for i in range(5000)] + ["写真/東京.jpg", "사진.png", ""]
    seqs = np.random.default_rng(0).permutation(len(ids)) + 100
    written = _write(tmp_path / "default.ids", ids, seqs)
    idmap = IdMap.open(tmp_path / "default.ids", "db/default/t0")
    assert idmap == written and idmap.count == len(ids) and idmap.mark == 7
    asked = [*ids[::-3], "item-5000", "missing", "写真/東京"]
    held, found = idmap.find(asked)
    expected = dict(zip(ids, seqs.tolist(), strict=True))
    assert held.tolist() == [a in expected for a in asked]
    assert found.tolist() == [expected.get(a, -1) for a in asked]
    assert idmap.find([])[0].shape == (0,)
    assert not idmap.find(["photo-\udcff.jpg"])[0].any()  # a name that was not UTF-8: asked, not found


def test_a_map_of_another_owner_or_cut_short_is_not_read(tmp_path):
    path = tmp_path / "default.ids"
    _write(path, ["a", "b"], [1, 2])
    assert IdMap.open(path, "db/default/t1") is None  # a namespace made again under this name
    assert IdMap.open(tmp_path / "none.ids", "db/default/t0") is None
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    assert IdMap.open(path, "db/default/t0") is None
    path.write_bytes(b"not a map")
    assert IdMap.open(path, "db/default/t0") is None


def test_hashes_sharing_their_high_half_are_told_apart_and_whole_twins_are_left_out(tmp_path, monkeypatch):
    """Found by the high 64 bits first, then the low: a run of equal high halves is searched
    through. Two entries equal in all 128 bits cannot be told apart, so neither is held (their
    ids go to the database)."""
    hi = np.array([5, 5, 5, 9, 9, 1], dtype=np.uint64)
    lo = np.array([3, 1, 2, 4, 4, 8], dtype=np.uint64)
    seqs = np.array([10, 11, 12, 13, 14, 15], dtype=np.int64)
    idmap = IdMap.write(tmp_path / "x.ids", "o", 0, seqs, hi, lo)
    assert idmap.count == 4
    fake = {"p": (5, 1), "q": (5, 2), "r": (5, 3), "s": (9, 4), "t": (1, 8), "u": (5, 7), "v": (2, 8)}

    def hashes(ids):
        return (np.array([fake[i][0] for i in ids], dtype=np.uint64), np.array([fake[i][1] for i in ids], np.uint64))

    monkeypatch.setattr("clipsearch.store.idmap.hash_ids", hashes)
    held, found = idmap.find(list("pqrstuv"))
    assert held.tolist() == [True, True, True, False, True, False, False]
    assert found.tolist() == [11, 12, 10, -1, 15, -1, -1]
