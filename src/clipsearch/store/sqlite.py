"""The embedded store: one SQLite file (WAL) plus FAISS indexes kept beside it.

Layout: ``clipsearch.db`` holds namespaces (with their model identity), items (metadata,
content hash, float32 vector) and failures; ``clipsearch.db-index/<namespace>.faiss`` (+ ``.json``)
holds the derived search index, rebuilt whenever it is missing or stale.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import ModelIdentity
from ..errors import DimensionError, ModelMismatchError, NotFoundError, UsageError
from ..index import IndexSettings, VectorIndex
from .base import (
    Failure,
    FailureRecord,
    FileState,
    Hit,
    IndexStatus,
    Item,
    NamespaceInfo,
    NewItem,
    utcnow,
)

SCHEMA_VERSION = 1
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILTER_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_CHUNK = 500  # SQLite's bound-parameter limit is far above this

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    model_spec TEXT NOT NULL,
    dim INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    rebuild_generation INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (namespace, id)
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (namespace, sha256);
CREATE TABLE IF NOT EXISTS failures (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 1,
    first_failed_at TEXT NOT NULL,
    last_failed_at TEXT NOT NULL,
    PRIMARY KEY (namespace, id)
);
"""


def validate_namespace(name: str) -> str:
    if not _NAMESPACE_RE.match(name or ""):
        raise UsageError(
            f"bad namespace {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


class SQLiteStore:
    def __init__(self, path: str | Path, index_settings: IndexSettings | None = None):
        self.path = Path(path)
        self.location = str(self.path)
        self.index_settings = index_settings or IndexSettings.from_env()
        if self.path.parent and not self.path.parent.exists():
            raise UsageError(f"cannot create the database {self.path}: folder {self.path.parent} does not exist")
        self._lock = threading.RLock()
        self._indexes: dict[str, VectorIndex] = {}
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; only power loss may drop the last commit.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UsageError(f"{self.path} is not a clipsearch database ({e})") from None
        self._check_schema_version()

    @property
    def index_dir(self) -> Path:
        return self.path.with_name(self.path.name + "-index")

    def _index_path(self, namespace: str) -> Path:
        return self.index_dir / f"{namespace}.faiss"

    def _check_schema_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) > SCHEMA_VERSION:
            raise UsageError(
                f"{self.path} was written by a newer clipsearch (schema {row['value']}); upgrade clipsearch"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- namespaces --------------------------------------------------------------------
    def _info(self, row: sqlite3.Row) -> NamespaceInfo:
        return NamespaceInfo(
            name=row["name"],
            identity=ModelIdentity.from_dict(json.loads(row["identity"])),
            model_spec=json.loads(row["model_spec"]),
            items=row["items"],
            failures=row["failures"],
            created_at=row["created_at"],
        )

    _NS_SELECT = """
        SELECT n.*, (SELECT count(*) FROM items i WHERE i.namespace = n.name) AS items,
               (SELECT count(*) FROM failures f WHERE f.namespace = n.name) AS failures
        FROM namespaces n
    """

    def namespace(self, name: str) -> NamespaceInfo | None:
        rows = self._query(self._NS_SELECT + " WHERE n.name = ?", (name,))
        return self._info(rows[0]) if rows else None

    def namespaces(self) -> list[NamespaceInfo]:
        return [self._info(r) for r in self._query(self._NS_SELECT + " ORDER BY n.name")]

    def bind_namespace(self, name: str, identity: ModelIdentity, model_spec: dict[str, Any]) -> NamespaceInfo:
        validate_namespace(name)
        with self._tx() as conn:
            row = conn.execute("SELECT identity FROM namespaces WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO namespaces (name, identity, model_spec, dim, created_at) VALUES (?, ?, ?, ?, ?)",
                    (name, json.dumps(identity.as_dict()), json.dumps(model_spec), identity.dim, utcnow()),
                )
            else:
                existing = ModelIdentity.from_dict(json.loads(row["identity"]))
                check_same_model(name, existing, identity)
                conn.execute("UPDATE namespaces SET model_spec = ? WHERE name = ?", (json.dumps(model_spec), name))
        info = self.namespace(name)
        assert info is not None
        return info

    def _require(self, namespace: str) -> sqlite3.Row:
        rows = self._query("SELECT * FROM namespaces WHERE name = ?", (namespace,))
        if not rows:
            raise NotFoundError(f"namespace {namespace!r} does not exist in {self.location}; ingest into it first")
        return rows[0]

    def _select_in(self, sql: str, params: list, values: list) -> Iterator[sqlite3.Row]:
        """Run ``sql`` (ending in ``IN ({marks})``) over ``values`` in chunks."""
        for i in range(0, len(values), _CHUNK):
            chunk = values[i : i + _CHUNK]
            yield from self._query(sql.format(marks=",".join("?" * len(chunk))), [*params, *chunk])

    # -- writing -----------------------------------------------------------------------
    def _states(self, table: str, namespace: str, ids: list[str]) -> dict[str, FileState]:
        sql = f"SELECT id, sha256, size, mtime_ns FROM {table} WHERE namespace = ? AND id IN ({{marks}})"
        return {
            r["id"]: FileState(r["sha256"], r["size"], r["mtime_ns"]) for r in self._select_in(sql, [namespace], ids)
        }

    def file_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        return self._states("items", namespace, ids)

    def failure_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        return self._states("failures", namespace, ids)

    def write_batch(
        self,
        namespace: str,
        items: list[NewItem],
        vectors: np.ndarray,
        failures: list[FailureRecord] = (),  # type: ignore[assignment]
        touched: list[NewItem] = (),  # type: ignore[assignment]
    ) -> None:
        ns = self._require(namespace)
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(items) != len(vectors):
            raise ValueError("items and vectors differ in length")
        if len(items) and vectors.shape[1] != ns["dim"]:
            raise DimensionError(
                f"vectors have {vectors.shape[1]} dimensions; namespace {namespace!r} holds {ns['dim']}"
            )
        now = utcnow()
        replaced = False
        with self._tx() as conn:
            for item, vec in zip(items, vectors, strict=True):
                blob = vec.astype("<f4").tobytes()
                meta = json.dumps(item.metadata, ensure_ascii=False)
                cur = conn.execute(
                    "UPDATE items SET sha256=?, size=?, mtime_ns=?, metadata=?, vector=?, updated_at=? "
                    "WHERE namespace=? AND id=?",
                    (item.sha256, item.size, item.mtime_ns, meta, blob, now, namespace, item.id),
                )
                if cur.rowcount:
                    replaced = True
                else:
                    conn.execute(
                        "INSERT INTO items (namespace, id, sha256, size, mtime_ns, metadata, vector, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (namespace, item.id, item.sha256, item.size, item.mtime_ns, meta, blob, now, now),
                    )
            if items:
                conn.executemany(
                    "DELETE FROM failures WHERE namespace = ? AND id = ?",
                    [(namespace, it.id) for it in items],
                )
            for f in failures:
                conn.execute(
                    "INSERT INTO failures (namespace, id, source, reason, sha256, size, mtime_ns, metadata, "
                    "first_failed_at, last_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (namespace, id) DO UPDATE SET source=excluded.source, reason=excluded.reason, "
                    "sha256=excluded.sha256, size=excluded.size, mtime_ns=excluded.mtime_ns, "
                    "metadata=excluded.metadata, attempts=attempts + 1, last_failed_at=excluded.last_failed_at",
                    (
                        namespace,
                        f.id,
                        f.source,
                        f.reason,
                        f.sha256,
                        f.size,
                        f.mtime_ns,
                        json.dumps(f.metadata, ensure_ascii=False),
                        now,
                        now,
                    ),
                )
            conn.executemany(
                "UPDATE items SET size=?, mtime_ns=? WHERE namespace=? AND id=?",
                [(t.size, t.mtime_ns, namespace, t.id) for t in touched],
            )
            if items:
                conn.execute(
                    "UPDATE namespaces SET generation = generation + 1, "
                    "rebuild_generation = rebuild_generation + ? WHERE name = ?",
                    (1 if replaced else 0, namespace),
                )

    def delete_items(self, namespace: str, ids: list[str]) -> int:
        self._require(namespace)
        deleted = 0
        with self._tx() as conn:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                deleted += conn.execute(
                    f"DELETE FROM items WHERE namespace = ? AND id IN ({marks})", [namespace, *chunk]
                ).rowcount
            if deleted:
                conn.execute(
                    "UPDATE namespaces SET generation = generation + 1, "
                    "rebuild_generation = rebuild_generation + 1 WHERE name = ?",
                    (namespace,),
                )
        return deleted

    def clear_failures(self, namespace: str, ids: list[str]) -> None:
        with self._tx() as conn:
            conn.executemany("DELETE FROM failures WHERE namespace = ? AND id = ?", [(namespace, i) for i in ids])

    # -- reading -----------------------------------------------------------------------
    @staticmethod
    def _item(row: sqlite3.Row) -> Item:
        return Item(
            id=row["id"],
            namespace=row["namespace"],
            metadata=json.loads(row["metadata"]),
            sha256=row["sha256"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    _ITEM_COLS = "seq, id, namespace, metadata, sha256, created_at, updated_at"

    def get_items(self, namespace: str, ids: list[str]) -> list[Item]:
        sql = f"SELECT {self._ITEM_COLS} FROM items WHERE namespace = ? AND id IN ({{marks}})"
        found = {r["id"]: self._item(r) for r in self._select_in(sql, [namespace], ids)}
        return [found[i] for i in ids if i in found]

    def get_vectors(self, namespace: str, ids: list[str]) -> dict[str, np.ndarray]:
        sql = "SELECT id, vector FROM items WHERE namespace = ? AND id IN ({marks})"
        return {
            r["id"]: np.frombuffer(r["vector"], dtype="<f4").astype(np.float32)
            for r in self._select_in(sql, [namespace], ids)
        }

    def count(self, namespace: str) -> int:
        return int(self._query("SELECT count(*) AS n FROM items WHERE namespace = ?", (namespace,))[0]["n"])

    def failures(self, namespace: str | None = None) -> list[Failure]:
        sql = "SELECT * FROM failures"
        params: tuple = ()
        if namespace is not None:
            sql += " WHERE namespace = ?"
            params = (namespace,)
        rows = self._query(sql + " ORDER BY namespace, source", params)
        return [
            Failure(
                id=r["id"],
                source=r["source"],
                reason=r["reason"],
                sha256=r["sha256"],
                size=r["size"],
                mtime_ns=r["mtime_ns"],
                metadata=json.loads(r["metadata"]),
                namespace=r["namespace"],
                attempts=r["attempts"],
                first_failed_at=r["first_failed_at"],
                last_failed_at=r["last_failed_at"],
            )
            for r in rows
        ]

    def _iter_rows(self, namespace: str, after_seq: int, batch_size: int, with_items: bool) -> Iterator[tuple]:
        cols = self._ITEM_COLS + ", vector" if with_items else "seq, vector"
        last = after_seq
        while True:
            rows = self._query(
                f"SELECT {cols} FROM items WHERE namespace = ? AND seq > ? ORDER BY seq LIMIT ?",
                (namespace, last, batch_size),
            )
            if not rows:
                return
            last = rows[-1]["seq"]
            seqs = np.fromiter((r["seq"] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r["vector"] for r in rows), dtype="<f4").reshape(len(rows), -1)
            items = [self._item(r) for r in rows] if with_items else []
            yield seqs, items, vectors.astype(np.float32)

    def iter_vectors(self, namespace: str, batch_size: int = 10_000) -> Iterator[tuple[list[Item], np.ndarray]]:
        self._require(namespace)
        for _, items, vectors in self._iter_rows(namespace, 0, batch_size, with_items=True):
            yield items, vectors

    def hash_groups(self, namespace: str) -> list[list[Item]]:
        rows = self._query(
            f"SELECT {self._ITEM_COLS} FROM items WHERE namespace = ? AND sha256 IN ("
            "SELECT sha256 FROM items WHERE namespace = ? AND sha256 IS NOT NULL "
            "GROUP BY sha256 HAVING count(*) > 1) ORDER BY sha256, seq",
            (namespace, namespace),
        )
        groups: dict[str, list[Item]] = {}
        for r in rows:
            groups.setdefault(r["sha256"], []).append(self._item(r))
        return list(groups.values())

    # -- search ------------------------------------------------------------------------
    def _fresh_index(self, namespace: str) -> VectorIndex:
        """The namespace's index, brought up to date with the table (loaded, extended or rebuilt)."""
        ns = self._require(namespace)
        settings = self.index_settings
        with self._lock:
            index = self._indexes.get(namespace) or VectorIndex.load(self._index_path(namespace), settings)
            gen, rebuild_gen = ns["generation"], ns["rebuild_generation"]
            if index is not None and index.state.generation == gen and index.state.rebuild_generation == rebuild_gen:
                self._indexes[namespace] = index
                return index
            # counting rows is a scan (25 ms at 1M rows): only when the index must catch up
            count = self.count(namespace)
            kind = settings.kind_for(count)
            appendable = (
                index is not None
                and index.state.rebuild_generation == rebuild_gen
                and index.state.dim == ns["dim"]
                and index.state.kind == kind
            )
            if not appendable:
                index = VectorIndex.empty(kind, ns["dim"], settings)
            assert index is not None
            for seqs, _, vectors in self._iter_rows(namespace, index.state.max_seq, 50_000, with_items=False):
                index.add(seqs, vectors)
            index.state.generation, index.state.rebuild_generation = gen, rebuild_gen
            if index.state.count != count:
                # a writer committed while we read; the next search will catch up
                index.state.generation = -1
            else:
                index.save(self._index_path(namespace))
            self._indexes[namespace] = index
            return index

    def _allowed_seqs(self, namespace: str, filters: dict[str, Any]) -> np.ndarray:
        clauses, params = [], [namespace]
        for key, value in filters.items():
            if not _FILTER_KEY_RE.match(key):
                raise UsageError(f"bad filter key {key!r}")
            values = value if isinstance(value, list | tuple) else [value]
            path = f'$."{key}"'
            clauses.append(f"json_extract(metadata, ?) IN ({','.join('?' * len(values))})")
            params += [path, *values]
        rows = self._query(f"SELECT seq FROM items WHERE namespace = ? AND {' AND '.join(clauses)}", params)
        return np.fromiter((r["seq"] for r in rows), dtype=np.int64, count=len(rows))

    def search(
        self, namespace: str, queries: np.ndarray, k: int, filters: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        ns = self._require(namespace)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != ns["dim"]:
            raise DimensionError(
                f"query vector has {queries.shape[1]} dimensions; namespace {namespace!r} holds {ns['dim']}-d vectors"
            )
        index = self._fresh_index(namespace)
        allowed = self._allowed_seqs(namespace, filters) if filters else None
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        with self._lock:  # another thread may be extending this index object
            scores, seqs = index.search(queries, k, allowed)
        wanted = sorted({int(s) for s in seqs.ravel() if s >= 0})
        sql = f"SELECT {self._ITEM_COLS} FROM items WHERE seq IN ({{marks}})"
        by_seq = {r["seq"]: self._item(r) for r in self._select_in(sql, [], wanted)}
        return [
            [Hit(by_seq[int(s)], float(sc)) for sc, s in zip(row_scores, row_seqs, strict=True) if int(s) in by_seq]
            for row_scores, row_seqs in zip(scores, seqs, strict=True)
        ]

    def index_status(self, namespace: str) -> IndexStatus:
        ns = self._require(namespace)
        with self._lock:
            index = self._indexes.get(namespace) or VectorIndex.load(self._index_path(namespace), self.index_settings)
        if index is None:
            return IndexStatus(kind="none", fresh=False, vectors=0)
        fresh = (
            index.state.generation == ns["generation"] and index.state.rebuild_generation == ns["rebuild_generation"]
        )
        return IndexStatus(kind=index.state.kind, fresh=fresh, vectors=index.state.count)

    def build_index(self, namespace: str) -> IndexStatus:
        self._fresh_index(namespace)
        return self.index_status(namespace)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def check_same_model(namespace: str, existing: ModelIdentity, requested: ModelIdentity) -> None:
    """Refuse to mix two models' vectors in one namespace."""
    if existing.compat_key != requested.compat_key:
        raise ModelMismatchError(
            f"namespace {namespace!r} holds vectors of {existing.describe()}, but the model in use is "
            f"{requested.describe()} ({'; '.join(existing.differences(requested))}); use the same model, "
            "or another --namespace"
        )
