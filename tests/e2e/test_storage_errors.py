"""A disk that fails under the store: a write past the process's file-size limit (the kernel
refuses it, as a failing disk does) and a database whose pages were overwritten. Each is a
StorageError with SQLite's code; the CLI prints one line, HTTP answers a JSON 500 that keeps the
server's paths to itself, and a failed change leaves the store as it was."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import clipsearch
from clipsearch import StorageError
from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.identity import ModelIdentity
from clipsearch.server import ServerSettings, create_app

from ..conftest import RunningServer

DIM = 64


def _rows(prefix: str, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    return [f"{prefix}{i}" for i in range(n)], np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_a_write_the_disk_refuses_is_one_line_and_the_store_keeps_what_it_held(tmp_path):
    db = tmp_path / "lib.db"
    model = ModelIdentity("open_clip", "synthetic", "", DIM, {})
    with clipsearch.open(db) as c:
        ids, vectors = _rows("a", 10, 0)
        c.add_vectors(ids, vectors, [{"n": i} for i in range(10)], model=model)
    more, vectors = _rows("b", 3000, 1)
    np.save(tmp_path / "more.npy", vectors)
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in more))

    def limited() -> None:
        # writes past 64 KiB into any file fail with EFBIG, as a disk's failed write does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    args = ["import", "--npy", tmp_path / "more.npy", "--meta", tmp_path / "more.jsonl", "--db", db]
    done = subprocess.run(
        [sys.executable, "-m", "clipsearch", *map(str, args)],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},  # its own .pyc files are files too
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: the database {db} could not be read or written: disk I/O error (SQLITE_IOERR")
    assert "the transaction in progress was rolled back" in lines[0] and "dmesg" in lines[0]
    with clipsearch.open(db) as c:  # none of the refused import's rows, all of the earlier ones
        assert len(c) == 10 and sorted(it.id for it in c) == sorted(ids)
        assert c.search(vector=vectors[0], limit=1)[0].id in ids


def _damage(db: Path) -> None:
    """Overwrite every page after the tables' first pages with bytes no page can hold: the
    schema and the namespaces row still read, the items' rows do not."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    first = conn.execute("SELECT max(rootpage) FROM sqlite_master").fetchone()[0]
    conn.close()
    with db.open("r+b") as f:
        f.seek(first * page)  # page numbers count from 1: this is the page after the last root
        size = f.seek(0, 2) - first * page
        assert size > 50 * page  # the items' rows are there to damage
        f.seek(first * page)
        f.write(b"\xff" * size)


@pytest.fixture
def damaged(tmp_path, tiny_openclip) -> dict:
    db = tmp_path / "lib.db"
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    encoder = load_encoder(spec)
    ids, vectors = _rows("p", 2000, 2)
    with clipsearch.open(db) as c:
        c.add_vectors(ids, vectors[:, : encoder.dim], [{"shelf": f"s{i}"} for i in range(2000)], model=encoder.identity)
    _damage(db)
    return {"db": db, "spec": spec, "last": ids[-1]}


def test_a_damaged_database_is_a_storage_error_with_its_code(damaged):
    with clipsearch.open(damaged["db"]) as c, pytest.raises(StorageError) as caught:
        c.get([damaged["last"]])
    e = caught.value
    assert e.code.startswith("SQLITE_CORRUPT") and e.path == str(damaged["db"]) and not e.rolled_back
    assert "restore it from a backup" in str(e)


def test_a_damaged_database_over_http_is_a_json_500_without_the_servers_paths(damaged, caplog):
    spec = damaged["spec"]
    app = create_app(ServerSettings(db=str(damaged["db"])), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as client:
        r = client.get(f"/api/v1/items/{damaged['last']}")
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "storage_error"
        assert error["message"].startswith("the server could not read or write its database (SQLITE_CORRUPT")
        assert str(damaged["db"].parent) not in r.text
        assert client.get("/health").status_code == 200  # the server lives on
    assert any(str(damaged["db"]) in rec.getMessage() for rec in caplog.records)  # the operator's log says where


def test_a_log_removed_under_a_reader_says_so(tmp_path):
    """POSIX lets go of all of a process's locks on a file when any descriptor of it closes: a
    program that opens and closes the database beside SQLite leaves its connections unlocked, the
    next process to close believes itself the last and deletes the write-ahead log, and this
    process's next reads of the log come up short (what stopped a 10M benchmark in its deletes)."""
    db = tmp_path / "lib.db"
    model = ModelIdentity("open_clip", "synthetic", "", 8, {})
    ids = [f"r{i}" for i in range(20_000)]
    vectors = np.random.default_rng(3).standard_normal((20_000, 8)).astype(np.float32)
    with clipsearch.open(db) as c:
        c.add_vectors(ids, vectors, model=model)
        c.delete(ids[:5_000])  # 5,000 ids and more are looked up on several connections at once
        os.close(os.open(db, os.O_RDONLY))  # the locks of this process on the file are gone
        other = "import clipsearch, sys; clipsearch.open(sys.argv[1], create=False).close()"
        subprocess.run([sys.executable, "-c", other, str(db)], check=True)
        assert not Path(f"{db}-wal").exists()  # it believed itself the last, and removed the log
        c.delete(ids[5_000:10_000])  # written to the log this process still holds open
        with pytest.raises(StorageError) as caught:
            c.delete(ids[10_000:15_000])  # read by connections that open the log anew: empty
    assert caught.value.code == "SQLITE_IOERR_SHORT_READ" and caught.value.rolled_back
    assert "write-ahead log ended early" in str(caught.value) and "open the store again" in str(caught.value)
    with clipsearch.open(db) as c:  # the first connection's close wrote its log into the database
        assert len(c) == 10_000
