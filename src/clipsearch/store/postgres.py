"""The team store: PostgreSQL with the pgvector extension (psycopg 3, a connection pool).

Layout (all names start with ``clipsearch_``, so the tables sit beside an application's own):

- ``clipsearch_schema``: the schema version (``clipsearch db migrate``; opening a store also
  creates or migrates it, under an advisory lock so that concurrent processes do it once);
- ``clipsearch_namespaces``: name, model identity and load spec (jsonb), dimensions, and the
  namespace's own items table;
- ``clipsearch_items_<n>`` per namespace: id, content hash, file state, fingerprint, text,
  ``metadata jsonb`` (GIN-indexed, ``jsonb_path_ops``: equality filters are index lookups),
  ``embedding halfvec(d)``, an optional ``text_embedding halfvec(d)``, and a generated
  ``tsvector`` (GIN-indexed) for keyword search. One table per namespace gives each its own
  vector type and HNSW index (``halfvec_ip_ops``, built by ``clipsearch index build``). Vectors
  are stored as ``halfvec`` (2 bytes a dimension) from pgvector 0.7 on; tables made before, or on
  an older pgvector, keep ``vector`` and work as they did;
- ``clipsearch_failures`` and ``clipsearch_claims`` (which ingest process works on which item).

Vectors are L2-normalised, so ``<#>`` (negative inner product) orders by cosine similarity.
Filtered searches count their rows first (``_search_plan``): few rows are scored exactly, many
walk the HNSW index with pgvector 0.8's iterative scans, and a walk that comes back short is
redone exactly, so a filter always returns min(k, matching rows) hits.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import ClipsearchError, MissingExtraError, NotFoundError, UsageError
from ..identity import ModelIdentity
from ..index import IndexSettings
from ..keywords import Term, index_text, query_terms
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
    check_browse,
    check_field,
    check_same_model,
    checked_batch,
    checked_queries,
    dead_owners,
    filter_folded,
    filter_ranges,
    filter_values,
    keep_derived,
    keyword_text,
    like_prefix,
    validate_namespace,
)

SCHEMA_VERSION = 4
# pgvector releases: halfvec (and its HNSW operator classes) came in 0.7, iterative index scans in 0.8
HALFVEC_SINCE = (0, 7, 0)
ITERATIVE_SINCE = (0, 8, 0)
SCAN_SLACK = 8  # see PostgresStore._scan_budget
_LOCK_KEY = 0x636C6970  # pg_advisory_xact_lock key for schema changes ("clip")
_COLUMNS = {"image": "embedding", "text": "text_embedding"}
# jsonb_typeof's types as the kinds of KEY_KINDS
_JSONB_KINDS = {"number": "number", "string": "text", "boolean": "bool", "null": "null", "array": "list",
                "object": "object"}  # fmt: skip

_SCHEMA_1 = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS clipsearch_schema (
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS clipsearch_namespaces (
    id serial PRIMARY KEY,
    name text UNIQUE NOT NULL,
    identity jsonb NOT NULL,
    model_spec jsonb NOT NULL,
    dim integer NOT NULL,
    items_table text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS clipsearch_failures (
    namespace text NOT NULL,
    id text NOT NULL,
    source text NOT NULL,
    reason text NOT NULL,
    sha256 text,
    size bigint,
    mtime_ns bigint,
    fingerprint text,
    metadata jsonb NOT NULL DEFAULT '{}',
    attempts integer NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS clipsearch_claims (
    namespace text NOT NULL,
    id text NOT NULL,
    owner text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, id)
)
"""
_ITEMS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    seq bigserial PRIMARY KEY,
    id text UNIQUE NOT NULL,
    sha256 text,
    size bigint,
    mtime_ns bigint,
    fingerprint text,
    text text,
    text_words text NOT NULL DEFAULT '',
    keywords text NOT NULL DEFAULT '',
    metadata jsonb NOT NULL,
    embedding {vtype}({dim}) NOT NULL,
    text_embedding {vtype}({dim}),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    tsv tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('simple', text_words), 'A') || setweight(to_tsvector('simple', keywords), 'B')
    ) STORED
);
CREATE INDEX IF NOT EXISTS {table}_tsv ON {table} USING gin (tsv);
CREATE INDEX IF NOT EXISTS {table}_sha256 ON {table} (sha256);
CREATE INDEX IF NOT EXISTS {table}_metadata ON {table} USING gin (metadata jsonb_path_ops) WITH (fastupdate = off)
"""
_ITEM_COLS = "seq, id, metadata, sha256, created_at, updated_at"


def _array(value: Any) -> np.ndarray:
    """A vector as pgvector's loader returns it (a ``Vector``), as float32."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _tsquery(term: Term) -> str:
    phrase = " <-> ".join(f"'{token}'" for token in term.tokens)
    return f"({phrase})" if len(term.tokens) > 1 else phrase + (":*" if term.prefix else "")


def _reindex_keywords(conn: Any) -> None:
    """Every namespace's keyword columns again: schema 2 indexes CJK runs as character pairs
    (schema 1 kept a run whole, so a word inside one could not be found); schema 3 adds the
    names of an item's folders and splits words at "_"."""
    from psycopg import sql

    for (table,) in conn.execute("SELECT items_table FROM clipsearch_namespaces").fetchall():
        rows = conn.execute(sql.SQL("SELECT id, text, metadata FROM {}").format(sql.Identifier(table))).fetchall()
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("UPDATE {} SET text_words = %s, keywords = %s WHERE id = %s").format(sql.Identifier(table)),
                [(index_text(text), index_text(keyword_text(metadata)), item_id) for item_id, text, metadata in rows],
            )


def _index_metadata(conn: Any) -> None:
    """Schema 4: a GIN index on every namespace's metadata, so that an equality filter's rows are
    counted and found through it (filtered searches count their rows before they choose a plan).
    Without fastupdate: GIN's pending list (4 MB of entries not yet merged) is read whole by every
    lookup until a vacuum merges it, 9 ms a filter at 1M rows after an import, against 0.1 ms."""
    from psycopg import sql

    for (table,) in conn.execute("SELECT items_table FROM clipsearch_namespaces").fetchall():
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING gin (metadata jsonb_path_ops) WITH (fastupdate = off)"
            ).format(sql.Identifier(f"{table}_metadata"), sql.Identifier(table))
        )


# version -> the statements (or the function) that bring version - 1 to it
_MIGRATIONS: dict[int, str | Callable[[Any], None]] = {
    1: _SCHEMA_1, 2: _reindex_keywords, 3: _reindex_keywords, 4: _index_metadata
}  # fmt: skip


# planner settings of a filtered search's two plans: only the HNSW walk, or no index scan (the
# GIN index still serves the exact plan through a bitmap scan)
_WALK = {"enable_indexscan": "on", "enable_seqscan": "off", "enable_bitmapscan": "off"}
_EXACT = {"enable_indexscan": "off", "enable_seqscan": "on", "enable_bitmapscan": "on"}


def _set_local(conn: Any, settings: dict[str, str]) -> None:
    """Settings for the rest of the transaction (``SET LOCAL``, with values as parameters)."""
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def build_memory(rows: int, dim: int, vtype: str, m: int, budget: int) -> int:
    """``maintenance_work_mem`` for an HNSW build: pgvector's graph in memory (each element its
    vector, 2m neighbour slots on layer 0 and a few above, and its header), with a quarter spare,
    at least 64 MB and at most ``budget`` bytes."""
    per_row = dim * (2 if vtype == "halfvec" else 4) + (2 * m + m // 2) * 16 + 128
    return int(min(budget, max(64 << 20, rows * per_row * 1.25)))


def _version(text: str) -> tuple[int, ...]:
    """``0.8.0`` -> (0, 8, 0)."""
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def load_psycopg():
    try:
        import psycopg
        import psycopg.sql
        import psycopg.types.json
        import psycopg_pool
        from pgvector.psycopg import register_vector
    except ImportError:
        raise MissingExtraError("a PostgreSQL store (psycopg, psycopg_pool, pgvector)", "postgres") from None
    return psycopg, psycopg_pool, register_vector


def redact(url: str) -> str:
    """The URL without its password, for messages and ``info``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# a text that spells a number, as base.as_number reads one (jsonpath's like_regex is POSIX)
_NUMBER_PATTERN = r"^ *[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][+-]?[0-9]+)? *$"


def _folded_pattern(text: str) -> str:
    """A like_regex pattern, as the content of a JSON path string, that matches exactly the
    texts whose ``fold`` is ``text`` (already folded): each ASCII letter as ``[aA]``, so that
    neither the database's locale nor a regex flag decides what folds. Other characters are
    literal: a non-alphanumeric one escaped (a backslash before it means itself)."""
    parts = []
    for ch in text:
        if "a" <= ch <= "z":
            parts.append(f"[{ch}{ch.upper()}]")
        elif ch.isalnum():
            parts.append(ch)
        else:
            parts.append("\\" + ch)
    pattern = "^" + "".join(parts) + "$"
    return pattern.replace("\\", "\\\\").replace('"', '\\"')


class PostgresStore(ClosingStore):
    def __init__(self, url: str, index_settings: IndexSettings | None = None, *, pool_size: int = 8):
        self.location = redact(url)
        self.index_settings = index_settings or IndexSettings()
        if self.index_settings.lock_vectors:
            # not ignored: a user who asked for vectors in memory would wait on the disk unknowing
            raise UsageError(
                "CLIPSEARCH_LOCK_VECTORS keeps a SQLite store's index in this process's memory; PostgreSQL keeps "
                f"its own pages ({self.location}: shared_buffers, pg_prewarm), so leave it unset for PostgreSQL"
            )
        psycopg, psycopg_pool, register_vector = load_psycopg()
        self.url = url
        self._psycopg = psycopg
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                self.schema_version_before = self._schema_version(conn)
                self._migrate(conn)
                row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        except psycopg.OperationalError as e:
            raise UsageError(f"cannot connect to {self.location}: {str(e).strip().splitlines()[0]}") from None
        self.pgvector = _version(row[0])  # the extension's version in this database

        def configure(conn: Any) -> None:
            register_vector(conn)
            conn.commit()  # the type lookup opened a transaction; the pool wants the connection idle

        self._pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=pool_size, configure=configure, open=True)
        self._tables: dict[str, tuple[str, int]] = {}
        self._vtypes: dict[str, str] = {}  # items table -> its vectors' type (halfvec or vector)
        # filtered searches by the plan they took (exact, index, index+exact): what the tests and
        # benchmarks/scale.py read to see which path answered
        self.search_paths: Counter[str] = Counter()
        # the index tuples an iterative filtered walk may visit; None: by the filter's share of
        # the rows (_scan_budget)
        self.max_scan_tuples: int | None = None

    # -- schema ------------------------------------------------------------------------
    @staticmethod
    def _schema_version(conn: Any) -> int:
        exists = conn.execute("SELECT to_regclass('clipsearch_schema') IS NOT NULL").fetchone()[0]
        if not exists:
            return 0
        row = conn.execute("SELECT max(version) FROM clipsearch_schema").fetchone()
        return int(row[0] or 0)

    def _migrate(self, conn: Any) -> None:
        if self.schema_version_before == SCHEMA_VERSION:
            return
        if self.schema_version_before > SCHEMA_VERSION:
            raise UsageError(
                f"{self.location} was written by a newer clipsearch (schema {self.schema_version_before}); "
                "upgrade clipsearch"
            )
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            version = self._schema_version(conn)  # another process may have migrated meanwhile
            for target in range(version + 1, SCHEMA_VERSION + 1):
                step = _MIGRATIONS[target]
                if callable(step):
                    step(conn)
                else:
                    for statement in step.split(";\n"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute("INSERT INTO clipsearch_schema (version) VALUES (%s)", (target,))

    def schema_version(self) -> int:
        with self._conn() as conn:
            return self._schema_version(conn)

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    def _table(self, conn: Any, namespace: str) -> tuple[str, int]:
        """(items table, dimensions) of a namespace, or NotFoundError."""
        if namespace not in self._tables:
            row = conn.execute(
                "SELECT items_table, dim FROM clipsearch_namespaces WHERE name = %s", (namespace,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"namespace {namespace!r} does not exist in {self.location}; ingest into it first")
            self._tables[namespace] = (row[0], row[1])
            self._vtypes[row[0]] = conn.execute(
                "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass "
                "AND attname = 'embedding'",
                (row[0],),
            ).fetchone()[0]
        return self._tables[namespace]

    def vector_type(self, namespace: str) -> str:
        """``halfvec`` or ``vector``: how the namespace's table keeps its vectors."""
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            return self._vtypes[table]

    def _ident(self, name: str) -> Any:
        return self._psycopg.sql.Identifier(name)

    def _sql(self, template: str, table: str) -> Any:
        return self._psycopg.sql.SQL(template).format(t=self._ident(table))

    # -- namespaces --------------------------------------------------------------------
    def _infos(self, where: str = "", params: tuple = ()) -> list[NamespaceInfo]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT name, identity, model_spec, items_table, created_at FROM clipsearch_namespaces "
                f"{where} ORDER BY name",
                params,
            ).fetchall()
            out = []
            for name, identity, spec, table, created in rows:
                items = conn.execute(self._sql("SELECT count(*) FROM {t}", table)).fetchone()[0]
                failures = conn.execute(
                    "SELECT count(*) FROM clipsearch_failures WHERE namespace = %s", (name,)
                ).fetchone()[0]
                out.append(
                    NamespaceInfo(
                        name=name,
                        identity=ModelIdentity.from_dict(identity),
                        model_spec=spec,
                        items=items,
                        failures=failures,
                        created_at=created.isoformat(timespec="seconds"),
                    )
                )
            return out

    def namespace(self, name: str) -> NamespaceInfo | None:
        found = self._infos("WHERE name = %s", (name,))
        return found[0] if found else None

    def identity(self, name: str) -> ModelIdentity | None:
        with self._conn() as conn:
            row = conn.execute("SELECT identity FROM clipsearch_namespaces WHERE name = %s", (name,)).fetchone()
        return ModelIdentity.from_dict(row[0]) if row else None

    def namespaces(self) -> list[NamespaceInfo]:
        return self._infos()

    def items_table(self, namespace: str) -> str:
        with self._conn() as conn:
            return self._table(conn, namespace)[0]

    def bind_namespace(self, name: str, identity: ModelIdentity, model_spec: dict[str, Any]) -> NamespaceInfo:
        validate_namespace(name)
        Jsonb = self._psycopg.types.json.Jsonb
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            row = conn.execute("SELECT identity FROM clipsearch_namespaces WHERE name = %s", (name,)).fetchone()
            if row is None:
                ns_id = conn.execute(
                    "INSERT INTO clipsearch_namespaces (name, identity, model_spec, dim, items_table) "
                    "VALUES (%s, %s, %s, %s, '') RETURNING id",
                    (name, Jsonb(identity.as_dict()), Jsonb(model_spec), identity.dim),
                ).fetchone()[0]
                table = f"clipsearch_items_{ns_id}"
                # both made of integers here: nothing to quote
                vtype = "halfvec" if self.pgvector >= HALFVEC_SINCE else "vector"
                for statement in _ITEMS_TABLE.split(";\n"):
                    conn.execute(statement.format(table=table, dim=int(identity.dim), vtype=vtype))
                conn.execute("UPDATE clipsearch_namespaces SET items_table = %s WHERE id = %s", (table, ns_id))
            else:
                check_same_model(name, ModelIdentity.from_dict(row[0]), identity)
                conn.execute(
                    "UPDATE clipsearch_namespaces SET model_spec = %s WHERE name = %s", (Jsonb(model_spec), name)
                )
        info = self.namespace(name)
        assert info is not None
        return info

    # -- writing -----------------------------------------------------------------------
    def file_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(
                self._sql("SELECT id, sha256, size, mtime_ns, fingerprint FROM {t} WHERE id = ANY(%s)", table), (ids,)
            ).fetchall()
        return {r[0]: FileState(r[1], r[2], r[3], r[4]) for r in rows}

    def failure_states(self, namespace: str, ids: list[str]) -> dict[str, FileState]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT id, sha256, size, mtime_ns, fingerprint, reason FROM clipsearch_failures "
                "WHERE namespace = %s AND id = ANY(%s)",
                (namespace, ids),
            ).fetchall()
        return {r[0]: FileState(r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def write_batch(
        self,
        namespace: str,
        items: list[NewItem],
        vectors: np.ndarray,
        failures: list[FailureRecord] = (),  # type: ignore[assignment]
        touched: list[NewItem] = (),  # type: ignore[assignment]
    ) -> None:
        Jsonb = self._psycopg.types.json.Jsonb
        with self._conn() as conn:
            table, dim = self._table(conn, namespace)
            vectors = checked_batch(namespace, dim, items, vectors, touched)
            with conn.transaction():
                upsert = self._sql(
                    "INSERT INTO {t} (id, sha256, size, mtime_ns, fingerprint, text, text_words, keywords, metadata, "
                    "embedding, text_embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET "
                    "sha256 = excluded.sha256, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "fingerprint = excluded.fingerprint, text = excluded.text, text_words = excluded.text_words, "
                    "keywords = excluded.keywords, "
                    "metadata = excluded.metadata, embedding = excluded.embedding, "
                    "text_embedding = excluded.text_embedding, updated_at = now()",
                    table,
                )
                with conn.cursor() as cur:
                    cur.executemany(
                        upsert,
                        [
                            (
                                it.id,
                                it.sha256,
                                it.size,
                                it.mtime_ns,
                                it.fingerprint,
                                it.text,
                                index_text(it.text),
                                index_text(keyword_text(it.metadata)),
                                Jsonb(it.metadata),
                                vec,
                                None if it.text_vector is None else np.asarray(it.text_vector, np.float32),
                            )
                            for it, vec in zip(items, vectors, strict=True)
                        ],
                    )
                for t in touched:
                    row = conn.execute(self._sql("SELECT metadata FROM {t} WHERE id = %s", table), (t.id,)).fetchone()
                    if row is None:
                        continue
                    metadata = keep_derived(t.metadata, row[0])
                    conn.execute(
                        self._sql(
                            "UPDATE {t} SET size = %s, mtime_ns = %s, metadata = %s, fingerprint = %s, text = %s, "
                            "text_words = %s, keywords = %s, text_embedding = %s, updated_at = now() WHERE id = %s",
                            table,
                        ),
                        (
                            t.size,
                            t.mtime_ns,
                            Jsonb(metadata),
                            t.fingerprint,
                            t.text,
                            index_text(t.text),
                            index_text(keyword_text(metadata)),
                            None if t.text_vector is None else np.asarray(t.text_vector, np.float32),
                            t.id,
                        ),
                    )
                done = [it.id for it in (*items, *touched)]
                if done:
                    conn.execute(
                        "DELETE FROM clipsearch_failures WHERE namespace = %s AND id = ANY(%s)", (namespace, done)
                    )
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO clipsearch_failures (namespace, id, source, reason, sha256, size, mtime_ns, "
                        "fingerprint, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (namespace, id) DO UPDATE SET source = excluded.source, "
                        "reason = excluded.reason, sha256 = excluded.sha256, size = excluded.size, "
                        "mtime_ns = excluded.mtime_ns, fingerprint = excluded.fingerprint, "
                        "metadata = excluded.metadata, attempts = clipsearch_failures.attempts + 1, "
                        "last_failed_at = now()",
                        [
                            (
                                namespace,
                                f.id,
                                f.source,
                                f.reason,
                                f.sha256,
                                f.size,
                                f.mtime_ns,
                                f.fingerprint,
                                Jsonb(f.metadata),
                            )
                            for f in failures
                        ],
                    )
                settled = done + [f.id for f in failures]
                if settled:
                    conn.execute(
                        "DELETE FROM clipsearch_claims WHERE namespace = %s AND id = ANY(%s)", (namespace, settled)
                    )

    def delete_items(self, namespace: str, ids: list[str]) -> int:
        with self._conn() as conn, conn.transaction():
            table, _ = self._table(conn, namespace)
            return conn.execute(self._sql("DELETE FROM {t} WHERE id = ANY(%s)", table), (ids,)).rowcount

    def clear_failures(self, namespace: str, ids: list[str]) -> None:
        with self._conn() as conn, conn.transaction():
            conn.execute("DELETE FROM clipsearch_failures WHERE namespace = %s AND id = ANY(%s)", (namespace, ids))

    # -- claims (several ingest processes on one namespace) -----------------------------------
    def claim(self, namespace: str, ids: list[str], owner: str, lease_seconds: float = 600) -> set[str]:
        """Claim ``ids`` for ``owner``: the ones no live process holds. Claims expire after the
        lease; a holder on this host whose process has died loses them at once."""
        if not ids:
            return set()
        ids = sorted(set(ids))  # one lock order for every process
        with self._conn() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO clipsearch_claims (namespace, id, owner, expires_at) "
                "SELECT %s, unnest(%s::text[]), %s, now() + make_interval(secs => %s) ON CONFLICT DO NOTHING",
                (namespace, ids, owner, lease_seconds),
            )
            others = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT owner FROM clipsearch_claims "
                    "WHERE namespace = %s AND id = ANY(%s) AND owner <> %s",
                    (namespace, ids, owner),
                ).fetchall()
            ]
            conn.execute(
                "UPDATE clipsearch_claims SET owner = %s, expires_at = now() + make_interval(secs => %s) "
                "WHERE (namespace, id) IN (SELECT namespace, id FROM clipsearch_claims WHERE namespace = %s "
                "AND id = ANY(%s) AND owner <> %s AND (expires_at < now() OR owner = ANY(%s)) FOR UPDATE SKIP LOCKED)",
                (owner, lease_seconds, namespace, ids, owner, dead_owners(others)),
            )
            rows = conn.execute(
                "SELECT id FROM clipsearch_claims WHERE namespace = %s AND id = ANY(%s) AND owner = %s",
                (namespace, ids, owner),
            ).fetchall()
        return {r[0] for r in rows}

    def release(self, namespace: str, owner: str) -> None:
        with self._conn() as conn, conn.transaction():
            conn.execute("DELETE FROM clipsearch_claims WHERE namespace = %s AND owner = %s", (namespace, owner))

    # -- reading -----------------------------------------------------------------------
    @staticmethod
    def _item(namespace: str, row: tuple) -> Item:
        _, item_id, metadata, sha256, created, updated = row[:6]
        return Item(
            id=item_id,
            namespace=namespace,
            metadata=metadata,
            sha256=sha256,
            created_at=created.isoformat(timespec="seconds"),
            updated_at=updated.isoformat(timespec="seconds"),
        )

    def get_items(self, namespace: str, ids: list[str]) -> list[Item]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(self._sql(f"SELECT {_ITEM_COLS} FROM {{t}} WHERE id = ANY(%s)", table), (ids,))
            found = {r[1]: self._item(namespace, r) for r in rows.fetchall()}
        return [found[i] for i in ids if i in found]

    def get_vectors(self, namespace: str, ids: list[str]) -> dict[str, np.ndarray]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(self._sql("SELECT id, embedding FROM {t} WHERE id = ANY(%s)", table), (ids,))
            return {r[0]: _array(r[1]) for r in rows.fetchall()}

    def count(self, namespace: str) -> int:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            return int(conn.execute(self._sql("SELECT count(*) FROM {t}", table)).fetchone()[0])

    def failures(self, namespace: str | None = None) -> list[Failure]:
        sql = (
            "SELECT id, source, reason, sha256, size, mtime_ns, metadata, namespace, attempts, first_failed_at, "
            "last_failed_at, fingerprint FROM clipsearch_failures"
        )
        with self._conn() as conn:
            if namespace is None:
                rows = conn.execute(sql + " ORDER BY namespace, source").fetchall()
            else:
                rows = conn.execute(sql + " WHERE namespace = %s ORDER BY source", (namespace,)).fetchall()
        return [
            Failure(
                id=r[0],
                source=r[1],
                reason=r[2],
                sha256=r[3],
                size=r[4],
                mtime_ns=r[5],
                metadata=r[6],
                namespace=r[7],
                attempts=r[8],
                first_failed_at=r[9].isoformat(timespec="seconds"),
                last_failed_at=r[10].isoformat(timespec="seconds"),
                fingerprint=r[11],
            )
            for r in rows
        ]

    def _iter_rows(self, namespace: str, columns: str, batch_size: int) -> Iterator[list[Any]]:
        last = 0
        while True:
            with self._conn() as conn:
                table, _ = self._table(conn, namespace)
                rows = conn.execute(
                    self._sql(f"SELECT {columns} FROM {{t}} WHERE seq > %s ORDER BY seq LIMIT %s", table),
                    (last, batch_size),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def iter_items(self, namespace: str, batch_size: int = 10_000) -> Iterator[list[Item]]:
        for rows in self._iter_rows(namespace, _ITEM_COLS, batch_size):
            yield [self._item(namespace, r) for r in rows]

    def iter_vectors(self, namespace: str, batch_size: int = 10_000) -> Iterator[tuple[list[Item], np.ndarray]]:
        for rows in self._iter_rows(namespace, f"{_ITEM_COLS}, embedding", batch_size):
            yield [self._item(namespace, r) for r in rows], np.stack([_array(r[6]) for r in rows])

    def hash_groups(self, namespace: str) -> list[list[Item]]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(
                self._sql(
                    f"SELECT {_ITEM_COLS} FROM {{t}} WHERE sha256 IN (SELECT sha256 FROM {{t}} WHERE sha256 IS NOT "
                    "NULL GROUP BY sha256 HAVING count(*) > 1) ORDER BY sha256, seq",
                    table,
                )
            ).fetchall()
        groups: dict[str, list[Item]] = {}
        for r in rows:
            groups.setdefault(r[3], []).append(self._item(namespace, r))
        return list(groups.values())

    # -- search ------------------------------------------------------------------------
    def _filter_sql(self, filters: dict[str, Any] | None) -> tuple[str, list[Any]]:
        """`` AND ...`` clauses for the filters, by the rules of ``clipsearch.filters``. An
        equality is containment (``metadata @> {"key": v}`` for a value, ``{"key": [v]}`` for a
        list holding it, as SQLite's ``json_each`` reads one level), which the GIN index on
        ``metadata`` answers; ranges and folded texts are a JSON path per condition (lax mode
        tests each element of a list value), its values passed as variables. Silent, so that
        ``.double()`` of a text that is no number is no match rather than an error."""
        Jsonb = self._psycopg.types.json.Jsonb
        clauses, params = [], []
        for key, wanted in filter_values(filters):
            shapes = [Jsonb({key: shape}) for v in wanted for shape in (v, [v])]
            clauses.append("(" + " OR ".join(["metadata @> %s"] * len(shapes)) + ")")
            params += shapes
        for r in filter_ranges(filters):
            if r.number is None:
                test = f'@.type() == "string" && @ {r.sql} $t'
            else:
                test = (
                    f'(@.type() == "number" && @ {r.sql} $n) || '
                    f'(@.type() == "string" && @ like_regex "{_NUMBER_PATTERN}" && @.double() {r.sql} $n) || '
                    f'(@.type() == "string" && !(@ like_regex "{_NUMBER_PATTERN}") && @ {r.sql} $t)'
                )
            clauses.append("jsonb_path_exists(metadata, %s::jsonpath, %s::jsonb, true)")
            params += [f'$."{r.key}" ? ({test})', json.dumps({"n": r.number, "t": r.text})]
        for key, texts in filter_folded(filters):
            test = " || ".join(f'@ like_regex "{_folded_pattern(t)}"' for t in texts)
            clauses.append("jsonb_path_exists(metadata, %s::jsonpath, %s::jsonb, true)")
            params += [f'$."{key}" ? (@.type() == "string" && ({test}))', "{}"]
        return "".join(f" AND {c}" for c in clauses), params

    def search(
        self,
        namespace: str,
        queries: np.ndarray,
        k: int,
        filters: dict[str, Any] | None = None,
        field: str = "image",
    ) -> list[list[Hit]]:
        column = _COLUMNS[check_field(field)]
        where, params = self._filter_sql(filters)
        results = []
        with self._conn() as conn:
            table, dim = self._table(conn, namespace)
            queries = checked_queries(namespace, dim, queries)
            nearest = self._sql(
                f"SELECT {_ITEM_COLS}, -({column} <#> %s) AS score FROM {{t}} WHERE {column} IS NOT NULL{where} "
                f"ORDER BY {column} <#> %s LIMIT %s",
                table,
            )
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true)", (str(max(self.index_settings.fixed_ef, k)),)
                )
                plan, expected_rows = self._search_plan(conn, table, field, where, params) if filters else ("", 0)
                if plan == "exact":
                    _set_local(conn, _EXACT)
                elif plan == "index":
                    # the plan is chosen: the HNSW walk, not the planner's guess from the filter's
                    # estimated rows. Relaxed order: the walk goes on past ef_search until it has k
                    # allowed rows or has looked at max_scan_tuples; the outer ORDER BY restores
                    # the exact order
                    nearest = self._psycopg.sql.SQL("SELECT * FROM ({}) AS found ORDER BY score DESC").format(nearest)
                    # a table not yet analysed has no estimate: share 1, a short budget, and
                    # a walk that comes back short is redone exactly
                    share = min(1.0, expected_rows / max(1, self._estimated_rows(conn, table)))
                    budget = self.max_scan_tuples or self._scan_budget(k, share)
                    _set_local(
                        conn, {**_WALK, "hnsw.iterative_scan": "relaxed_order", "hnsw.max_scan_tuples": str(budget)}
                    )
                # a filtered query is planned with its values: a generic plan (what psycopg's
                # prepared statements get from the sixth run on) cannot tell a filter of 12 rows,
                # found through the GIN index in a millisecond, from one that scans the table
                custom = {"prepare": False} if filters else {}
                for q in queries:
                    rows = conn.execute(nearest, [q, *params, q, k], **custom).fetchall()
                    taken = plan or "unfiltered"
                    if plan == "index" and len(rows) < k:  # the filter was expected to pass > k rows
                        # the walk ran out before it found k allowed rows: score the filter's rows
                        _set_local(conn, _EXACT)
                        rows = conn.execute(nearest, [q, *params, q, k], prepare=False).fetchall()
                        _set_local(conn, _WALK)
                        taken = "index+exact"
                    self.search_paths[taken] += 1
                    results.append([Hit(self._item(namespace, r), float(r[6])) for r in rows])
        return results

    def _search_plan(self, conn: Any, table: str, field: str, where: str, params: list[Any]) -> tuple[str, int]:
        """How a filtered search runs, and how many rows the planner expects the filter to pass.
        ``exact``: the filter's rows are scored one by one (no HNSW index, a pgvector without
        iterative scans, or an estimate of no more than ``pg_exact_filter_rows`` rows: found
        through the metadata index, an exact scan costs less than a walk and is right);
        ``index``: an iterative HNSW scan. The planner's estimate (from the GIN index's and the
        table's statistics, ~0.5 ms) decides rather than a count, which reads every row it counts
        (40 ms for 10,000 at 1M rows: GIN's jsonb_path_ops keys are hashes, so each row is
        rechecked). A wrong estimate costs time, never hits: an exact scan of more rows than
        expected is still exact, and a walk that comes back short is redone exactly."""
        if self.pgvector < ITERATIVE_SINCE or not self._has_index(conn, table, field):
            return "exact", 0
        column = _COLUMNS[field]
        plan = conn.execute(
            self._sql(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {{t}} WHERE {column} IS NOT NULL{where}", table),
            params,
            prepare=False,
        ).fetchone()[0]
        expected = int(plan[0]["Plan"]["Plan Rows"])
        limit = min(self.index_settings.exact_filter_rows, self.index_settings.pg_exact_filter_rows)
        return ("exact" if expected <= limit else "index"), expected

    def _scan_budget(self, k: int, share: float) -> int:
        """Index tuples a filtered walk may visit: SCAN_SLACK times the k / share a walk needs
        where the filter is as dense around the query as in the whole table. A filter that is
        much sparser there (a category about another topic than the query's) runs out and comes
        back short, and is then scored exactly: walks that find their k rows in the budget found
        0.84-0.98 of the exact top 10 on benchmarks/scale.py's set, the ones that went on far
        past it as little as 0.33, because relaxed-order walks stop at the first k rows they meet."""
        return int(max(self.index_settings.fixed_ef, min(10**9, SCAN_SLACK * k / max(share, 1e-9))))

    def _has_index(self, conn: Any, table: str, field: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._index_name(table, field),)).fetchone()[0]

    def _estimated_rows(self, conn: Any, table: str) -> int:
        """The table's rows as the planner's statistics know them (no count of a large table)."""
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
        return max(0, int(row[0] or 0))

    def count_by(self, namespace: str, key: str) -> list[tuple[Any, int]]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(
                self._sql(
                    "SELECT v, count(*) AS n FROM {t}, LATERAL jsonb_array_elements(CASE jsonb_typeof(metadata -> %s) "
                    "WHEN 'array' THEN metadata -> %s ELSE jsonb_build_array(metadata -> %s) END) v "
                    "WHERE metadata ? %s AND jsonb_typeof(v) NOT IN ('object', 'array', 'null') "
                    "GROUP BY v ORDER BY n DESC, v",
                    table,
                ),
                (key, key, key, key),
            ).fetchall()
            missing = conn.execute(
                self._sql(
                    "SELECT count(*) FROM {t} WHERE coalesce(jsonb_typeof(metadata -> %s), 'null') = 'null'", table
                ),
                (key,),
            ).fetchone()[0]
        counts = [(value, int(n)) for value, n in rows]
        return counts + ([(None, int(missing))] if missing else [])

    def keep_resident(self, namespace: str, field: str = "image") -> None:
        self.prepare_search(namespace, field)  # the server keeps its pages (lock_vectors is refused)

    def prepare_search(self, namespace: str, field: str = "image") -> None:
        # pgvector's index lives in the database: nothing to load here, but the namespace must exist
        check_field(field)
        with self._conn() as conn:
            self._table(conn, namespace)

    def metadata_keys(self, namespace: str, exact: bool = True) -> dict[str, dict[str, int]]:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(
                self._sql(
                    "SELECT e.key, jsonb_typeof(e.value), count(*) FROM {t}, jsonb_each(metadata) e "
                    "GROUP BY 1, 2 ORDER BY 1",
                    table,
                )
            ).fetchall()
        keys: dict[str, dict[str, int]] = {}
        for key, kind, n in rows:
            keys.setdefault(key, {})[_JSONB_KINDS[kind]] = int(n)
        return keys

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
        where, params = self._filter_sql(filters)
        if folder:
            where += " AND metadata ->> 'path' LIKE %s ESCAPE '\\'"
            params.append(like_prefix(folder))
        sort = {
            "newest": "seq DESC",
            "oldest": "seq",
            "taken": "metadata ->> 'taken_at' DESC NULLS LAST, seq DESC",
        }[order]
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            rows = conn.execute(
                self._sql(
                    f"SELECT {_ITEM_COLS} FROM {{t}} WHERE true{where} ORDER BY {sort} LIMIT %s OFFSET %s", table
                ),
                [*params, limit, offset],
            ).fetchall()
            total = conn.execute(self._sql(f"SELECT count(*) FROM {{t}} WHERE true{where}", table), params).fetchone()
        return [self._item(namespace, r) for r in rows], int(total[0])

    def keyword_search(self, namespace: str, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        terms = query_terms(query)
        where, params = self._filter_sql(filters)
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            # word-character tokens cannot carry tsquery operators; a CJK term is the phrase of
            # its pairs (<->), a one-character one a prefix (:*); OR them like the SQLite store
            rows = conn.execute(
                self._sql(
                    f"SELECT {_ITEM_COLS}, ts_rank(tsv, q) AS score FROM {{t}}, to_tsquery('simple', %s) q "
                    f"WHERE tsv @@ q{where} ORDER BY score DESC, seq LIMIT %s",
                    table,
                ),
                [" | ".join(_tsquery(t) for t in terms), *params, k],
            ).fetchall()
        return [Hit(self._item(namespace, r), float(r[6])) for r in rows]

    def has_text_vectors(self, namespace: str) -> bool:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            sql = self._sql("SELECT 1 FROM {t} WHERE text_embedding IS NOT NULL LIMIT 1", table)
            return conn.execute(sql).fetchone() is not None

    def _index_name(self, table: str, field: str) -> str:
        return f"{table}_{_COLUMNS[field]}_hnsw"

    def index_status(self, namespace: str, field: str = "image") -> IndexStatus:
        with self._conn() as conn:
            table, _ = self._table(conn, namespace)
            exists = self._has_index(conn, table, field)
            vtype = self._vtypes[table]
        filtered = (
            f"a filter of more than {self.index_settings.pg_exact_filter_rows:,} rows walks it (iterative scan), "
            "fewer are scored exactly"
            if self.pgvector >= ITERATIVE_SINCE
            else f"filters are exact scans (pgvector {'.'.join(map(str, self.pgvector))}; 0.8 walks the index)"
        )
        reason = (
            f"HNSW on {vtype} ({vtype}_ip_ops); {filtered}"
            if exists
            else f"exact scans of the {vtype} column (`clipsearch index build` makes an HNSW index)"
        )
        # PostgreSQL keeps an index in step with its table: it is never stale
        search = f"hnsw.ef_search {self.index_settings.fixed_ef}" if exists else ""
        return IndexStatus(
            kind="hnsw" if exists else "none", fresh=True, vectors=self.count(namespace), reason=reason, search=search
        )

    def build_index(self, namespace: str, kind: str | None = None) -> IndexStatus:
        """HNSW indexes (``halfvec_ip_ops``, or ``vector_ip_ops`` on a table that keeps
        ``vector``) on the image vectors, and on the text vectors when there are any. ``kind``
        None (ingest's call): only from ``hnsw_threshold`` vectors on; below, an exact scan is
        fast enough. ``kind="hnsw"``: now."""
        settings = self.index_settings
        if kind not in (None, "hnsw", "auto"):
            raise UsageError(f"PostgreSQL stores build hnsw indexes, not {kind!r}")
        if kind != "hnsw" and self.count(namespace) < settings.hnsw_threshold:
            return self.index_status(namespace)
        fields = ["image", "text"] if self.has_text_vectors(namespace) else ["image"]
        rows = self.count(namespace)
        with self._conn() as conn:
            table, dim = self._table(conn, namespace)
            vtype = self._vtypes[table]
            conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run in a transaction
            try:
                # pgvector builds fast while the graph fits maintenance_work_mem, and slowly on
                # disk after: room for the graph (within the index memory budget), and the
                # server's parallel workers
                memory = build_memory(rows, dim, vtype, settings.hnsw_m, settings.memory)
                conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{memory // 1024}kB",))
                workers = settings.pg_build_workers or int(conn.execute("SHOW max_parallel_workers").fetchone()[0])
                conn.execute("SELECT set_config('max_parallel_maintenance_workers', %s, false)", (str(workers),))
                for field in fields:
                    conn.execute(
                        self._psycopg.sql.SQL(
                            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {i} ON {t} USING hnsw ({c} {ops}) "
                            "WITH (m = {m}, ef_construction = {ef})"
                        ).format(
                            i=self._ident(self._index_name(table, field)),
                            t=self._ident(table),
                            c=self._ident(_COLUMNS[field]),
                            ops=self._psycopg.sql.Identifier(f"{vtype}_ip_ops"),  # halfvec_ip_ops, vector_ip_ops
                            m=self._psycopg.sql.Literal(int(settings.hnsw_m)),
                            ef=self._psycopg.sql.Literal(int(settings.ef_construction)),
                        )
                    )
            except self._psycopg.Error as e:
                raise ClipsearchError(f"building the HNSW index failed: {str(e).strip().splitlines()[0]}") from None
            finally:
                if not conn.closed:  # the pool lends this connection again: without the build's settings
                    conn.execute("RESET maintenance_work_mem; RESET max_parallel_maintenance_workers")
                conn.autocommit = False
        return self.index_status(namespace)

    def close(self) -> None:
        self._pool.close()
