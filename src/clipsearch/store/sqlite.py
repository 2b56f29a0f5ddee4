"""The embedded store: one SQLite file (WAL) plus FAISS indexes kept beside it.

Layout: ``clipsearch.db`` holds namespaces (with their model identity), items (metadata,
content hash, float32 vector), their optional text vectors, an FTS5 keyword index over their
text and metadata, and failures; ``clipsearch.db-index/<namespace>.faiss`` (+ ``.json``, and
``text/<namespace>.faiss`` for text vectors) holds the derived vector index, rebuilt whenever it
is missing or stale.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotFoundError, StorageError, UsageError
from ..identity import ModelIdentity
from ..index import KINDS, MAX_DEAD_SHARE, IndexSettings, SaveCancelled, VectorIndex, search_effort
from ..keywords import index_text, query_terms
from .base import (
    ClosingStore,
    Failure,
    FailureRecord,
    FileState,
    Hit,
    IndexStatus,
    Item,
    NamespaceInfo,
    NewItem,
    as_number,
    check_browse,
    check_field,
    check_same_model,
    checked_batch,
    checked_queries,
    dead_owners,
    filter_folded,
    filter_ranges,
    filter_values,
    fold,
    keep_derived,
    keyword_text,
    like_prefix,
    utcnow,
    validate_namespace,
)
from .idmap import IdMap, hash_ids

SCHEMA_VERSION = 11
_ALLOWED_CACHE_ENTRIES = 16  # results of _versioned kept (filters' allowed ids)
_ALLOWED_CACHE_IDS = 2_000_000  # larger allow-lists (16 MB each) are found again each time


def _fold_text(value: Any) -> Any:
    return fold(value) if isinstance(value, str) else value


_CHUNK = 500  # SQLite's bound-parameter limit is far above this
# A delete of this many ids or more reads the id map (_lookup_large), and looks up what it cannot
# answer, where that is this many ids or more, on _LOOKUP_APART connections at once: at 10M
# rows, 100,000 ids looked up from a cold page cache took 2.3-3.7 s on one connection (a page read
# at a time) and 1.1-1.4 s on 8 (`benchmarks/scale.py`'s store); 1.8-3.4 s on 8 on a day when this
# disk served a third as many random reads a second (8,500-11,400 at 8 to 32 at once)
_LOOKUP_APART_IDS = 5_000
_LOOKUP_APART = 8
# the rows an id map holds, by the (namespace, id) index, which has both columns: no row of the
# table is read (at 10M rows its pages are most of a 55 GB file)
_MAP_ROWS = "SELECT seq, id FROM items WHERE namespace = ? AND seq NOT IN (SELECT seq FROM deleted)"
# SQLite's primary result codes for a disk that failed a read or write (IOERR), is full (FULL),
# or holds a damaged file (CORRUPT, NOTADB): StorageError, not a bug's traceback
_STORAGE_CODES = {10, 11, 13, 26}
_AUTOCHECKPOINT = 1000  # SQLite's default: pages in the write-ahead log that a commit checkpoints
_MAX_INDEXED_TEXT = 200  # longer text values (captions, paths) are filtered from the JSON


def _kind(value: Any) -> str:
    """A metadata value's kind, as ``metadata_keys`` reports it."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "null"
    return "list" if isinstance(value, list) else "object"


def _indexed(value: Any) -> tuple[str, Any] | None:
    """(kind, value) as ``item_values`` holds a scalar, or None for one it does not hold."""
    kind = _kind(value)
    if kind == "bool":
        return kind, int(value)
    if kind == "number" or (kind == "text" and len(value) <= _MAX_INDEXED_TEXT):
        return kind, value
    return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    model_spec TEXT NOT NULL,
    dim INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    rebuild_generation INTEGER NOT NULL DEFAULT 0,
    text_generation INTEGER NOT NULL DEFAULT 0,
    text_rebuild_generation INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    -- live rows (items, and items with a text vector), kept by every write in its transaction:
    -- counting them was an index scan of every row (~1 s at 10M rows, more from a cold disk)
    -- each time an index caught up, and on every `info`
    live_items INTEGER NOT NULL DEFAULT 0,
    live_texts INTEGER NOT NULL DEFAULT 0,
    -- rows marked deleted and not yet purged, kept likewise (`deleted` has no index by namespace)
    unpurged INTEGER NOT NULL DEFAULT 0
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
    fingerprint TEXT,
    text TEXT,
    UNIQUE (namespace, id)
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (namespace, sha256);
-- (namespace, seq): a namespace's rows in the order they were stored, read a page at a time
-- (_pages) by one range of this index. Without it SQLite took the sha256 index and sorted all
-- the rows after the page's start for each page: 2.8 s a page at 10M rows, 1.2 s read by rowid
CREATE INDEX IF NOT EXISTS items_namespace ON items (namespace);
CREATE TABLE IF NOT EXISTS text_vectors (
    seq INTEGER PRIMARY KEY REFERENCES items(seq) ON DELETE CASCADE,
    namespace TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS text_vectors_namespace ON text_vectors (namespace, seq);
-- rowid = items.seq, column weights in keyword_search: text 2, meta 1
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5(text, meta, tokenize = 'unicode61 remove_diacritics 2');
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
    fingerprint TEXT,
    PRIMARY KEY (namespace, id)
);
-- the rows that left each namespace (deleted, or re-embedded under a new seq), in order: an index
-- built up to mark M applies the entries after M instead of being rebuilt. Read by ranges of
-- marks, so no index by namespace: each would cost every delete a B-tree insert a row (schema 10)
CREATE TABLE IF NOT EXISTS removals (
    mark INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    seq INTEGER NOT NULL
);
-- the metadata's scalar values (a list's elements one by one, text up to _MAX_INDEXED_TEXT
-- characters): an equality filter finds its rows here instead of reading every row's JSON
CREATE TABLE IF NOT EXISTS item_values (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    value,
    seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, key, kind, value, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_values_seq ON item_values (seq);
-- per namespace, how many items hold each metadata key with each kind of value (Store.metadata_keys)
CREATE TABLE IF NOT EXISTS key_kinds (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (namespace, key, kind)
) WITHOUT ROWID;
-- rows deleted and not yet purged: a delete is a mark here (and an entry in removals, through
-- which the indexes drop them), honoured at once by every read (the live_* views). The rows,
-- their keywords and metadata values go when `index build` purges them or their id is written
-- again. A row's pages are not read to delete it: at 10M rows most are on disk, not in memory.
-- Purged by a scan in seq order and counted in namespaces.unpurged, with no index by namespace
-- (see removals: the two took 100,000 deletes at 10M rows from 2.0-2.3 s of inserts and commit
-- to 1.2-1.5 s)
CREATE TABLE IF NOT EXISTS deleted (seq INTEGER PRIMARY KEY, namespace TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (namespace, id)
);
"""

# columns added since schema 1 (ALTER TABLE ... ADD COLUMN when opening an older file)
_ADDED_COLUMNS = (
    ("namespaces", "text_generation", "INTEGER NOT NULL DEFAULT 0"),
    ("namespaces", "text_rebuild_generation", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "fingerprint", "TEXT"),
    ("items", "text", "TEXT"),
    ("failures", "fingerprint", "TEXT"),
    ("namespaces", "live_items", "INTEGER NOT NULL DEFAULT 0"),
    ("namespaces", "live_texts", "INTEGER NOT NULL DEFAULT 0"),
    ("namespaces", "unpurged", "INTEGER NOT NULL DEFAULT 0"),
)
_COUNTERS = {"image": ("generation", "rebuild_generation"), "text": ("text_generation", "text_rebuild_generation")}


class SQLiteStore(ClosingStore):
    def __init__(self, path: str | Path, index_settings: IndexSettings | None = None):
        self.path = Path(path)
        self.location = str(self.path)
        self.index_settings = index_settings or IndexSettings()
        if self.path.parent and not self.path.parent.exists():
            raise UsageError(f"cannot create the database {self.path}: folder {self.path.parent} does not exist")
        self._lock = threading.RLock()
        self._indexes: dict[str, VectorIndex] = {}
        # index files being written (_save_later): each file's thread, and what stops it
        self._saving: dict[Path, tuple[threading.Thread, threading.Event]] = {}
        self._saving_lock = threading.Lock()
        self._checkpoints: list[threading.Thread] = []  # _checkpoint_later
        self._stopped: set[Path] = set()  # index files whose write was stopped (_stop_saves)
        # per namespace, the seqs removed since its id map's mark (_removed_since): (the map's
        # token, the last mark read, those seqs sorted)
        self._map_removed: dict[str, tuple[str, int, np.ndarray]] = {}
        self._save_errors: list[OSError] = []
        # what _versioned keeps: ("allowed", namespace, filters) -> (the database's version then,
        # the ids they let through), and ("keys", namespace, exact) -> metadata_keys
        self._versions: OrderedDict[tuple[Any, ...], tuple[tuple[int, int], Any]] = OrderedDict()
        self._id: str | None = None
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; only power loss may drop the last commit.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # Debian's SQLite zeroes deleted content by default (SECURE_DELETE), which doubled the
            # pages a delete writes (82 against 47 us a row at commit); FAST zeroes only what
            # costs no extra I/O
            self._conn.execute("PRAGMA secure_delete=FAST")
            self._conn.create_function("cs_number", 1, as_number, deterministic=True)
            self._conn.create_function("cs_fold", 1, _fold_text, deterministic=True)
            self._migrate()
            # per connection (TEMP), so that they always have the tables' current columns
            for view, table in (("live_items", "items"), ("live_text_vectors", "text_vectors")):
                self._conn.execute(
                    f"CREATE TEMP VIEW {view} AS SELECT * FROM main.{table} "
                    "WHERE seq NOT IN (SELECT seq FROM main.deleted)"
                )
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF in (10, 13):  # the disk failed, or is full
                raise StorageError(str(self.path), e.sqlite_errorname, str(e), rolled_back=False) from e
            raise UsageError(f"{self.path} is not a clipsearch database ({e})") from None

    @property
    def index_dir(self) -> Path:
        return self.path.with_name(self.path.name + "-index")

    def _index_path(self, namespace: str, field: str = "image") -> Path:
        folder = self.index_dir if field == "image" else self.index_dir / field
        return folder / f"{namespace}.faiss"

    def _idmap_path(self, namespace: str) -> Path:
        return self.index_dir / f"{namespace}.ids"

    def _migrate(self) -> None:
        """Create the schema, or bring an older file up to this version (in one transaction)."""
        conn = self._conn
        version = None
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row["value"]) if row else None
        if version is not None and version > SCHEMA_VERSION:
            raise UsageError(f"{self.path} was written by a newer clipsearch (schema {version}); upgrade clipsearch")
        if version == SCHEMA_VERSION:
            return
        with self._tx():
            if version is not None:
                for table, column, decl in _ADDED_COLUMNS:
                    have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version is not None and version < 7:
                # the metadata's values and key kinds, indexed for filters (schema 7)
                conn.execute("DELETE FROM item_values")
                conn.execute("DELETE FROM key_kinds")
                kinds: Counter = Counter()
                for r in conn.execute("SELECT seq, namespace, metadata FROM items").fetchall():
                    self._index_metadata(conn, r["namespace"], r["seq"], json.loads(r["metadata"]), kinds)
                self._count_kinds(conn, kinds)
            if version is not None and version < 6:
                # keyword-index what older schemas stored (schema 1 had no index; up to 4 CJK
                # runs were indexed whole, so a word inside one could not be found; up to 5
                # folder names were not indexed, and "_" joined words)
                conn.execute("DELETE FROM items_fts")
                for r in conn.execute("SELECT seq, metadata, text FROM items").fetchall():
                    self._set_keywords(conn, r["seq"], r["text"], json.loads(r["metadata"]))
            if version is not None and version < 10:
                # every delete wrote these two indexes, and no read needs them; the marks awaiting
                # a purge are counted once, and kept by every write from now on (schema 10)
                conn.execute("DROP INDEX IF EXISTS removals_namespace")
                conn.execute("DROP INDEX IF EXISTS deleted_namespace")
                conn.execute(
                    "UPDATE namespaces SET unpurged = (SELECT count(*) FROM deleted d WHERE d.namespace = name)"
                )
            if version is not None and version < 9:
                # the live counts, counted once (schema 9 keeps them)
                for (name,) in conn.execute("SELECT name FROM namespaces").fetchall():
                    counts = (self._scan_count(conn, name, "image"), self._scan_count(conn, name, "text"))
                    conn.execute("UPDATE namespaces SET live_items = ?, live_texts = ? WHERE name = ?", (*counts, name))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # BEGIN and COMMIT inside the try: a KeyboardInterrupt (a second Ctrl-C or SIGTERM)
            # landing between BEGIN and the body, or just before COMMIT, must not leave the
            # connection inside a transaction that the next one cannot begin ("cannot start a
            # transaction within a transaction")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as e:
                failed = self._storage_error(e, change=True)
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # the log's uncommitted pages are never read: the change is gone either way
                        if failed is None:
                            raise
                if failed is not None:
                    raise failed from e
                raise

    def _query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock, self._reads():
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def _reads(self) -> Iterator[None]:
        """Reads outside a transaction: a failing disk raises StorageError (see _storage_error)."""
        try:
            yield
        except sqlite3.Error as e:
            failed = self._storage_error(e, change=False)
            if failed is None:
                raise
            raise failed from e

    def _storage_error(self, e: BaseException, change: bool) -> StorageError | None:
        """``e`` as the typed error a user can act on, where it says the disk failed a read or a
        write, is full or holds a damaged file (None for the rest: those are bugs). Raised by
        the store's own connection or by any of its others (a delete's lookups on several)."""
        if isinstance(e, StorageError):  # a read inside a transaction: rolled back with it
            return e if e.rolled_back or not change else StorageError(e.path, e.code, e.reason, True)
        code = getattr(e, "sqlite_errorcode", None)
        if not isinstance(e, sqlite3.Error) or code is None or code & 0xFF not in _STORAGE_CODES:
            return None
        return StorageError(str(self.path), getattr(e, "sqlite_errorname", "SQLITE_IOERR"), str(e), change)

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
        SELECT n.*, n.live_items AS items,
               (SELECT count(*) FROM failures f WHERE f.namespace = n.name) AS failures
        FROM namespaces n
    """

    def namespace(self, name: str) -> NamespaceInfo | None:
        rows = self._query(self._NS_SELECT + " WHERE n.name = ?", (name,))
        return self._info(rows[0]) if rows else None

    def identity(self, name: str) -> ModelIdentity | None:
        rows = self._query("SELECT identity FROM namespaces WHERE name = ?", (name,))
        return ModelIdentity.from_dict(json.loads(rows[0]["identity"])) if rows else None

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

    def _select_in(
        self, sql: str, params: list, values: list, conn: sqlite3.Connection | None = None
    ) -> Iterator[sqlite3.Row]:
        """Run ``sql`` (ending in ``IN ({marks})``) over ``values`` in chunks, on ``conn`` (a
        transaction's, or another connection's) or on the store's own."""
        for i in range(0, len(values), _CHUNK):
            chunk = values[i : i + _CHUNK]
            query = sql.format(marks=",".join("?" * len(chunk)))
            if conn is None:
                yield from self._query(query, [*params, *chunk])
            else:
                yield from conn.execute(query, [*params, *chunk]).fetchall()

    # -- writing -----------------------------------------------------------------------
    def _states(self, table: str, namespace: str, ids: list[str]) -> dict[str, FileState]:
        reason = "reason" if table == "failures" else "NULL AS reason"
        sql = (
            f"SELECT id, sha256, size, mtime_ns, fingerprint, {reason} FROM {table} "
            "WHERE namespace = ? AND id IN ({marks})"
        )
        return {
            r["id"]: FileState(r["sha256"], r["size"], r["mtime_ns"], r["fingerprint"], r["reason"])
            for r in self._select_in(sql, [namespace], ids)
        }

    def file_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        return self._states("live_items", namespace, ids)

    def failure_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        return self._states("failures", namespace, ids)

    @staticmethod
    def _set_text_vector(conn: sqlite3.Connection, namespace: str, seq: int, vector: np.ndarray | None) -> bool:
        """Store (or, for None, drop) an item's text vector; True if one was there before."""
        existed = conn.execute("DELETE FROM text_vectors WHERE seq = ?", (seq,)).rowcount > 0
        if vector is not None:
            blob = np.asarray(vector, dtype="<f4").tobytes()
            conn.execute("INSERT INTO text_vectors (seq, namespace, vector) VALUES (?, ?, ?)", (seq, namespace, blob))
        return existed

    @staticmethod
    def _set_keywords(conn: sqlite3.Connection, seq: int, text: str | None, metadata: dict[str, Any]) -> None:
        conn.execute("DELETE FROM items_fts WHERE rowid = ?", (seq,))
        conn.execute(
            "INSERT INTO items_fts (rowid, text, meta) VALUES (?, ?, ?)",
            (seq, index_text(text), index_text(keyword_text(metadata))),
        )

    def write_batch(
        self,
        namespace: str,
        items: list[NewItem],
        vectors: np.ndarray,
        failures: list[FailureRecord] = (),  # type: ignore[assignment]
        touched: list[NewItem] = (),  # type: ignore[assignment]
    ) -> None:
        ns = self._require(namespace)
        vectors = checked_batch(namespace, ns["dim"], items, vectors, touched)
        now = utcnow()
        text_changed = text_replaced = removed = False
        kinds: Counter = Counter()
        live = Counter()  # the namespace's live_items and live_texts, changed by this batch
        with self._tx() as conn:
            for item, vec in zip(items, vectors, strict=True):
                blob = vec.astype("<f4").tobytes()
                meta = json.dumps(item.metadata, ensure_ascii=False)
                row = conn.execute(
                    "SELECT seq, created_at, seq IN (SELECT seq FROM deleted) AS gone, "
                    "seq IN (SELECT seq FROM text_vectors) AS texted FROM items WHERE namespace = ? AND id = ?",
                    (namespace, item.id),
                ).fetchone()
                if row is not None:
                    # a new vector takes a new seq: the indexes drop the old one and append this one,
                    # where rewriting a vector in place would mean rebuilding them. A deleted row of
                    # this id is purged now (the indexes dropped it when it was deleted), and this
                    # one is a new item
                    self._remove_rows(conn, namespace, [row["seq"]], kinds, purge=bool(row["gone"]))
                    removed |= not row["gone"]
                    if row["gone"]:
                        row = None  # counted out when it was marked
                    else:
                        live["items"] -= 1
                        live["texts"] -= row["texted"]
                seq = conn.execute(
                    "INSERT INTO items (namespace, id, sha256, size, mtime_ns, metadata, vector, "
                    "created_at, updated_at, fingerprint, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        namespace,
                        item.id,
                        item.sha256,
                        item.size,
                        item.mtime_ns,
                        meta,
                        blob,
                        row["created_at"] if row is not None else now,
                        now,
                        item.fingerprint,
                        item.text,
                    ),
                ).lastrowid
                self._set_keywords(conn, seq, item.text, item.metadata)
                self._index_metadata(conn, namespace, seq, item.metadata, kinds)
                self._set_text_vector(conn, namespace, seq, item.text_vector)
                text_changed |= item.text_vector is not None
                live["items"] += 1
                live["texts"] += item.text_vector is not None
            for t in touched:
                row = conn.execute(
                    "SELECT seq, metadata FROM live_items WHERE namespace = ? AND id = ?", (namespace, t.id)
                ).fetchone()
                if row is None:
                    continue
                stored = json.loads(row["metadata"])
                metadata = keep_derived(t.metadata, stored)
                conn.execute(
                    "UPDATE items SET size=?, mtime_ns=?, metadata=?, fingerprint=?, text=?, updated_at=? WHERE seq=?",
                    (
                        t.size,
                        t.mtime_ns,
                        json.dumps(metadata, ensure_ascii=False),
                        t.fingerprint,
                        t.text,
                        now,
                        row["seq"],
                    ),
                )
                self._set_keywords(conn, row["seq"], t.text, metadata)
                self._unindex_metadata(conn, namespace, [row["seq"]], [stored], kinds)
                self._index_metadata(conn, namespace, row["seq"], metadata, kinds)
                had_text = self._set_text_vector(conn, namespace, row["seq"], t.text_vector)
                text_changed |= had_text or t.text_vector is not None
                live["texts"] += (t.text_vector is not None) - had_text
                # a text index can only be appended to in seq order: a changed or dropped text
                # vector of a kept row means rebuilding it (the image index is untouched)
                text_replaced |= had_text or t.text_vector is not None
            done = [(namespace, it.id) for it in (*items, *touched)]
            conn.executemany("DELETE FROM failures WHERE namespace = ? AND id = ?", done)
            for f in failures:
                conn.execute(
                    "INSERT INTO failures (namespace, id, source, reason, sha256, size, mtime_ns, metadata, "
                    "first_failed_at, last_failed_at, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (namespace, id) DO UPDATE SET source=excluded.source, reason=excluded.reason, "
                    "sha256=excluded.sha256, size=excluded.size, mtime_ns=excluded.mtime_ns, "
                    "metadata=excluded.metadata, attempts=attempts + 1, last_failed_at=excluded.last_failed_at, "
                    "fingerprint=excluded.fingerprint",
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
                        f.fingerprint,
                    ),
                )
            self._count_kinds(conn, kinds)
            self._count_live(conn, namespace, live)
            if items or text_changed:
                conn.execute(
                    "UPDATE namespaces SET generation = generation + ?, text_generation = text_generation + ?, "
                    "text_rebuild_generation = text_rebuild_generation + ? WHERE name = ?",
                    (
                        1 if items else 0,
                        1 if text_changed or removed else 0,
                        1 if text_replaced else 0,
                        namespace,
                    ),
                )

    @staticmethod
    def _index_metadata(
        conn: sqlite3.Connection, namespace: str, seq: int, metadata: dict[str, Any], kinds: Counter
    ) -> None:
        """Add a row's metadata to ``item_values``, and count its keys' kinds into ``kinds``
        (written to ``key_kinds`` once per transaction, _count_kinds)."""
        values = []
        for key, value in metadata.items():
            kinds[(namespace, key, _kind(value))] += 1
            for element in value if isinstance(value, list) else [value]:
                found = _indexed(element)
                if found is not None:
                    values.append((namespace, key, *found, seq))
        conn.executemany("INSERT OR IGNORE INTO item_values VALUES (?, ?, ?, ?, ?)", values)

    @staticmethod
    def _unindex_metadata(
        conn: sqlite3.Connection, namespace: str, seqs: list[int], metadatas: list[dict[str, Any]], kinds: Counter
    ) -> None:
        """Take rows' metadata out of ``item_values`` and their keys' kinds out of ``kinds``."""
        for metadata in metadatas:
            for key, value in metadata.items():
                kinds[(namespace, key, _kind(value))] -= 1
        conn.execute(f"DELETE FROM item_values WHERE seq IN ({','.join('?' * len(seqs))})", seqs)

    @staticmethod
    def _count_live(conn: sqlite3.Connection, namespace: str, live: Counter) -> None:
        if live["items"] or live["texts"]:
            conn.execute(
                "UPDATE namespaces SET live_items = live_items + ?, live_texts = live_texts + ? WHERE name = ?",
                (live["items"], live["texts"], namespace),
            )

    @staticmethod
    def _count_kinds(conn: sqlite3.Connection, kinds: Counter) -> None:
        conn.executemany(
            "INSERT INTO key_kinds (namespace, key, kind, n) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (namespace, key, kind) DO UPDATE SET n = n + excluded.n",
            [(*k, n) for k, n in kinds.items() if n],
        )

    def _remove_rows(
        self, conn: sqlite3.Connection, namespace: str, seqs: list[int], kinds: Counter, purge: bool = False
    ) -> None:
        """Delete rows (their keyword entries, metadata values and, by cascade, text vectors)
        and log their seqs for the indexes; ``purge``: rows marked deleted, whose seqs were
        logged when they were marked."""
        for i in range(0, len(seqs), _CHUNK):
            chunk = seqs[i : i + _CHUNK]
            rows = conn.execute(f"SELECT metadata FROM items WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
            self._unindex_metadata(conn, namespace, chunk, [json.loads(r["metadata"]) for r in rows], kinds)
        conn.executemany("DELETE FROM items_fts WHERE rowid = ?", [(s,) for s in seqs])
        conn.executemany("DELETE FROM items WHERE seq = ?", [(s,) for s in seqs])
        if purge:
            conn.executemany("DELETE FROM deleted WHERE seq = ?", [(s,) for s in seqs])
            conn.execute("UPDATE namespaces SET unpurged = unpurged - ? WHERE name = ?", (len(seqs), namespace))
        else:
            conn.executemany("INSERT INTO removals (namespace, seq) VALUES (?, ?)", [(namespace, s) for s in seqs])

    def delete_items(self, namespace: str, ids: list[str]) -> int:
        """Mark the items deleted (``deleted``) and log them for the indexes: every read skips
        them from this commit on, and ``purge_deleted`` removes their rows later. Nothing of the
        rows is read or written here: a delete costs the id lookups, in id order."""
        ns = self._require(namespace)
        ids = sorted(set(ids))
        self._stop_saves()  # the index changes at the next answer, and its file's write slows the lookups
        large = len(ids) >= _LOOKUP_APART_IDS and str(self.path) != ":memory:"
        with self._lock:
            if large:
                # the marks of random ids go into most pages of `deleted`: copying them from the
                # log into the database at the commit (SQLite's checkpoint, with its syncs) took
                # 0.4 s for 50,000 at 10M rows; done after the delete has returned instead
                self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            try:
                deleted = self._mark_deleted(ns, ids, large)
            finally:
                if large:
                    self._conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT}")
                    self._checkpoint_later()
        return deleted

    def _mark_deleted(self, ns: sqlite3.Row, ids: list[str], large: bool) -> int:
        namespace = ns["name"]
        with self._tx() as conn:
            found = self._lookup_large(conn, ns, ids) if large else self._lookup(conn, namespace, ids)
            found.sort()  # in seq order: each page of `deleted` is visited once
            seqs = [(s, namespace) for s in found]
            conn.executemany("INSERT INTO deleted (seq, namespace) VALUES (?, ?)", seqs)
            conn.executemany("INSERT INTO removals (seq, namespace) VALUES (?, ?)", seqs)
            deleted = len(seqs)
            texts = 0  # of the deleted rows, those with a text vector (looked up only where there are any)
            if deleted and conn.execute("SELECT live_texts FROM namespaces WHERE name = ?", (namespace,)).fetchone()[0]:
                sql = "SELECT count(*) AS n FROM text_vectors WHERE seq IN ({marks})"
                texts = sum(r["n"] for r in self._select_in(sql, [], found, conn))
            self._count_live(conn, namespace, Counter(items=-deleted, texts=-texts))
            if deleted:
                conn.execute("UPDATE namespaces SET unpurged = unpurged + ? WHERE name = ?", (deleted, namespace))
                # the indexes apply the logged removals: no rebuild
                conn.execute(
                    "UPDATE namespaces SET generation = generation + 1, text_generation = text_generation + 1 "
                    "WHERE name = ?",
                    (namespace,),
                )
        return deleted

    def _checkpoint_later(self) -> None:
        """Copy the write-ahead log into the database on a connection of its own, in the
        background (what SQLite does at a commit whose log has grown past _AUTOCHECKPOINT pages).
        Readers and writers go on meanwhile; `close` waits for it."""

        def run() -> None:
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                # and the log emptied, where no one reads from it (tried once, never waited for)
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                pass  # busy or interrupted: the next commit past _AUTOCHECKPOINT pages does it
            finally:
                conn.close()

        thread = threading.Thread(target=run, name="clipsearch-checkpoint")
        with self._saving_lock:
            self._checkpoints = [t for t in self._checkpoints if t.is_alive()] + [thread]
        thread.start()

    def _lookup(self, conn: sqlite3.Connection, namespace: str, ids: list[str]) -> list[int]:
        """The live seqs of ``ids``, looked up in the database (a random page read an id, from a
        cold page cache)."""
        if len(ids) >= _LOOKUP_APART_IDS and str(self.path) != ":memory:":
            return self._lookup_apart(namespace, ids)
        sql = "SELECT seq FROM live_items WHERE namespace = ? AND id IN ({marks})"
        return [r["seq"] for r in self._select_in(sql, [namespace], ids, conn)]

    def _lookup_large(self, conn: sqlite3.Connection, ns: sqlite3.Row, ids: list[str]) -> list[int]:
        """The live seqs of ``ids`` (5,000 or more), from the namespace's id map where `index
        build` wrote one (one sequential read of the file); the ids it does not hold, or holds at
        a seq removed since, are looked up in the database. Called inside the write transaction,
        after its BEGIN: a build that replaced the map meanwhile had replaced it before trimming
        the removals log, so the map read here has its log entries."""
        namespace = ns["name"]
        idmap = IdMap.open(self._idmap_path(namespace), self._index_owner(ns))
        if idmap is None:
            return self._lookup(conn, namespace, ids)
        held, seqs = idmap.find(ids)
        removed = self._removed_since(conn, namespace, idmap)
        if len(removed):
            at = np.minimum(np.searchsorted(removed, seqs), len(removed) - 1)
            held &= removed[at] != seqs
        if held.sum() >= _LOOKUP_APART_IDS:
            # the log has told of any mark since the map already; `deleted` is asked as well, on
            # several connections at once, for the pages the marks' inserts go into: read one at
            # a time by the inserts, they took 1.9-3.2 s of 100,000 deletes at 10M rows with 5.7M
            # marks awaiting a purge (the database's lookups read them the same way)
            marked = self._apart("SELECT seq FROM deleted WHERE seq IN ({marks})", [], np.sort(seqs[held]).tolist())
            held &= ~np.isin(seqs, np.asarray(marked, dtype=np.int64))
        rest = [ids[i] for i in np.flatnonzero(~held)]
        return seqs[held].tolist() + (self._lookup(conn, namespace, rest) if rest else [])

    @staticmethod
    def _logged(conn: sqlite3.Connection, namespace: str, after: int, upto: int) -> np.ndarray:
        """The seqs the removals log holds for the namespace after mark ``after`` up to ``upto``,
        in log order: read as one string that SQLite joins and NumPy parses (a row at a time
        through Python took 4.6-5.0 s for 5.2M entries, this 0.8 s)."""
        joined = conn.execute(
            "SELECT group_concat(seq, ' ') FROM removals WHERE mark > ? AND mark <= ? AND namespace = ?",
            (after, upto, namespace),
        ).fetchone()[0]
        return np.fromstring(joined, dtype=np.int64, sep=" ") if joined else np.empty(0, dtype=np.int64)

    def _removed_since(self, conn: sqlite3.Connection, namespace: str, idmap: IdMap) -> np.ndarray:
        """The seqs removed from the namespace since ``idmap``'s mark (sorted), read from the
        removals log; kept between calls, so that each reads only the log's new entries. Read
        as one string that SQLite joins and NumPy parses: a row at a time through Python took
        0.23 s for 840,000, and a store 25% deleted since its build holds 2.5M at 10M rows."""
        token, last, seqs = self._map_removed.get(namespace, ("", 0, np.empty(0, dtype=np.int64)))
        if token != idmap.token:
            last, seqs = idmap.mark, np.empty(0, dtype=np.int64)
        # no writer commits inside this transaction: nothing lands between the two reads
        end = conn.execute("SELECT coalesce(max(mark), 0) FROM removals").fetchone()[0]
        if end > last:
            new = np.sort(self._logged(conn, namespace, last, end))
            seqs = np.insert(seqs, np.searchsorted(seqs, new), new)  # merged: no sort of them all
            last = end
        self._map_removed[namespace] = (idmap.token, last, seqs)
        return seqs

    def _write_idmap(self, ns: sqlite3.Row) -> IdMap:
        """Write the namespace's id map from its live rows, read in one snapshot together with
        the last mark of the removals log (on a connection of its own: at 10M rows the read
        takes ~20 s, and the store's other users go on meanwhile)."""
        namespace = ns["name"]
        conn = sqlite3.connect(self.path, timeout=30)
        seqs, his, los = [], [], []
        try:
            with self._reads():
                conn.execute("BEGIN")
                mark = conn.execute("SELECT coalesce(max(mark), 0) FROM removals").fetchone()[0]
                cursor = conn.execute(_MAP_ROWS, (namespace,))
                while rows := cursor.fetchmany(100_000):
                    seqs.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
                    hi, lo = hash_ids([r[1] for r in rows])
                    his.append(hi)
                    los.append(lo)
        finally:
            conn.close()
        empty = np.empty(0, dtype=np.int64)
        return IdMap.write(
            self._idmap_path(namespace), self._index_owner(ns), mark,
            np.concatenate([empty, *seqs]), np.concatenate([empty.view(np.uint64), *his]),
            np.concatenate([empty.view(np.uint64), *los]),
        )  # fmt: skip

    def _idmap_behind(self, namespace: str, idmap: IdMap) -> int:
        """About how many of the live ids the map does not give as they are now: rows removed
        since it was written (their entries in the log) and rows written since (the live count
        past what it holds). A delete looks those up in the database."""
        since = self._query(
            "SELECT count(*) AS n FROM removals WHERE mark > ? AND namespace = ?", (idmap.mark, namespace)
        )[0]["n"]
        return since + max(0, self._count(namespace, "image") - idmap.count)

    def _lookup_apart(self, namespace: str, ids: list[str]) -> list[int]:
        """The live seqs of ``ids`` (sorted), looked up on _LOOKUP_APART connections at once
        (_apart), so that the disk serves many of the id index's page reads together instead of
        one at a time."""
        sql = "SELECT seq FROM items WHERE namespace = ? AND id IN ({marks}) AND seq NOT IN (SELECT seq FROM deleted)"
        return self._apart(sql, [namespace], ids)

    def _apart(self, sql: str, params: list, values: list) -> list:
        """The first column of ``sql`` (ending in ``IN ({marks})``) over ``values``, a slice at a
        time on _LOOKUP_APART connections at once. Called inside the write transaction: no other
        writer can commit meanwhile, so these connections see exactly what it does."""

        def lookup(part: list) -> list:
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                return [r[0] for r in self._select_in(sql, params, part, conn)]
            finally:
                conn.close()

        step = -(-len(values) // _LOOKUP_APART)
        with ThreadPoolExecutor(_LOOKUP_APART, thread_name_prefix="clipsearch-lookup") as pool:
            parts = pool.map(lookup, [values[i : i + step] for i in range(0, len(values), step)])
            return [value for part in parts for value in part]

    def purge_deleted(self, namespace: str, batch: int = 10_000) -> int:
        """Remove the rows marked deleted (their rows, keywords, metadata values and key counts),
        ``batch`` rows a transaction so that readers and writers wait no longer than one batch;
        returns how many. `index build` runs it."""
        self._require(namespace)
        purged = 0
        while True:
            kinds: Counter = Counter()
            with self._tx() as conn:
                seqs = [
                    r["seq"]
                    for r in conn.execute(
                        "SELECT seq FROM deleted WHERE namespace = ? ORDER BY seq LIMIT ?", (namespace, batch)
                    )
                ]
                if not seqs:
                    return purged
                self._remove_rows(conn, namespace, seqs, kinds, purge=True)
                self._count_kinds(conn, kinds)
            purged += len(seqs)

    def pending_purge(self, namespace: str) -> int:
        """How many rows are marked deleted and not yet purged."""
        return int(self._query("SELECT unpurged AS n FROM namespaces WHERE name = ?", (namespace,))[0]["n"])

    def claim(self, namespace: str, ids: list[str], owner: str, lease_seconds: float = 600) -> set[str]:
        if not ids:
            return set()
        now = time.time()
        claimed: set[str] = set()
        with self._tx() as conn:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                others = [
                    r["owner"]
                    for r in conn.execute(
                        f"SELECT DISTINCT owner FROM claims WHERE namespace = ? AND id IN ({marks}) AND owner <> ?",
                        [namespace, *chunk, owner],
                    )
                ]
                dead = dead_owners(others)
                conn.execute(
                    f"DELETE FROM claims WHERE namespace = ? AND id IN ({marks}) "
                    f"AND (expires_at < ? OR owner IN ({','.join('?' * len(dead)) or 'NULL'}))",
                    [namespace, *chunk, now, *dead],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO claims (namespace, id, owner, expires_at) VALUES (?, ?, ?, ?)",
                    [(namespace, item_id, owner, now + lease_seconds) for item_id in chunk],
                )
                claimed.update(
                    r["id"]
                    for r in conn.execute(
                        f"SELECT id FROM claims WHERE namespace = ? AND id IN ({marks}) AND owner = ?",
                        [namespace, *chunk, owner],
                    )
                )
        return claimed

    def release(self, namespace: str, owner: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM claims WHERE namespace = ? AND owner = ?", (namespace, owner))

    def schema_version(self) -> int:
        return int(self._query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"])

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
        sql = f"SELECT {self._ITEM_COLS} FROM live_items WHERE namespace = ? AND id IN ({{marks}})"
        found = {r["id"]: self._item(r) for r in self._select_in(sql, [namespace], ids)}
        return [found[i] for i in ids if i in found]

    def get_vectors(self, namespace: str, ids: list[str]) -> dict[str, np.ndarray]:
        sql = "SELECT id, vector FROM live_items WHERE namespace = ? AND id IN ({marks})"
        return {
            r["id"]: np.frombuffer(r["vector"], dtype="<f4").astype(np.float32)
            for r in self._select_in(sql, [namespace], ids)
        }

    def count(self, namespace: str) -> int:
        return self._count(namespace, "image")

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

    def _iter_rows(
        self, namespace: str, after_seq: int, batch_size: int, with_items: bool, field: str = "image"
    ) -> Iterator[tuple]:
        if field == "text":
            table, cols = "live_text_vectors", "seq, vector"
        else:
            table, cols = "live_items", (self._ITEM_COLS + ", vector" if with_items else "seq, vector")
        for rows in self._pages(table, cols, namespace, after_seq, batch_size):
            seqs = np.fromiter((r["seq"] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r["vector"] for r in rows), dtype="<f4").reshape(len(rows), -1)
            items = [self._item(r) for r in rows] if with_items and field == "image" else []
            yield seqs, items, vectors.astype(np.float32)

    def _pages(self, table: str, cols: str, namespace: str, after_seq: int, batch_size: int) -> Iterator[list]:
        """A namespace's rows of ``table`` in the order they were stored, ``batch_size`` at a time
        (keyset pagination on ``seq``: each page is one indexed range read, however deep)."""
        last = after_seq
        while True:
            rows = self._query(
                f"SELECT {cols} FROM {table} WHERE namespace = ? AND seq > ? ORDER BY seq LIMIT ?",
                (namespace, last, batch_size),
            )
            if not rows:
                return
            last = rows[-1]["seq"]
            yield rows

    def iter_items(self, namespace: str, batch_size: int = 10_000) -> Iterator[list[Item]]:
        self._require(namespace)
        for rows in self._pages("live_items", self._ITEM_COLS, namespace, 0, batch_size):
            yield [self._item(r) for r in rows]

    def iter_vectors(self, namespace: str, batch_size: int = 10_000) -> Iterator[tuple[list[Item], np.ndarray]]:
        self._require(namespace)
        for _, items, vectors in self._iter_rows(namespace, 0, batch_size, with_items=True):
            yield items, vectors

    def hash_groups(self, namespace: str) -> list[list[Item]]:
        rows = self._query(
            f"SELECT {self._ITEM_COLS} FROM live_items WHERE namespace = ? AND sha256 IN ("
            "SELECT sha256 FROM live_items WHERE namespace = ? AND sha256 IS NOT NULL "
            "GROUP BY sha256 HAVING count(*) > 1) ORDER BY sha256, seq",
            (namespace, namespace),
        )
        groups: dict[str, list[Item]] = {}
        for r in rows:
            groups.setdefault(r["sha256"], []).append(self._item(r))
        return list(groups.values())

    # -- search ------------------------------------------------------------------------
    def prepare_search(self, namespace: str, field: str = "image") -> None:
        self._require(namespace)
        self._fresh_index(namespace, field).keep_resident()

    def keep_resident(self, namespace: str, field: str = "image") -> None:
        self._require(namespace)
        self._fresh_index(namespace, field).keep_resident(wait=True)

    def _fresh_index(
        self, namespace: str, field: str = "image", compact: bool = False, rebuild: bool = False
    ) -> VectorIndex:
        """The namespace's index of ``field`` vectors, brought up to date with the table: loaded,
        then the logged removals applied and new rows appended; rebuilt only when it is missing,
        another database's, of the wrong kind, outgrown (IVF-PQ: trained on far fewer vectors),
        or (HNSW) more than ``MAX_DEAD_SHARE`` tombstones. (An IVF-PQ index whose fp16 file is
        mostly removed rows is not rebuilt: its write rewrites that file, after the answer.)
        ``compact``: rebuild any index that holds tombstones. ``rebuild`` (``index build``): also
        retrain an IVF-PQ index, and choose the kind again where an earlier build was asked for one."""
        check_field(field)
        ns = self._require(namespace)
        settings = self.index_settings
        path = self._index_path(namespace, field)
        gen_col, rebuild_col = _COUNTERS[field]
        with self._lock:
            index = self._indexes.get((namespace, field)) or VectorIndex.load(path, settings)
            owner = self._index_owner(ns)
            if index is not None and index.state.owner != owner:
                index = None  # another database's (or an earlier namespace's) index at this path
            previous = index
            if index is not None and settings.kind != "auto" and index.state.kind != settings.kind:
                index = None  # a kind was asked for explicitly: build that one
            if index is not None and ((compact and index.state.dead) or (rebuild and index.state.kind == "ivfpq")):
                index = None
            if index is not None and rebuild and index.state.asked and settings.kind == "auto":
                index = None  # `index build --kind auto`: chosen by size again
            gen, rebuild_gen = ns[gen_col], ns[rebuild_col]
            if index is not None and index.state.generation == gen and index.state.rebuild_generation == rebuild_gen:
                self._indexes[(namespace, field)] = index
                if index.unsaved and path in self._stopped and path not in self._saving:
                    self._save_later(index, path)  # a delete stopped its write, and changed nothing
                return index
            # an index is changed (or replaced) only once its file is no longer being written: that
            # file would be out of date on arrival, so it is stopped; the answer after writes it again
            self._stop_saves(path)
            # read before the rows: a removal committed meanwhile is applied next time
            last = self._query("SELECT mark FROM removals WHERE namespace = ? ORDER BY mark DESC LIMIT 1", (namespace,))
            last_mark = last[0]["mark"] if last else None
            count = self._count(namespace, field)
            asked = settings.kind != "auto"
            if not asked and previous is not None and previous.state.asked and not rebuild:
                # `index build --kind` chose it: kept until `index build --kind auto`
                kind, reason, asked = previous.state.kind, previous.state.reason, True
            else:
                kind, reason = settings.choose(count, ns["dim"], current=previous.state.kind if previous else None)
            appendable = (
                index is not None
                and index.state.rebuild_generation == rebuild_gen
                and index.state.dim == ns["dim"]
                and index.state.kind == kind
                and index.can_grow_to(count)
            )
            if appendable:
                assert index is not None
                index.remove(self._logged(self._conn, namespace, index.state.removal_mark, last_mark or 0))
                appendable = index.dead_share <= MAX_DEAD_SHARE
            rebuilt = not appendable
            if rebuilt:
                index = VectorIndex.empty(
                    kind, ns["dim"], settings, path=path, count=count,
                    sample=lambda n: self._sample_vectors(namespace, field, n),
                )  # fmt: skip
                index.state.reason = reason
                index.state.asked = asked
            assert index is not None
            index.state.owner = owner
            index.state.removal_mark = last_mark or 0
            rows = self._iter_rows(namespace, index.state.max_seq, 50_000, with_items=False, field=field)
            try:
                for seqs, _, vectors in rows:
                    index.add(seqs, vectors)
            except FileNotFoundError:
                # another process rebuilt this IVF index (and removed the vector file this one
                # appends to): use its build
                self._indexes.pop((namespace, field), None)
                return self._fresh_index(namespace, field, compact, rebuild)
            index.state.generation, index.state.rebuild_generation = gen, rebuild_gen
            if index.state.live != count:
                # a writer committed while we read; the next search will catch up
                index.state.generation = -1
            elif rebuilt or compact or index.small:
                index.save(path)
            elif index.worth_saving() or index.wasteful:
                self._save_later(index, path)  # (wasteful: its fp16 file is rewritten first)
            self._indexes[(namespace, field)] = index
            return index

    def _save_later(self, index: VectorIndex, path: Path) -> None:
        """Write a large index that was only caught up (rows added or removed since its file was
        written) after the answer, not before it: at 10M vectors the IVF-PQ file is 1.3 GB, and
        writing it made the first answer after deleting 100,000 rows ~5 s later. Searches go on
        meanwhile (writing only reads the index). A change to the index, or a delete (its id
        lookups are random reads that the write's would slow), stops the write (_stop_saves); the
        answer after the change starts it again. The thread is not a daemon: a process that
        answered and exits still leaves the file written, so that the next process need not
        catch up again."""
        cancel = threading.Event()

        def write() -> None:
            try:
                index.save(path, cancel)
            except SaveCancelled:
                # the file stays as it was, and says so (whoever reads it catches up); the answer
                # after the change writes it again, or, where the index did not change, the next
                with self._saving_lock:
                    self._stopped.add(path)
            except OSError as error:  # a full disk: said by the next wait, not lost in a thread
                self._save_errors.append(error)

        thread = threading.Thread(target=write, name=f"clipsearch-save-{path.name}")
        with self._saving_lock:
            self._saving[path] = (thread, cancel)
            self._stopped.discard(path)
        thread.start()

    def _stop_saves(self, path: Path | None = None) -> None:
        """Stop writing the index file at ``path`` (every one when None) and wait until it has
        stopped (within SAVE_PIECE): a write stopped before it landed leaves the old file."""
        with self._saving_lock:
            for at, (_, cancel) in self._saving.items():
                if path is None or at == path:
                    cancel.set()
        self.wait_for_saves(path)

    def wait_for_saves(self, path: Path | None = None) -> None:
        """Return once the index files this store writes in the background (the one at ``path``,
        or all) are written or stopped; raise the error that stopped one (the file stays as it
        was: the next process catches up)."""
        with self._saving_lock:
            saving = [(at, thread) for at, (thread, _) in self._saving.items() if path is None or at == path]
        for at, thread in saving:
            thread.join()
            with self._saving_lock:
                if self._saving.get(at, (None,))[0] is thread:
                    del self._saving[at]
        if self._save_errors:
            error = self._save_errors[0]
            self._save_errors.clear()
            raise error

    def _index_owner(self, ns: sqlite3.Row) -> str:
        """What an index file must name to be this namespace's: the database's own id (written
        once, when the file is created) and the namespace's name and creation time. An index left
        beside a database that was replaced, or by a namespace that was dropped, names another."""
        return f"{self._store_id()}/{ns['name']}/{ns['created_at']}"

    def _store_id(self) -> str:
        if self._id is None:
            with self._lock:  # a file from before ids were written gets one now
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            self._id = str(self._query("SELECT value FROM meta WHERE key = 'store_id'")[0]["value"])
        return self._id

    def _sample_vectors(self, namespace: str, field: str, n: int) -> np.ndarray:
        """``n`` of the namespace's vectors drawn at random (the same ones each time): what an
        IVF-PQ index is trained on. Random, not the first ``n``: a catalog is often stored by
        topic."""
        table = "live_text_vectors" if field == "text" else "live_items"
        rows = self._query(f"SELECT seq FROM {table} WHERE namespace = ?", (namespace,))
        seqs = np.fromiter((r["seq"] for r in rows), dtype=np.int64, count=len(rows))
        picked = np.sort(np.random.default_rng(0).choice(seqs, min(n, len(seqs)), replace=False))
        sql = f"SELECT vector FROM {table} WHERE seq IN ({{marks}})"
        blobs = [r["vector"] for r in self._select_in(sql, [], picked.tolist())]
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1).astype(np.float32)

    def _count(self, namespace: str, field: str) -> int:
        """The namespace's live rows of ``field`` (the counts every write keeps)."""
        column = "live_texts" if field == "text" else "live_items"
        rows = self._query(f"SELECT {column} AS n FROM namespaces WHERE name = ?", (namespace,))
        return int(rows[0]["n"]) if rows else 0

    @staticmethod
    def _scan_count(conn: sqlite3.Connection, namespace: str, field: str) -> int:
        """Count the live rows of ``field`` from the tables (a migration's one pass): all of them
        less those marked deleted, from indexes alone (through live_* every row would be tested; a
        join on the tables reads each marked row's page: 20 s for 100,000 marks at 10M rows, from
        disk). Every marked seq has its row in ``items`` (both go in one transaction);
        ``text_vectors`` holds only some."""
        if field == "text":
            marked = (
                "SELECT count(*) FROM deleted d WHERE d.namespace = ? AND EXISTS "
                "(SELECT 1 FROM text_vectors t INDEXED BY text_vectors_namespace "
                "WHERE t.namespace = d.namespace AND t.seq = d.seq)"
            )
            table = "text_vectors"
        else:
            marked, table = "SELECT count(*) FROM deleted WHERE namespace = ?", "items"
        sql = f"SELECT (SELECT count(*) FROM {table} WHERE namespace = ?) - ({marked}) AS n"
        return int(conn.execute(sql, (namespace, namespace)).fetchone()["n"])

    @staticmethod
    def _filter_sql(filters: dict[str, Any] | None, alias: str = "") -> tuple[str, list[Any]]:
        """`` AND ...`` clauses for the filters, by the rules of ``clipsearch.filters``: each
        condition holds when the value, or any element of a list value, passes it. ``json_each``
        yields a scalar once and a list's elements one by one, each with its JSON type."""
        clauses, params = [], []

        def any_element(path: str, test: str, values: list[Any]) -> None:
            clauses.append(
                f"json_type({alias}metadata, ?) <> 'object' AND "
                f"EXISTS (SELECT 1 FROM json_each({alias}metadata, ?) WHERE {test})"
            )
            params.extend([path, path, *values])

        for key, wanted in filter_values(filters):
            tests, values = [], []
            for v in wanted:
                if isinstance(v, bool):
                    tests.append("type = ?")
                    values.append("true" if v else "false")
                elif isinstance(v, int | float):
                    tests.append("(type IN ('integer', 'real') AND value = ?)")
                    values.append(v)
                else:
                    tests.append("(type = 'text' AND value = ?)")
                    values.append(str(v))
            any_element(f'$."{key}"', " OR ".join(tests), values)
        for r in filter_ranges(filters):
            if r.number is None:
                any_element(f'$."{r.key}"', f"type = 'text' AND value {r.sql} ?", [r.text])
                continue
            test = (
                f"(type IN ('integer', 'real') AND value {r.sql} ?) "
                f"OR (type = 'text' AND cs_number(value) {r.sql} ?) "
                f"OR (type = 'text' AND cs_number(value) IS NULL AND value {r.sql} ?)"
            )
            any_element(f'$."{r.key}"', test, [r.number, r.number, r.text])
        for key, texts in filter_folded(filters):
            marks = ", ".join("?" * len(texts))
            any_element(f'$."{key}"', f"type = 'text' AND cs_fold(value) IN ({marks})", texts)
        return "".join(f" AND {c}" for c in clauses), params

    def _indexed_filter_sql(self, namespace: str, filters: dict[str, Any] | None, alias: str = "") -> tuple[str, list]:
        """``_filter_sql``, with the rows an equality condition names in ``item_values`` as a
        condition SQLite can start from (an index lookup, not a read of every row's JSON)."""
        where, params = self._filter_sql(filters, alias)
        found, found_params, _ = self._values_sql(namespace, filters) if filters else ("", [], False)
        if found:
            where += f" AND {alias}seq IN ({found})"
            params = [*params, *found_params]
        return where, params

    @staticmethod
    def _values_sql(namespace: str, filters: dict[str, Any]) -> tuple[str, list[Any], bool]:
        """A query for the seqs that the filters' equality conditions name, from ``item_values``
        (an index range per value: no JSON is read), or "" where none can be answered there (a
        range only, or a text longer than it holds). Several keys: the rows they all name. And
        whether that query is the whole answer: equality conditions only, each answered there
        (item_values holds exactly what the JSON rules compare: typed scalars, list elements)."""
        parts, params = [], []
        complete = not filter_ranges(filters) and not filter_folded(filters)
        for key, wanted in filter_values(filters):
            by_kind: dict[str, list[Any]] = {}
            for v in wanted:
                found = _indexed(v)
                if found is None:
                    complete = False
                    break
                by_kind.setdefault(found[0], []).append(found[1])
            else:
                tests = " OR ".join(f"(kind = ? AND value IN ({','.join('?' * len(vs))}))" for vs in by_kind.values())
                parts.append(f"SELECT seq FROM item_values WHERE namespace = ? AND key = ? AND ({tests})")
                params += [namespace, key]
                for kind, vs in by_kind.items():
                    params += [kind, *vs]
        return " INTERSECT ".join(parts), params, complete and bool(parts)

    def _allowed_seqs(self, namespace: str, filters: dict[str, Any]) -> np.ndarray:
        """The seqs of the rows ``filters`` lets through: with an equality condition, the rows it
        names in ``item_values`` (an index lookup) tested against every condition; else every
        row's JSON is read (about 240 ms at 100k rows). Either way they are kept while the
        database is unchanged: a catalog is searched again and again with the same filter (its
        client). The version is SQLite's ``data_version`` (commits by other connections) with
        this connection's own changes."""

        def compute() -> np.ndarray:
            found, found_params, complete = self._values_sql(namespace, filters)
            if complete:  # nothing to test again
                sql, args = f"SELECT seq FROM ({found}) WHERE seq NOT IN (SELECT seq FROM deleted)", found_params
            else:
                where, params = self._filter_sql(filters)
                if found:
                    # the rows an equality condition names, from item_values, tested against every
                    # condition (CROSS JOIN: SQLite reads those rows, not the table)
                    sql = (
                        f"SELECT i.seq FROM ({found}) v CROSS JOIN live_items i ON i.seq = v.seq "
                        f"WHERE i.namespace = ?{where}"
                    )
                    args = [*found_params, namespace, *params]
                else:
                    sql, args = f"SELECT seq FROM live_items WHERE namespace = ?{where}", [namespace, *params]
            rows = self._query(sql, args)
            return np.sort(np.fromiter((r["seq"] for r in rows), dtype=np.int64, count=len(rows)))

        key = ("allowed", namespace, json.dumps(filters, sort_keys=True, default=str))
        seqs = self._versioned(key, compute)
        if len(seqs) > _ALLOWED_CACHE_IDS:  # too large to keep (16 MB each): found again each time
            with self._lock:
                self._versions.pop(key, None)
        return seqs

    def _items_by_seq(self, seqs: set[int]) -> dict[int, Item]:
        sql = f"SELECT {self._ITEM_COLS} FROM live_items WHERE seq IN ({{marks}})"
        return {r["seq"]: self._item(r) for r in self._select_in(sql, [], sorted(seqs))}

    def search(
        self,
        namespace: str,
        queries: np.ndarray,
        k: int,
        filters: dict[str, Any] | None = None,
        field: str = "image",
    ) -> list[list[Hit]]:
        ns = self._require(namespace)
        queries = checked_queries(namespace, ns["dim"], queries)
        index = self._fresh_index(namespace, field)
        allowed = self._allowed_seqs(namespace, filters) if filters else None
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        with self._lock:  # another thread may be extending this index object
            scores, seqs = index.search(queries, k, allowed)
        by_seq = self._items_by_seq({int(s) for s in seqs.ravel() if s >= 0})
        return [
            [Hit(by_seq[int(s)], float(sc)) for sc, s in zip(row_scores, row_seqs, strict=True) if int(s) in by_seq]
            for row_scores, row_seqs in zip(scores, seqs, strict=True)
        ]

    def count_by(self, namespace: str, key: str) -> list[tuple[Any, int]]:
        self._require(namespace)
        path = '$."' + key.replace('"', '""') + '"'
        # json_each walks a list's elements, and yields a scalar as itself
        rows = self._query(
            "SELECT j.value AS value, count(*) AS n FROM live_items i, json_each(i.metadata, ?) j "
            "WHERE i.namespace = ? AND j.type NOT IN ('object', 'array', 'null') "
            "GROUP BY j.value ORDER BY n DESC, value",
            (path, namespace),
        )
        missing = self._query(
            "SELECT count(*) AS n FROM live_items WHERE namespace = ? "
            "AND coalesce(json_type(metadata, ?), 'null') = 'null'",
            (namespace, path),
        )[0]["n"]
        counts = [(r["value"], int(r["n"])) for r in rows]
        return counts + ([(None, int(missing))] if missing else [])

    def _versioned(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept while the database is unchanged (SQLite's ``data_version``: commits
        by other connections, with this connection's own changes)."""
        with self._lock:
            version = (self._conn.execute("PRAGMA data_version").fetchone()[0], self._conn.total_changes)
            cached = self._versions.get(key)
            if cached is not None and cached[0] == version:
                self._versions.move_to_end(key)
                return cached[1]
        value = compute()
        with self._lock:
            self._versions[key] = (version, value)
            while len(self._versions) > _ALLOWED_CACHE_ENTRIES:
                self._versions.popitem(last=False)
        return value

    def metadata_keys(self, namespace: str, exact: bool = True) -> dict[str, dict[str, int]]:
        self._require(namespace)

        def compute() -> dict[str, dict[str, int]]:
            # kept by every write (key_kinds), less the rows marked deleted and not yet purged
            # (which key_kinds still counts: their rows are not read when they are deleted, and
            # reading them here costs a page each; a filter's check asks without: exact=False)
            counts = Counter(
                {(r["key"], r["kind"]): int(r["n"]) for r in self._query(
                    "SELECT key, kind, n FROM key_kinds WHERE namespace = ? AND n > 0", (namespace,)
                )}
            )  # fmt: skip
            sql = "SELECT i.metadata FROM deleted d JOIN items i ON i.seq = d.seq WHERE d.namespace = ?"
            for r in self._query(sql, (namespace,)) if exact else []:
                for key, value in json.loads(r["metadata"]).items():
                    counts[(key, _kind(value))] -= 1
            keys: dict[str, dict[str, int]] = {}
            for (key, kind), n in sorted(counts.items()):
                if n > 0:
                    keys.setdefault(key, {})[kind] = n
            return keys

        return {key: dict(kinds) for key, kinds in self._versioned(("keys", namespace, exact), compute).items()}

    def list_items(
        self,
        namespace: str,
        *,
        offset: int = 0,
        limit: int = 40,
        filters: dict[str, Any] | None = None,
        order: str = "newest",
        folder: str | None = None,
    ) -> tuple[list[Item], int]:
        check_browse(order, offset, limit)
        self._require(namespace)
        where, params = self._indexed_filter_sql(namespace, filters, "")
        if folder:
            where += " AND json_extract(metadata, '$.path') LIKE ? ESCAPE '\\'"
            params.append(like_prefix(folder))
        sort = {
            "newest": "seq DESC",
            "oldest": "seq",
            "taken": "json_extract(metadata, '$.taken_at') IS NULL, json_extract(metadata, '$.taken_at') DESC, "
            "seq DESC",
        }[order]
        rows = self._query(
            f"SELECT {self._ITEM_COLS} FROM live_items WHERE namespace = ?{where} ORDER BY {sort} LIMIT ? OFFSET ?",
            [namespace, *params, limit, offset],
        )
        total = self._query(f"SELECT count(*) AS n FROM live_items WHERE namespace = ?{where}", [namespace, *params])
        return [self._item(r) for r in rows], int(total[0]["n"])

    def keyword_search(self, namespace: str, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        self._require(namespace)
        # each term a quoted phrase of word-character tokens: the user's text is never parsed
        # as FTS5 syntax (AND, NEAR, col:); a one-character CJK term is a prefix query
        match = " OR ".join('"' + " ".join(t.tokens) + '"' + ("*" if t.prefix else "") for t in query_terms(query))
        where, params = self._indexed_filter_sql(namespace, filters, "i.")
        rows = self._query(
            "SELECT f.rowid AS seq, bm25(items_fts, 2.0, 1.0) AS rank FROM items_fts f "
            f"JOIN live_items i ON i.seq = f.rowid WHERE items_fts MATCH ? AND i.namespace = ?{where} "
            "ORDER BY rank LIMIT ?",
            [match, namespace, *params, k],
        )
        by_seq = self._items_by_seq({r["seq"] for r in rows})
        # FTS5's bm25 is negative, lower is better; flip it so that higher scores are better
        return [Hit(by_seq[r["seq"]], -float(r["rank"])) for r in rows if r["seq"] in by_seq]

    def has_text_vectors(self, namespace: str) -> bool:
        return self._count(namespace, "text") > 0

    def index_status(self, namespace: str, field: str = "image") -> IndexStatus:
        ns = self._require(namespace)
        with self._lock:
            loaded = self._indexes.get((namespace, field))
        # the state file says what the index holds; the index itself need not be loaded
        state = loaded.state if loaded else VectorIndex.read_state(self._index_path(namespace, field))
        unpurged = self.pending_purge(namespace) if field == "image" else 0
        idmap = IdMap.open(self._idmap_path(namespace), self._index_owner(ns)) if field == "image" else None
        id_map = idmap.count if idmap is not None else 0  # (its header only)
        if state is None or state.owner != self._index_owner(ns):
            return IndexStatus(kind="none", fresh=False, vectors=0, unpurged=unpurged, id_map=id_map)
        gen_col, rebuild_col = _COUNTERS[field]
        fresh = state.generation == ns[gen_col] and state.rebuild_generation == ns[rebuild_col]
        return IndexStatus(
            kind=state.kind, fresh=fresh, vectors=state.live, tombstones=len(state.dead),
            reason=state.reason, memory=state.memory, lists=state.nlist,
            unpurged=unpurged, search=search_effort(state, self.index_settings), id_map=id_map,
        )  # fmt: skip

    def build_index(self, namespace: str, kind: str | None = None) -> IndexStatus:
        if kind not in (None, "auto"):
            if kind not in KINDS:
                raise UsageError(f"unknown index kind {kind!r}; use auto, {', '.join(KINDS)}", param="kind")
            # an explicit kind is built even where a fresh index of the other kind exists
            self.index_settings = dataclasses.replace(self.index_settings, kind=kind)
            self._indexes.pop((namespace, "image"), None)
            self._indexes.pop((namespace, "text"), None)
        # a build also compacts: the rows marked deleted are purged, tombstones left by deletions
        # go with the rebuild; `index build` (a kind given, auto included) retrains an IVF-PQ index too
        self.purge_deleted(namespace)
        rebuild = kind is not None
        marks = [self._fresh_index(namespace, compact=True, rebuild=rebuild).state.removal_mark]
        if self.has_text_vectors(namespace):
            marks.append(self._fresh_index(namespace, "text", compact=True, rebuild=rebuild).state.removal_mark)
        if str(self.path) != ":memory:":
            ns = self._require(namespace)
            idmap = IdMap.open(self._idmap_path(namespace), self._index_owner(ns))
            # an ingest's refresh (no kind asked) keeps a map that still gives most ids: writing one
            # reads every id (~18 s at 10M), and the ids it lacks are looked up in the database
            stale = idmap is None or self._idmap_behind(namespace, idmap) > self._count(namespace, "image") // 4
            if rebuild or stale:
                # after the indexes: its mark is at or past theirs, so the trim below keeps the
                # log's entries after it, which a delete that reads the map checks its seqs against
                idmap = self._write_idmap(ns)
            marks.append(idmap.mark)
        with self._tx() as conn:
            # what both saved indexes and the id map have applied is no use to anyone any more
            conn.execute("DELETE FROM removals WHERE namespace = ? AND mark <= ?", (namespace, min(marks)))
        return self.index_status(namespace)

    def close(self) -> None:
        self.wait_for_saves()
        for thread in self._checkpoints:
            thread.join()
        with self._lock:
            self._conn.close()
